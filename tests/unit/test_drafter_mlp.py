"""training.drafters.mlp: stage k reads (state_{k-1}, x_{t+k}) and is paired with target row t+k,
its teacher-forced logits are what vllm_lk's serving proposer computes, the export is the layout
vLLM loads (tests/heads.py::write_mlp_speculator), export -> load, and that it trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.heads import write_mlp_speculator
from tests.unit.drafter_data import config, expected_pairs, real_batch, synthetic_batch, target_model, train  # noqa: F401
from training.drafters import load_drafter, mlp
from training.drafters.base import as_logits
from vllm_lk.heads.mlp_speculator import LKMLPSpeculator
from vllm_lk.proposers import LKMLPProposer

K = 3


@pytest.fixture(autouse=True)
def fp32_heads(monkeypatch):
    """The heads' fp32 path, which these tests compare with the formula and with training; the
    bf16 heads used by default on AVX512-BF16 CPUs are tested in test_mlp_speculator.py."""
    monkeypatch.setenv("VLLM_LK_CPU_BF16_HEADS", "0")


def randomised(drafter: mlp.MLPDrafter, seed: int = 0) -> mlp.MLPDrafter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return drafter


def small(seed: int = 0) -> mlp.MLPDrafter:
    return randomised(mlp.MLPDrafter(vocab_size=11, emb_dim=8, inner_dim=6, n_predict=K, target_layers=2), seed)


def serving_model(path) -> LKMLPSpeculator:
    """vllm_lk's vLLM model class built from an export's config.json, weights loaded as vLLM does."""
    hf = SimpleNamespace(**json.loads((path / "config.json").read_text()))
    spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf), num_speculative_tokens=K)
    model = LKMLPSpeculator(vllm_config=SimpleNamespace(speculative_config=spec)).float()  # vLLM builds it at dtype float32
    loaded = model.load_weights(load_file(str(path / "model.safetensors")).items())
    assert loaded == {name for name, _ in model.named_parameters()}  # what vLLM's loader checks
    return model


def test_build_shapes_and_init(target_model):
    model, _ = target_model
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    drafter = mlp.build(model, config("mlp"))
    assert (drafter.kind, drafter.vllm_method, drafter.num_heads) == ("mlp", "mlp_speculator", K)
    assert drafter.hidden_layers == (model.config.num_hidden_layers,)
    core = drafter.speculator
    assert core.inner_dim == hidden and core.scale_input and not core.tie_weights
    assert len({id(e) for e in core.emb}) == K  # untied stages
    torch.testing.assert_close(core.head[K - 1].weight, model.get_output_embeddings().weight)
    narrow = mlp.build(model, config("mlp", mlp_inner_dim=32)).speculator
    assert narrow.proj[0].weight.shape == (32, hidden) and narrow.proj[1].weight.shape == (32, 32)
    assert narrow.emb[0].weight.shape == (vocab, 32) and narrow.head[0].weight.shape == (vocab, 32)


def test_stage_k_is_paired_with_target_row_t_plus_k():
    drafter = small()
    target = synthetic_batch(layers=2, hidden=8, vocab=11, length=9)
    pairs = drafter(target)
    expected = expected_pairs(drafter.stage_logits(target.hidden_states[2], target.input_ids), target)
    assert len(pairs) == K
    for (draft, ref), (want_draft, want_ref) in zip(pairs, expected):
        assert draft.shape == want_draft.shape and draft.shape[1] == 11
        torch.testing.assert_close(as_logits(draft), want_draft)
        torch.testing.assert_close(as_logits(ref), want_ref)


def test_stage_k_at_anchor_t_sees_only_h_t_and_tokens_t_plus_1_to_t_plus_k():
    drafter = small()
    gen = torch.Generator().manual_seed(1)
    hidden, ids = torch.randn(2, 10, 8, generator=gen), torch.randint(0, 11, (2, 10), generator=gen)
    base = drafter.stage_logits(hidden, ids)
    moved_token = ids.clone()
    moved_token[:, 6] = (ids[:, 6] + 1) % 11
    moved_state = hidden.clone()
    moved_state[:, 3] += 1.0
    for k, (before, by_token, by_state) in enumerate(
        zip(base, drafter.stage_logits(hidden, moved_token), drafter.stage_logits(moved_state, ids)), start=1
    ):
        token_hits = ((before - by_token).abs().amax(-1) > 0).any(0)  # [T] anchors that changed
        state_hits = ((before - by_state).abs().amax(-1) > 0).any(0)
        # token 6 is x_{t+j} for j <= k exactly when anchor t is in [6-k, 5]
        assert token_hits.nonzero()[:, 0].tolist() == list(range(6 - k, 6)), (k, token_hits)
        assert state_hits.nonzero()[:, 0].tolist() == [3]


def test_teacher_forced_logits_are_what_the_serving_proposer_computes(target_model, tmp_path):
    """Export, load into vllm_lk's vLLM class, draft greedily with LKMLPProposer.propose_mlp from
    (h_t, x_{t+1}); writing those drafts into the sequence as x_{t+2..}, the training forward at
    anchor t gives the same logits at every stage (so the same q at any temperature)."""
    model, _ = target_model
    drafter = mlp.build(model, config("mlp"))
    drafter.export(tmp_path)
    serving = serving_model(tmp_path)
    proposer = LKMLPProposer(SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=K)))
    proposer.model = serving

    target = real_batch(target_model)
    hidden, ids = target.hidden_states[-1], target.input_ids.clone()  # [B, T, H], [B, T]
    anchors = torch.tensor([5, 17, 30, 40])
    rows = torch.arange(len(anchors))
    drafts = proposer.propose_mlp(hidden[rows, anchors], ids[rows, anchors + 1], SimpleNamespace(all_greedy=True))
    for k in range(1, K):
        ids[rows, anchors + 1 + k] = drafts[:, k - 1]
    with torch.no_grad():
        trained = drafter.stage_logits(hidden, ids)
        state, tokens = serving.initial_state(hidden[rows, anchors]), ids[rows, anchors + 1]
        for k in range(K):
            state, served = serving.step(k, state, tokens)
            tokens = drafts[:, k]
            torch.testing.assert_close(trained[k][rows, anchors], served, atol=1e-5, rtol=1e-5)
            assert torch.equal(trained[k][rows, anchors].argmax(-1), drafts[:, k])


def test_export_has_the_served_layout_and_loads_back_identically(tiny_target, target_model, tmp_path):
    model, _ = target_model
    drafter = randomised(mlp.build(model, config("mlp")))
    drafter.export(tmp_path / "mlp")
    reference = write_mlp_speculator(tiny_target, tmp_path / "reference", n_predict=K)
    ours, theirs = load_file(str(tmp_path / "mlp/model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours_config = json.loads((tmp_path / "mlp/config.json").read_text())
    theirs_config = json.loads((reference / "config.json").read_text())
    assert {k: ours_config[k] for k in theirs_config} == theirs_config

    loaded = load_drafter(tmp_path / "mlp", model)
    assert isinstance(loaded, mlp.MLPDrafter)
    target = real_batch(target_model)
    for (a, ta), (b, tb) in zip(drafter(target), loaded(target)):
        assert torch.equal(as_logits(a), as_logits(b)) and torch.equal(as_logits(ta), as_logits(tb))


def test_a_few_steps_lower_the_loss(target_model):
    torch.manual_seed(0)
    model, _ = target_model
    drafter = mlp.build(model, config("mlp"))
    losses = train(drafter, real_batch(target_model), steps=15)
    assert losses[-1] < 0.9 * losses[0], losses


def test_tied_stages_share_one_module_and_export_each_tensor_once(target_model, tmp_path):
    """fms-extras tie_weights: emb/ln/head shared by all stages, proj by stages >= 2. The export
    holds each shared tensor once; vLLM's serving class (built from config.json) and load()
    both read it back into the same forward."""
    model, _ = target_model
    tied = mlp.build(model, config("mlp", mlp_tie_weights=True))
    untied = mlp.build(model, config("mlp"))
    core = tied.speculator
    assert core.tie_weights and len({id(m) for m in core.emb}) == 1 and len({id(m) for m in core.head}) == 1
    assert core.proj[0] is not core.proj[1] and core.proj[1] is core.proj[K - 1]
    count = lambda d: sum(p.numel() for p in d.parameters())  # noqa: E731
    assert count(untied) - count(tied) == (K - 1) * (count(untied.speculator.emb[0]) + count(untied.speculator.ln[0])
                                                     + count(untied.speculator.head[0])) + (K - 2) * count(untied.speculator.proj[1])
    randomised(tied, seed=3)
    tied.export(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(tensors) == ["speculator." + n for n in
                               ("emb.0.weight", "head.0.weight", "ln.0.bias", "ln.0.weight", "proj.0.weight", "proj.1.weight")]
    assert json.loads((tmp_path / "config.json").read_text())["tie_weights"] is True
    gen = torch.Generator().manual_seed(4)
    hidden, ids = torch.randn(2, 7, model.config.hidden_size, generator=gen), torch.randint(0, 512, (2, 7), generator=gen)
    with torch.no_grad():
        want = tied.stage_logits(hidden, ids)
        for other in (load_drafter(tmp_path, model).speculator, serving_model(tmp_path)):
            state = other.initial_state(hidden)
            for k in range(1, K + 1):
                state, logits = other.step(k - 1, state, mlp.shift_left(ids, k))
                torch.testing.assert_close(logits, want[k - 1])

"""The EAGLE-3 drafter: head alignment, TTT equal to vLLM's step-by-step KV-cache drafting,
causality, the truncated vocabulary's d2t/t2d, export -> load, and that training lowers the loss.

The serving reference below is written independently of the module: one query at a time, an
explicit list of cached keys per anchor (first-pass keys at rows <= t, then one key per earlier
draft step), and transformers' own rotary embedding, as ``SpecDecodeBaseProposer.propose`` in
vLLM 0.32 runs the head. Tolerances: fp32 everywhere; the batched TTT and the one-row reference
sum in different orders, so they agree to ~1e-6, checked at 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.drafter_data import train
from training.drafters import eagle3
from training.drafters.base import TargetOutputs, as_logits
from training.target import load_target, run_target
from training.train_config import TrainConfig
from training.vocab import select_draft_vocab

pytestmark = pytest.mark.usefixtures("single_torch_thread")
K = 3
VD = 300




@pytest.fixture(scope="module")
def target(tiny_target):
    model, _ = load_target(tiny_target)
    return model


@pytest.fixture(scope="module")
def counts():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 1000, (512,), generator=gen)


def make(target, counts=None, **overrides) -> eagle3.Eagle3Drafter:
    torch.manual_seed(0)
    config = TrainConfig(drafter="eagle3", num_heads=K, **overrides)
    return eagle3.build(target, config, counts)


def batch(target, drafter, length=12, seed=0, mask=None) -> TargetOutputs:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.bool) if mask is None else mask
    return run_target(target, ids, mask, drafter.hidden_layers)


def step_logits(drafter, target_out: TargetOutputs) -> list[torch.Tensor]:  # K x [B, T, Vd]
    aux = torch.cat([target_out.hidden_states[i] for i in drafter.hidden_layers], dim=-1)
    with torch.no_grad():
        return drafter.unroll(target_out.input_ids, aux)


def test_aux_layer_choice():
    assert eagle3.default_aux_layers(32) == (2, 16, 29)  # vLLM's (2, L//2, L-3)
    assert eagle3.default_aux_layers(8) == (2, 4, 5)
    assert eagle3.default_aux_layers(6) == (1, 3, 5)  # (2, 3, 3) is not distinct: spread over 1..5
    assert eagle3.check_aux_layers([4, 1, 3], 6) == (1, 3, 4)  # vLLM concatenates in layer order
    with pytest.raises(ValueError, match="distinct"):
        eagle3.check_aux_layers([1, 1, 3], 6)
    with pytest.raises(ValueError, match="distinct"):
        eagle3.check_aux_layers([1, 3, 6], 6)  # id L is the final *normed* state in training


def test_shapes_and_alignment(target, counts):
    drafter = make(target, counts, draft_vocab_size=VD, aux_layers=[4, 1, 3])
    assert drafter.hidden_layers == (1, 3, 4) and drafter.kind == drafter.vllm_method == "eagle3"
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = False  # a prompt
    mask[1, 9:] = False  # padding
    out = batch(target, drafter, mask=mask)
    pairs = drafter(out)
    steps = step_logits(drafter, out)
    assert len(pairs) == K
    for k, ((draft, reference), logits) in enumerate(zip(pairs, steps), start=1):
        keep = mask[:, k:]  # target row t+k is trained
        assert logits.shape == (2, 12, VD)
        assert draft.shape == (int(keep.sum()), VD) and reference.shape == (int(keep.sum()), 512)
        torch.testing.assert_close(as_logits(draft).detach(), logits[:, : 12 - k][keep])
        torch.testing.assert_close(as_logits(reference), out.all_logits()[:, k:][keep])


def rope(x, position, target):
    """transformers' rotary embedding of one row x [h, d] at ``position``."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cos, sin = LlamaRotaryEmbedding(target.config)(x[None], torch.tensor([[position]]))
    return apply_rotary_pos_emb(x[None, :, None], x[None, :, None], cos, sin)[0][0, :, 0]


def served_like(drafter, target, ids, aux, anchor) -> list[torch.Tensor]:  # K x [Vd]
    """The head's K draft logits at ``anchor`` as vLLM computes them: a first pass over rows
    0..anchor (row s: token x_{s+1}, position s, hidden fc(aux_s)), then one query per step k
    (token x_{anchor+k}, position anchor+k-1, hidden = the previous pre-norm output) reading
    every cached key. One row at a time, explicit key lists."""
    g, layer = drafter.g, drafter.midlayer
    attn = layer.self_attn
    heads = lambda t, n: t.view(n, g.head_dim).repeat_interleave(g.num_heads // n, dim=0)  # noqa: E731
    keys, values = [], []

    def row(token, hidden, position):
        x = torch.cat([layer.input_layernorm(drafter.embed_weight[token]), layer.hidden_norm(hidden)])
        q = rope(heads(attn.q_proj(x), g.num_heads), position, target)
        keys.append(rope(heads(attn.k_proj(x), g.num_kv_heads), position, target))
        values.append(heads(attn.v_proj(x), g.num_kv_heads))
        return x, q

    def finish(hidden, q):
        k, v = torch.stack(keys, 1), torch.stack(values, 1)  # [h, n, d]
        weights = torch.softmax((k @ q[:, :, None])[..., 0] / g.head_dim**0.5, dim=-1)  # [h, n]
        out = attn.o_proj((weights[:, :, None] * v).sum(1).reshape(-1))
        residual = hidden + out
        return residual + layer.mlp(layer.post_attention_layernorm(residual))

    hidden = drafter.fc(aux[: anchor + 1])
    for s in range(anchor + 1):  # first pass; only the anchor's output is sampled
        _, q = row(ids[s + 1], hidden[s], s)
        if s == anchor:
            state = finish(hidden[s], q)
    logits = [drafter.lm_head(drafter.norm(state))]
    for k in range(2, K + 1):
        _, q = row(ids[anchor + k], state, anchor + k - 1)
        state = finish(state, q)
        logits.append(drafter.lm_head(drafter.norm(state)))
    return logits


def test_ttt_equals_step_by_step_serving(target, counts):
    drafter = make(target, counts, draft_vocab_size=VD)
    with torch.no_grad():  # give every weight a visible role (the init's 0.02 scale hides mistakes)
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    out = batch(target, drafter, length=14, seed=3)
    steps = step_logits(drafter, out)
    aux = torch.cat([out.hidden_states[i] for i in drafter.hidden_layers], dim=-1)
    with torch.no_grad():
        for b, anchor in [(0, 0), (0, 5), (1, 10)]:
            reference = served_like(drafter, target, out.input_ids[b], aux[b], anchor)
            for k in range(K):
                torch.testing.assert_close(steps[k][b, anchor], reference[k], atol=1e-4, rtol=1e-4)


def test_step_k_at_anchor_t_reads_nothing_after_token_t_plus_k(target, counts):
    drafter = make(target, counts, draft_vocab_size=VD)
    base = batch(target, drafter, length=16, seed=4)
    steps = step_logits(drafter, base)
    anchor = 6
    for k in range(1, K + 1):
        ids = base.input_ids.clone()
        ids[:, anchor + k + 1 :] = torch.randint(5, 512, ids[:, anchor + k + 1 :].shape)
        perturbed = step_logits(drafter, run_target(target, ids, base.loss_mask, drafter.hidden_layers))
        torch.testing.assert_close(perturbed[k - 1][:, : anchor + 1], steps[k - 1][:, : anchor + 1], atol=1e-5, rtol=1e-5)
        ids[:, anchor + k] = (ids[:, anchor + k] + 1) % 512  # ... but it does read token t+k
        changed = step_logits(drafter, run_target(target, ids, base.loss_mask, drafter.hidden_layers))
        assert not torch.allclose(changed[k - 1][:, anchor], steps[k - 1][:, anchor])


def test_truncated_vocabulary_round_trip(target, counts, tmp_path, tiny_target):
    from tests.heads import write_eagle3

    drafter = make(target, counts, draft_vocab_size=VD)
    ids = drafter.draft_ids
    assert torch.equal(ids, select_draft_vocab(counts, VD, always=range(5)))
    assert ids[:5].tolist() == [0, 1, 2, 3, 4] and bool((ids[1:] > ids[:-1]).all())
    torch.testing.assert_close(drafter.lm_head.weight, target.lm_head.weight[ids])
    drafter.export(tmp_path / "head")
    tensors = load_file(str(tmp_path / "head" / "model.safetensors"))
    # vLLM: target id = draft id + d2t[draft id]; t2d marks the target ids that have a draft id
    assert torch.equal(torch.arange(VD) + tensors["d2t"], ids)
    assert tensors["t2d"].nonzero()[:, 0].tolist() == ids.tolist()
    # the same tensor names and config keys as the layout vLLM 0.32 is known to load
    reference = write_eagle3(tiny_target, tmp_path / "reference", ids.tolist(), [1, 3, 5])
    assert set(tensors) == set(load_file(str(reference / "model.safetensors")))
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert set(json.loads((reference / "config.json").read_text())) <= set(config)
    assert config["draft_vocab_size"] == VD and config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    assert torch.equal(eagle3.load(tmp_path / "head", target).draft_ids, ids)


def test_export_then_load_gives_the_same_forward(target, counts, tmp_path):
    for name, overrides in [("truncated", dict(draft_vocab_size=VD)), ("full", {})]:
        drafter = make(target, counts, **overrides)
        with torch.no_grad():
            for p in drafter.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        drafter.export(tmp_path / name)
        tensors = load_file(str(tmp_path / name / "model.safetensors"))
        assert not any("embed" in key for key in tensors)  # vLLM shares the target's embeddings
        assert ("d2t" in tensors) == (name == "truncated")  # a full-vocabulary head has no d2t to load
        loaded = eagle3.load(tmp_path / name, target)
        assert loaded.g == drafter.g
        # the embeddings are the target's tensor, frozen, and not a parameter
        assert loaded.embed_weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
        assert all("embed" not in n for n, _ in loaded.named_parameters())
        assert "embed_weight" in loaded._ddp_params_and_buffers_to_ignore  # constant: DDP skips its broadcast
        out = batch(target, drafter, seed=5)
        for (a, _), (b, _) in zip(drafter(out), loaded(out)):
            assert torch.equal(as_logits(a), as_logits(b))


def test_truncation_needs_token_counts(target):
    with pytest.raises(ValueError, match="token counts"):
        make(target, None, draft_vocab_size=VD)


def test_a_few_optimizer_steps_lower_the_loss(target, counts):
    drafter = make(target, counts, draft_vocab_size=VD)
    out = batch(target, drafter, length=24, seed=6)
    losses = train(drafter, out, steps=12)
    assert losses[-1] < 0.8 * losses[0], losses
    assert drafter.embed_weight.grad is None and not drafter.embed_weight.requires_grad


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
}


def with_rope(target, rope: dict):
    """The target model object with another rope_parameters (only the config is read)."""
    import copy

    other = copy.copy(target)
    other.config = copy.deepcopy(target.config)
    other.config.rope_parameters = dict(rope)
    return other


@pytest.mark.parametrize("kind", list(ROPES))
def test_rotary_embedding_equals_transformers(target, kind):
    """The head rotates q and k as transformers' LlamaRotaryEmbedding does for the same
    rope_parameters (inverse frequencies and YaRN's cos/sin factor), at positions well past the
    scaled types' original context; vLLM's equality is checked by the served test."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    scaled = with_rope(target, ROPES[kind])
    drafter = eagle3.build(scaled, TrainConfig(drafter="eagle3", num_heads=K))
    attn = drafter.midlayer.self_attn
    x = torch.randn(1, 2, 6, 32, generator=torch.Generator().manual_seed(0))  # [B, h, T, d]
    positions = torch.tensor([0, 1, 17, 63, 200, 511])
    ours = eagle3.rotate(x, positions, attn.inv_freq, attn.rope_scale)
    cos, sin = LlamaRotaryEmbedding(scaled.config)(x, positions[None])
    theirs, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert drafter.hf_config()["rope_parameters"] == ROPES[kind]  # vLLM builds its rope from this


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope_type 'dynamic' is not supported"),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16, "long_factor": [1.0] * 16,
      "original_max_position_embeddings": 64}, "rope_type 'longrope' is not supported"),
])
def test_sequence_length_dependent_rope_is_refused(target, rope, match):
    with pytest.raises(ValueError, match=match):
        eagle3.build(with_rope(target, rope), TrainConfig(drafter="eagle3", num_heads=K))


def test_scaled_rope_survives_export_and_load(target, tmp_path):
    scaled = with_rope(target, ROPES["llama3"])
    drafter = eagle3.build(scaled, TrainConfig(drafter="eagle3", num_heads=K))
    drafter.export(tmp_path / "head")
    loaded = eagle3.load(tmp_path / "head", scaled)
    assert loaded.g == drafter.g and loaded.g.rope == ROPES["llama3"]


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_fused_ttt_attention_equals_the_eager_one(steps, length):
    """The SDPA path (one masked attention over every step's keys) against the written-out one:
    values and gradients of q, k, v in fp32 to 1e-5 (only the summation order differs), and in
    bf16 to 2e-2 (bf16 keeps 8 mantissa bits; both paths round the scores differently)."""
    gen = torch.Generator().manual_seed(steps * 100 + length)

    def inputs(dtype):
        q = torch.randn(2, 4, length, 32, generator=gen).to(dtype).requires_grad_()
        cache = [(torch.randn(2, 4, length, 32, generator=gen).to(dtype).requires_grad_(),
                  torch.randn(2, 4, length, 32, generator=gen).to(dtype).requires_grad_()) for _ in range(steps)]
        return q, cache

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, cache = inputs(dtype)
        weights = torch.randn(2, 4, length, 32, generator=gen)
        outs, grads = [], []
        for fn in (eagle3.ttt_attention, eagle3.ttt_attention_eager):
            out = fn(q, cache, 32**-0.5)
            leaves = [q, *[t for kv in cache for t in kv]]
            grads.append(torch.autograd.grad((out.float() * weights).sum(), leaves))
            outs.append(out.float())
        assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol), float((outs[0] - outs[1]).abs().max())
        for fused, eager in zip(*grads):
            assert torch.allclose(fused.float(), eager.float(), atol=tol * 4, rtol=tol * 4), float((fused - eager).abs().max())


def test_ttt_mask_reads_step_one_causally_and_later_steps_on_the_diagonal():
    mask = eagle3.ttt_mask(3, 3, "cpu")
    expected = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0, 1, 0],
                             [1, 1, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)

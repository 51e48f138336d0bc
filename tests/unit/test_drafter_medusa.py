"""training.drafters.medusa: vLLM's MedusaModel math, head k paired with target row t+k, the
export layout vLLM loads (tests/heads.py::write_medusa), export -> load, and that it trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.heads import write_medusa
from tests.unit.drafter_data import config, expected_pairs, real_batch, synthetic_batch, target_model, train  # noqa: F401
from training.drafters import load_drafter, medusa
from training.drafters.base import as_logits


def randomised(drafter: medusa.MedusaDrafter, seed: int = 0) -> medusa.MedusaDrafter:
    """Non-zero residual weights, so every head differs (a fresh build's blocks are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return drafter


def test_fresh_heads_are_the_targets_own_next_token_head(target_model):
    """Zero residual weights + copied lm_head: every head's logits at row t are the target's row t
    (which also shows hidden_states[L] is the final normed state lm_head reads)."""
    model, _ = target_model
    drafter = medusa.build(model, config("medusa", medusa_num_layers=2))
    assert (drafter.kind, drafter.vllm_method, drafter.default_eta) == ("medusa", "medusa", 10.0)
    assert drafter.hidden_layers == (model.config.num_hidden_layers,)
    assert all(len(block.layers) == 2 for block in drafter.blocks) and len(drafter.blocks) == 3
    target = real_batch(target_model)
    for logits in drafter.head_logits(target.hidden_states[-1]):
        torch.testing.assert_close(logits, target.all_logits(), atol=1e-4, rtol=1e-4)


def test_residual_block_is_vllms_formula():
    drafter = randomised(medusa.MedusaDrafter(hidden_size=8, vocab_size=11, num_heads=2, num_layers=2, target_layers=3))
    x = torch.randn(5, 8)
    for k in range(2):
        y = x
        for layer in drafter.blocks[k].layers:  # x = x + silu(W x), layer after layer, no bias
            y = y + torch.nn.functional.silu(y @ layer.weight.T)
        torch.testing.assert_close(drafter.head_logits(x)[k], y @ drafter.lm_heads[k].weight.T)


def test_head_k_is_paired_with_target_row_t_plus_k():
    drafter = randomised(medusa.MedusaDrafter(hidden_size=8, vocab_size=11, num_heads=3, num_layers=1, target_layers=2))
    target = synthetic_batch(layers=2, hidden=8, vocab=11, length=9)
    pairs = drafter(target)
    expected = expected_pairs(drafter.head_logits(target.hidden_states[2]), target)
    assert len(pairs) == 3
    for (draft, ref), (want_draft, want_ref) in zip(pairs, expected):
        assert draft.shape == want_draft.shape and draft.shape[1] == 11
        torch.testing.assert_close(as_logits(draft), want_draft)
        torch.testing.assert_close(as_logits(ref), want_ref)


def test_a_head_reads_only_its_anchor_row():
    drafter = randomised(medusa.MedusaDrafter(hidden_size=8, vocab_size=11, num_heads=3, num_layers=1, target_layers=2))
    hidden = torch.randn(2, 7, 8)
    changed = hidden.clone()
    changed[:, 4] += 1.0
    for before, after in zip(drafter.head_logits(hidden), drafter.head_logits(changed)):
        differs = (before - after).abs().amax(-1) > 0  # [B, T]
        assert differs[:, 4].all() and not differs[:, :4].any() and not differs[:, 5:].any()


def test_export_has_vllms_layout_and_loads_back_identically(tiny_target, target_model, tmp_path):
    model, _ = target_model
    drafter = randomised(medusa.build(model, config("medusa")))
    drafter.export(tmp_path / "medusa")
    reference = write_medusa(tiny_target, tmp_path / "reference", num_heads=3)
    ours, theirs = load_file(str(tmp_path / "medusa/model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours_config = json.loads((tmp_path / "medusa/config.json").read_text())
    theirs_config = json.loads((reference / "config.json").read_text())
    assert {k: ours_config[k] for k in theirs_config} == theirs_config

    loaded = load_drafter(tmp_path / "medusa", model)
    assert isinstance(loaded, medusa.MedusaDrafter)
    target = real_batch(target_model)
    for (a, ta), (b, tb) in zip(drafter(target), loaded(target)):
        assert torch.equal(as_logits(a), as_logits(b)) and torch.equal(as_logits(ta), as_logits(tb))


def test_truncated_vocabulary_exports_a_token_map_and_loads_back(target_model, tmp_path):
    """--draft-vocab-size: each lm_head keeps the target's rows of the most frequent tokens, the
    export carries vLLM's token_map (draft id -> target id, int64) and truncated_vocab_size, and
    load() rebuilds the same heads."""
    model, _ = target_model
    counts = torch.arange(512) % 97  # a fixed, uneven frequency table
    drafter = medusa.build(model, config("medusa", draft_vocab_size=100), counts)
    ids = drafter.draft_ids
    assert ids.shape == (100,) and torch.equal(ids, ids.sort().values) and set(range(5)) <= set(ids.tolist())
    assert all(head.weight.shape == (100, model.config.hidden_size) for head in drafter.lm_heads)
    torch.testing.assert_close(drafter.lm_heads[0].weight, model.get_output_embeddings().weight[ids])
    randomised(drafter).export(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["token_map"].dtype == torch.int64 and torch.equal(tensors["token_map"], ids)
    assert json.loads((tmp_path / "config.json").read_text())["truncated_vocab_size"] == 100
    loaded = medusa.load(tmp_path, model)
    target = real_batch(target_model)
    assert torch.equal(loaded.draft_ids, ids)
    for (a, _), (b, _) in zip(drafter(target), loaded(target)):
        assert a.shape[-1] == 100 and torch.equal(as_logits(a), as_logits(b))


def test_truncation_needs_token_counts_and_a_consistent_checkpoint(target_model, tmp_path):
    model, _ = target_model
    with pytest.raises(ValueError, match="token counts"):
        medusa.build(model, config("medusa", draft_vocab_size=100))
    medusa.build(model, config("medusa")).export(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, truncated_vocab_size=100)))
    with pytest.raises(ValueError, match="token_map"):
        medusa.load(tmp_path, model)


def test_draft_vocab_size_is_refused_where_it_means_nothing():
    for kind in ("mlp", "draft-model"):
        with pytest.raises(ValueError, match="eagle3 and medusa"):
            config(kind, draft_vocab_size=100)


def test_a_few_steps_lower_the_loss(target_model):
    torch.manual_seed(0)
    model, _ = target_model
    drafter = medusa.build(model, config("medusa"))
    # a fresh build is the target's own next-token head, which on a near-context-free tiny target
    # can already be close to optimal; start the residual blocks away from the identity instead
    with torch.no_grad():
        for block in drafter.blocks:
            block.layers[0].weight.normal_(0.0, drafter.hidden_size**-0.5)
    losses = train(drafter, real_batch(target_model), steps=15)
    assert losses[-1] < 0.9 * losses[0], losses

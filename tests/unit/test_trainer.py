"""The trainer's pieces (batches, masks, schedule) and a short in-process run of each outcome:
finished (files, metadata, export loads back), diverged (NaN → stop, last good checkpoint kept),
refused (resume with another config; an existing run without --resume; bad data)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.training_checks import assert_same_training
from training import trainer
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.data import DataError, Example, collate
from training.drafters import load_drafter
from training.target import load_target
from training.train_config import TrainConfig
from vllm_lk.errors import InvalidInput, UserError

QUICK = dict(drafter="draft-model", steps=4, batch_size=4, seq_len=96, warmup_steps=1, checkpoint_every=2, log_every=1, eval_sequences=4)


def test_collate_masks_rows_whose_next_token_is_a_response_token():
    examples = [Example(line=1, token_ids=(5, 6, 7, 8, 9), response_start=3), Example(line=2, token_ids=(5, 6, 7), response_start=1)]
    ids, mask = collate(examples, seq_len=16, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    # row t trains the prediction of token t+1: rows 2, 3 predict 8, 9; rows 0, 1 predict 6, 7
    assert mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]


def test_collate_truncates_to_seq_len():
    ids, mask = collate([Example(line=1, token_ids=tuple(range(10, 30)), response_start=2)], seq_len=8, pad_id=0)
    assert ids.shape == (1, 8) and mask[0].tolist() == [False, True, True, True, True, True, True, False]


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    first = [trainer.batch_indices(s, 10, 4, seed=3) for s in range(5)]
    assert first == [trainer.batch_indices(s, 10, 4, seed=3) for s in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert first != [trainer.batch_indices(s, 10, 4, seed=4) for s in range(5)]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(lr=1.0, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    lrs = [trainer.lr_at(s, config) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0.1
    assert math.isclose(trainer.lr_at(20, config), 0.1)


def test_heldout_examples_are_never_trained_on():
    examples = [Example(line=i, token_ids=(1, 2), response_start=1) for i in range(30)]
    train_set, held = trainer.split_examples(examples, 5, seed=0)
    assert len(held) == 5 and not {e.line for e in held} & {e.line for e in train_set}
    with pytest.raises(ValueError, match="leaves no training data"):
        trainer.split_examples(examples, 30, seed=0)


@pytest.fixture(scope="module")
def finished_run(tiny_target, tiny_train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(**QUICK)
    return out, config, trainer.train(config, tiny_target, tiny_train_data, out)


def test_a_run_writes_metrics_checkpoints_tensorboard_and_an_export(finished_run):
    out, config, result = finished_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(0 < r["alpha"][0] < 1 and r["loss"] > 0 and r["rows"] > 0 for r in lines)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    assert latest_checkpoint(out).name == "step-000004"
    metadata = json.loads((out / "drafter" / "lk_metadata.json").read_text())
    assert metadata["loss"] == "lk-hybrid" and metadata["eta"] == 3.0 and metadata["gamma"] == 0.8
    assert metadata["offline_alpha"] == result["offline_alpha"] and 0 < metadata["offline_alpha"][0] < 1
    alpha = metadata["offline_alpha"][0]
    assert math.isclose(metadata["predicted_tau"], 1 + alpha + alpha**2 + alpha**3)
    assert len(metadata["data"]["sha256"]) == 64 and metadata["train_config"] == config.model_dump(mode="json")


def test_the_export_loads_back_with_the_trained_weights(finished_run, tiny_target):
    out, _, _ = finished_run
    target_model, _ = load_target(tiny_target)
    loaded = load_drafter(out / "drafter", target_model)
    trained = load_checkpoint(latest_checkpoint(out))["drafter"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_an_existing_run_needs_resume_and_the_same_config(finished_run, tiny_target, tiny_train_data):
    out, config, _ = finished_run
    with pytest.raises(UserError, match="--resume"):
        trainer.train(config, tiny_target, tiny_train_data, out)
    with pytest.raises(UserError, match="differs from the checkpoint's in lr"):
        trainer.train(config.model_copy(update={"lr": 5e-3}), tiny_target, tiny_train_data, out, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_target, tiny_train_data, tmp_path, monkeypatch):
    real = trainer.multi_head_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, alphas = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), alphas

    monkeypatch.setattr(trainer, "multi_head_loss", poisoned)
    with pytest.raises(trainer.TrainingDiverged, match=r"step 3.*last good checkpoint \(step 2\)"):
        trainer.train(TrainConfig(**QUICK), tiny_target, tiny_train_data, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert "error" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert not (tmp_path / "run" / "drafter").exists()


def test_bad_training_data_is_refused_before_training(tiny_target, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "prompt_token_ids": [1, 2], "completion_token_ids": [3]}\n{"prompt": "b", "prompt_token_ids": [1], "completion_token_ids": [99999]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'completion_token_ids' has token id 99999"):
        trainer.train(TrainConfig(**QUICK), tiny_target, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_draft_width_the_target_heads_cannot_split_is_refused(tiny_target, tiny_train_data, tmp_path):
    with pytest.raises(ValueError, match="multiple of the target's head_dim"):
        trainer.train(TrainConfig(**QUICK, draft_hidden_size=48), tiny_target, tiny_train_data, tmp_path / "run")


def test_a_cached_target_trains_like_the_online_one(tiny_target, tiny_train_data, tmp_path):
    """Over 2.5 epochs, batches read back from the disk cache give the weights the online target
    forward gives (atol 1e-6: the cache was computed in batches of other shapes)."""
    data = tmp_path / "small.jsonl"
    data.write_text("".join(tiny_train_data.read_text().splitlines(keepends=True)[:12]))
    config = TrainConfig(**{**QUICK, "drafter": "medusa", "steps": 5, "checkpoint_every": 5})
    trainer.train(config, tiny_target, data, tmp_path / "online")
    trainer.train(config.model_copy(update={"cache_target": True}), tiny_target, data, tmp_path / "cached")
    entries = list((tmp_path / "cached" / "target-cache-rank0").glob("*.safetensors"))
    assert len(entries) == 8  # every training example once, reused in later epochs
    online, cached = final_state(tmp_path / "online"), final_state(tmp_path / "cached")
    for name in online:
        assert torch.allclose(online[name], cached[name], atol=1e-6, rtol=0), name


def last_loss(run_dir) -> float:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r][-1]


def final_state(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["drafter"]


@pytest.mark.parametrize("loss", ["kl", "lk-alpha"])
def test_gradient_accumulation_takes_the_same_step(tiny_target, tiny_train_data, tmp_path, loss):
    """grad_accum = 3 runs each batch as 3 micro-batches (rows of uneven count) and must give the
    weights one pass gives, for per-row-mean losses (atol 1e-6 after 3 AdamW steps: only the
    summation order of the gradients differs)."""
    config = TrainConfig(**{**QUICK, "steps": 3, "checkpoint_every": 3, "loss": loss, "batch_size": 7})
    trainer.train(config, tiny_target, tiny_train_data, tmp_path / "one")
    trainer.train(config.model_copy(update={"grad_accum": 3}), tiny_target, tiny_train_data, tmp_path / "three")
    one, three = final_state(tmp_path / "one"), final_state(tmp_path / "three")
    worst = max(float((one[k] - three[k]).abs().max()) for k in one)
    assert worst < 1e-6, worst


@pytest.mark.parametrize("drafter", ["eagle3", "medusa", "mlp", "draft-model"])
def test_a_bf16_target_trains_every_drafter(tiny_target, tiny_train_data, tmp_path, drafter):
    """target_dtype bf16 (the default on CUDA) halves the frozen target's memory; every drafter
    still trains in fp32 on its fp32-cast outputs and exports. The loss after 2 steps is within
    5 % of the fp32 target's (bf16 target logits differ by ~1e-2)."""
    base = {**QUICK, "drafter": drafter, "steps": 2, "checkpoint_every": 2}
    if drafter == "eagle3":
        base["num_heads"] = 2
    trainer.train(TrainConfig(**base, target_dtype="fp32"), tiny_target, tiny_train_data, tmp_path / "fp32")
    bf16 = trainer.train(TrainConfig(**base, target_dtype="bf16"), tiny_target, tiny_train_data, tmp_path / "bf16")
    assert all(0 < a <= 1 for a in bf16["offline_alpha"])
    losses = [last_loss(tmp_path / name) for name in ("fp32", "bf16")]
    assert abs(losses[1] - losses[0]) <= 0.05 * abs(losses[0]), losses
    assert (tmp_path / "bf16" / "drafter" / "config.json").is_file()


@pytest.mark.parametrize("drafter", ["eagle3", "medusa", "mlp", "draft-model", "eagle3-vocab", "medusa-vocab"])
def test_chunked_draft_logits_and_activation_checkpointing_take_the_same_steps(tiny_target, tiny_train_data, tmp_path, drafter):
    """The default path (draft and target logits computed per chunk from the heads' input rows;
    with a truncated draft vocabulary ("-vocab", 300 of 512 ids) the target side restricted to it
    plus the full vocabulary's logsumexp) and activation checkpointing must train the weights the
    materialised, fully stored path trains after 2 AdamW steps: only the order of floating-point
    sums differs. LK-hybrid has min(p, q)'s kink, so the bulk is compared (assert_same_training:
    median < 2e-7, 90th percentile < 1e-5): "medusa-vocab" had one element 1.0e-4 apart on a
    2026-12-04 machine, where its worst had been below 1e-5 before."""
    drafter, truncated, _ = drafter.partition("-vocab")
    base = {**QUICK, "drafter": drafter, "steps": 2, "checkpoint_every": 2, "loss": "lk-hybrid",
            **({"draft_vocab_size": 300} if truncated else {})}
    if drafter == "eagle3":
        base["num_heads"] = 2
    runs = {
        "materialised": {"materialise_draft_logits": True, "materialise_target_logits": True},
        "chunked": {},
        "checkpointed": {"activation_checkpointing": True},
    }
    for name, update in runs.items():
        trainer.train(TrainConfig(**base, **update), tiny_target, tiny_train_data, tmp_path / name)
    want = final_state(tmp_path / "materialised")
    for name in ("chunked", "checkpointed"):
        assert_same_training(want, final_state(tmp_path / name), smooth=False)


def test_a_bf16_target_caches_bf16_entries_and_trains_like_the_online_one(tiny_target, tiny_train_data, tmp_path):
    """A bf16 target's cache holds bf16 tensors (half of fp32: the values it computed, exactly) and
    the run under bf16 autocast trains the weights the online run trains (atol 1e-6)."""
    from safetensors.torch import load_file

    data = tmp_path / "small.jsonl"
    data.write_text("".join(tiny_train_data.read_text().splitlines(keepends=True)[:12]))
    config = TrainConfig(**{**QUICK, "drafter": "eagle3", "num_heads": 2, "steps": 4, "checkpoint_every": 4,
                            "target_dtype": "bf16", "precision": "bf16"})
    trainer.train(config, tiny_target, data, tmp_path / "online")
    trainer.train(config.model_copy(update={"cache_target": True}), tiny_target, data, tmp_path / "cached")
    entry = load_file(str(next((tmp_path / "cached" / "target-cache-rank0").glob("*.safetensors"))))
    assert entry and all(t.dtype == torch.bfloat16 for t in entry.values()), {k: t.dtype for k, t in entry.items()}
    online, cached = final_state(tmp_path / "online"), final_state(tmp_path / "cached")
    for name in online:
        assert torch.allclose(online[name], cached[name], atol=1e-6, rtol=0), name


def test_a_sharded_target_needs_the_same_target_forwards_on_every_rank():
    """Every forward of an FSDP-sharded target is a collective: configurations that give ranks
    different numbers of micro-batches (or a per-rank cache fill) are refused before any work."""
    from training.parallel import Dist, check_target_sharding

    two = Dist(rank=0, world=2)
    check_target_sharding(TrainConfig(fsdp_target=True, batch_size=4, grad_accum=2), two)
    check_target_sharding(TrainConfig(fsdp_target=True, batch_size=1), Dist())  # one process: nothing to shard
    with pytest.raises(InvalidInput, match="different numbers of target forwards"):
        check_target_sharding(TrainConfig(fsdp_target=True, batch_size=3, grad_accum=2), two)
    with pytest.raises(InvalidInput, match="cannot be combined"):
        check_target_sharding(TrainConfig(fsdp_target=True, batch_size=4, cache_target=True), two)

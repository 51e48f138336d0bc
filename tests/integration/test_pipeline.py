"""The whole training pipeline as a user runs it, for every drafter kind: regenerate data with the
target in vLLM (`generate`), train with LK-hybrid (`train`, which exports), serve the export in a
real vLLM engine with the plugin (`eval`) and compare served acceptance with the offline
prediction made by the training code on the same sequences. A drafter whose training-time math
differs from what vLLM serves shows up here as served acceptance far below the prediction."""

from __future__ import annotations

import json
import math

import pytest

from training.evaluate import EvalConfig, evaluate_pair
from training.generate import GenerateConfig, generate
from training.train_config import TrainConfig
from training.trainer import train

pytestmark = pytest.mark.integration

K = 3
# EAGLE-3 with a truncated draft vocabulary (300 of the tiny target's 512 ids)
EXTRA = {"eagle3": {"draft_vocab_size": 300}, "draft-model": {"draft_num_layers": 1}}


@pytest.fixture(scope="module")
def regenerated(tiny_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "train.jsonl"
    generate(GenerateConfig(target=tiny_target, prompts="builtin:code:train:64", max_tokens=64, temperature=1.0, gpu_memory_utilization=0.1), out)
    return out


@pytest.mark.parametrize("kind", ["draft-model", "medusa", "mlp", "eagle3"])
def test_trained_drafter_serves_with_the_predicted_acceptance(kind, tiny_target, regenerated, tmp_path):
    config = TrainConfig(
        drafter=kind, loss="lk-hybrid", num_heads=K, steps=80, batch_size=8, seq_len=128, lr=3e-3,
        warmup_steps=5, eval_sequences=8, checkpoint_every=80, **EXTRA.get(kind, {}),
    )
    result = train(config, tiny_target, regenerated, tmp_path / "run")
    metadata = json.loads((tmp_path / "run" / "drafter" / "lk_metadata.json").read_text())
    assert metadata["drafter"] == kind and len(metadata["offline_alpha"]) == (1 if kind == "draft-model" else K)

    evaluation = evaluate_pair(EvalConfig(
        target=tiny_target, drafter=result["drafter_dir"], prompts="builtin:code:heldout:24",
        temperature=1.0, num_speculative_tokens=K, max_tokens=48, gpu_memory_utilization=0.1,
    ))
    served, offline = evaluation["served"], evaluation["offline"]
    assert all(0 < a <= 1 for a in served["per_position_acceptance"]), served
    assert served["tau"] > 1.0
    # Position 1: the prediction is the mean alpha over the same generated rows; the served rate is
    # a binomial estimate over the verification steps. 4 sigma (false-failure rate ~6e-5) plus
    # 0.05 for which rows serving verifies (steps start after accepted runs, not at every row).
    drafted = served["drafted_per_position"][0]
    predicted = offline["per_position_acceptance"][0]
    sigma = math.sqrt(predicted * (1 - predicted) / drafted)
    assert abs(served["per_position_acceptance"][0] - predicted) < 4 * sigma + 0.05, (served, offline)

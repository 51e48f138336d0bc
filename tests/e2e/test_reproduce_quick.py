"""`vllm-lk bench reproduce --quick` end to end on the tiny target, through the CLI: real
generation, training, vLLM serving with the plugin, throughput; then a rerun that must reuse
everything (no engine, no training) and write the same numbers.

~4-5 min on 2 busy cores (7 engine starts dominate), ~3 min on quiet ones: marked slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from server.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# the quick preset, shrunk to the tiny target (vocab 512, context 512, width 64)
TINY = {
    "steps": 8, "seq_len": 128, "num_speculative_tokens": 3, "draft_vocab_size": 300,
    "train_code_prompts": 24, "train_docstring_prompts": 8, "train_max_tokens": 48,
    "heldout_prompts": 4, "eval_max_tokens": 32, "throughput_prompts": 2, "gpu_memory_utilization": 0.05,
}


def fmt(value: float) -> str:
    return f"{value:.3f}"


def test_quick_reproduction_end_to_end_and_resume(tiny_target, tmp_path, monkeypatch):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "results"
    argv = ["bench", "reproduce", "--quick", "--target", str(tiny_target), "--out", str(out), "--config", str(config_file)]
    assert main(argv) == 0

    report = json.loads((out / "reproduction.json").read_text())
    config = report["config"]
    assert config["drafters"] == ["medusa", "eagle3"] and config["losses"] == ["kl", "lk-hybrid"]  # the quick preset
    assert config["steps"] == 8 and config["num_speculative_tokens"] == 3  # YAML over the preset
    assert config["temperatures"] == [0.0, 1.0] and config["heldout_sets"] == ["code", "docstring"]

    # every figure traceable: the data file and hash, each run's directories, each evaluation's file
    from training.export import file_sha256

    assert file_sha256(report["data"]["path"]) == report["data"]["sha256"]
    assert len(report["runs"]) == 4
    for run in report["runs"].values():
        metadata = json.loads((Path(run["drafter_dir"]) / "lk_metadata.json").read_text())
        assert metadata["data"]["sha256"] == report["data"]["sha256"] and metadata["loss"] == run["loss"]

    rows = report["table"]
    assert len(rows) == 2 * 2 * 2 * 2  # drafter x loss x T x set
    for row in rows:
        assert 1.0 <= row["served_tau"] <= 1 + 3 and 1.0 <= row["predicted_tau"] <= 1 + 3
        (source,) = row["sources"]
        pair = json.loads(Path(source).read_text())
        (combo,) = [c for c in pair["combos"] if c["set"] == row["set"] and c["temperature"] == row["temperature"]]
        assert combo["served"]["tau"] == row["served_tau"] and combo["offline"]["tau"] == row["predicted_tau"]
        assert combo["served"]["requests"] == TINY["heldout_prompts"]
        kl = next(r for r in rows if (r["drafter"], r["loss"], r["temperature"], r["set"]) == (row["drafter"], "kl", row["temperature"], row["set"]))
        assert math.isclose(row["served_gain_over_kl"], row["served_tau"] / kl["served_tau"] - 1)
    assert len(report["agreement"]) == len(rows)  # one seed: one evaluation per row, reported not asserted

    speed = report["throughput"]
    assert [m["temperature"] for m in speed["measurements"]] == [0.0, 1.0]
    assert all(m["baseline_tokens_per_s"] > 0 and m["speculative_tokens_per_s"] > 0 for m in speed["measurements"])

    text = (out / "reproduction.md").read_text()
    for row in rows:
        assert f"| {row['drafter']} | {row['loss']} | {row['temperature']:g} | {row['set']} | {fmt(row['served_tau'])} | {fmt(row['predicted_tau'])} |" in text
    assert "within 3 %" in text and "Decode throughput" in text
    png = (out / "reproduction.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a rerun reuses the data, every training, every evaluation and the throughput
    def refuse(*args, **kwargs):
        raise AssertionError("a finished reproduction must not start an engine or train again")

    monkeypatch.setattr("training.generate.make_llm", refuse)
    monkeypatch.setattr("training.trainer.train", refuse)
    assert main(argv) == 0
    again = json.loads((out / "reproduction.json").read_text())
    for key in ("table", "throughput", "data", "runs"):  # compared as JSON text: NaN == NaN there
        assert json.dumps(again[key]) == json.dumps(report[key]), key

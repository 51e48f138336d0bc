"""`vllm-lk bench reproduce` without an engine: the table and gain arithmetic, the agreement
report, the markdown/plot rendering, the config precedence and the resume bookkeeping."""

from __future__ import annotations

import json
import math

import pytest

from training.bench import reproduce_report as rep
from training.bench.reproduce import (
    ReproduceConfig,
    eval_records,
    eval_settings,
    finished_training,
    load_config,
    pending_combos,
    recorded_seconds,
    train_pair,
)


def record(drafter, loss, seed, kind, t, served, predicted, acc=(0.5,)):
    return {"drafter": drafter, "loss": loss, "seed": seed, "set": kind, "temperature": t, "served_tau": served,
            "predicted_tau": predicted, "predicted_tau_at_steps": served * 1.01, "served_tau_se": 0.02 * served, "served_acceptance": list(acc),
            "predicted_acceptance": list(acc), "source": f"{drafter}-{loss}-{seed}"}


RECORDS = [
    record("medusa", "kl", 0, "code", 1.0, 2.0, 2.0),
    record("medusa", "kl", 1, "code", 1.0, 2.2, 2.1),
    record("medusa", "lk-hybrid", 0, "code", 1.0, 2.3, 2.2),
    record("medusa", "lk-hybrid", 1, "code", 1.0, 2.5, 2.6),
    record("medusa", "tv", 0, "code", 1.0, 1.8, 1.9),
    record("medusa", "tv", 1, "code", 1.0, 1.8, 1.9),
]


def test_table_means_over_seeds_and_gain_over_kl():
    rows = {r["loss"]: r for r in rep.table(RECORDS)}
    # restated: tau(KL) = mean(2.0, 2.2) = 2.1; tau(LK) = mean(2.3, 2.5) = 2.4 -> gain 2.4 / 2.1 - 1
    assert rows["kl"]["served_tau"] == pytest.approx(2.1)
    assert rows["kl"]["served_tau_per_seed"] == [2.0, 2.2]
    assert rows["kl"]["served_gain_over_kl"] == pytest.approx(0.0)
    assert rows["lk-hybrid"]["served_gain_over_kl"] == pytest.approx(2.4 / 2.1 - 1)
    assert rows["lk-hybrid"]["predicted_gain_over_kl"] == pytest.approx(2.4 / 2.05 - 1)
    assert rows["tv"]["served_gain_over_kl"] == pytest.approx(1.8 / 2.1 - 1)
    assert rows["tv"]["served_acceptance_1"] == pytest.approx(0.5)


def test_gain_is_nan_without_a_kl_row_and_rows_follow_the_config_order():
    rows = rep.table([r for r in RECORDS if r["loss"] != "kl"], order={"loss": ["tv", "lk-hybrid"]})
    assert [r["loss"] for r in rows] == ["tv", "lk-hybrid"]
    assert all(math.isnan(r["served_gain_over_kl"]) for r in rows)


def test_gain_compares_only_the_same_drafter_temperature_and_set():
    records = [record("medusa", "kl", 0, "code", 1.0, 2.0, 2.0), record("medusa", "kl", 0, "code", 0.0, 4.0, 4.0),
               record("eagle3", "kl", 0, "code", 1.0, 3.0, 3.0), record("medusa", "lk-alpha", 0, "code", 1.0, 2.2, 2.2)]
    (row,) = [r for r in rep.table(records) if r["loss"] == "lk-alpha"]
    assert row["served_gain_over_kl"] == pytest.approx(0.1)
    assert rep.gain_summary(rep.table(records), 1.0) == {"medusa": {"lk-alpha": pytest.approx(0.1)}}


def test_agreement_is_reported_per_evaluation_not_asserted():
    rows = rep.agreement(RECORDS, tolerance=0.03)
    assert len(rows) == len(RECORDS)
    by_seed = {(r["loss"], r["seed"]): r for r in rows}
    assert by_seed[("kl", 0)]["within_tolerance"] and by_seed[("kl", 0)]["served_vs_predicted"] == 0
    assert not by_seed[("kl", 1)]["within_tolerance"]  # 2.2 / 2.1 - 1 = +4.8 %
    assert by_seed[("lk-hybrid", 1)]["served_vs_predicted"] == pytest.approx(2.5 / 2.6 - 1)
    assert not rep.agreement([record("m", "kl", 0, "code", 1.0, math.nan, 2.0)], 0.03)[0]["within_tolerance"]


def test_best_pair_averages_over_sets_at_the_temperature():
    records = RECORDS + [record("medusa", "lk-hybrid", 1, "docstring", 1.0, 1.0, 1.0), record("medusa", "tv", 0, "code", 0.0, 9.0, 9.0)]
    assert rep.best_pair(records, 1.0) == ("medusa", "lk-hybrid", 0)
    assert rep.best_pair(records, 0.5) is None


def report_for(tmp_path, records):
    config = ReproduceConfig.quick(drafters=["medusa"], losses=["kl", "tv", "lk-hybrid"], seeds=[0, 1], heldout_sets=["code"], temperatures=[1.0])
    return {
        "out": str(tmp_path), "config": config.model_dump(mode="json"), "target": {"path": "/t"},
        "data": {"path": "/d.jsonl", "sha256": "ab" * 32, "examples": 3}, "table": rep.table(records, {"loss": config.losses}),
        "agreement": rep.agreement(records, 0.03), "plot": str(tmp_path / "reproduction.png"),
        "throughput": {"pair": {"drafter": "medusa", "loss": "lk-hybrid", "seed": 1}, "prompts": "p", "concurrency": 1,
                       "measurements": [{"temperature": 1.0, "baseline_tokens_per_s": 100.0, "speculative_tokens_per_s": 150.0, "speedup": 1.5, "tau": 2.5}]},
        "timings": {"total": 12.0}, "recorded_seconds": {"train_runs": 300.0, "serving": 40.0, "offline_prediction": 5.0},
    }


def test_markdown_and_plot(tmp_path):
    report = report_for(tmp_path, RECORDS)
    text = rep.markdown(report)
    assert "| medusa | lk-hybrid | 1 | code | 2.400 | 2.400 | +0.0 % | 2.424 | -1.0 % | +14.3 % | +17.1 % | 0.500 |" in text
    assert "| medusa | tv | 1 | code | 1.800 |" in text
    assert "T=1, medusa: served τ gain over KL (mean over sets): tv -14.3 %, lk-hybrid +14.3 %" in text
    assert "-0.0 %" not in text
    assert "served vs predicted τ (independent positions) within 3 %: 1 of 6 evaluations" in text
    assert "served vs predicted τ at the served steps within 3 %: 6 of 6 evaluations" in text
    assert "standard error is 2.0–2.0 % of τ; |served − predicted at the served steps| ≤ 2 standard errors in 6 of 6" in text
    assert "| 1 | 100.0 | 150.0 | 1.50× | 2.500 |" in text
    assert "| drafter | loss | T=1 code |" in text and "| medusa | lk-hybrid | 2.400 (+14.3 %) |" in text
    assert "| medusa | kl | 2.100 |" in text  # seed mean, no gain column for the baseline
    assert "whenever it ran (s): train runs 300, serving 40, offline prediction 5" in text
    png = rep.plot(report, tmp_path / "reproduction.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tau_standard_error_from_per_position_counts():
    """Steps accepting (0, 1, 2, 2) drafts: per-position counts (3, 2); N has mean 1.25, variance 0.6875."""
    assert rep.tau_standard_error([3, 2], 4) == pytest.approx(math.sqrt(0.6875 / 4))
    assert math.isnan(rep.tau_standard_error([0, 0], 0))


def test_finetuned_rows_gain_over_the_head_finetuned_with_kl():
    """Rows "kl+B" (the KL head fine-tuned with B, same extra steps) compare with "kl+kl", not with
    the from-scratch KL row; "kl+kl" itself shows no gain."""
    records = [record("eagle3", "kl", 0, "code", 1.0, 2.0, 2.0), record("eagle3", "kl+kl", 0, "code", 1.0, 2.2, 2.2),
               record("eagle3", "kl+lk-hybrid", 0, "code", 1.0, 2.31, 2.42), record("eagle3", "lk-hybrid", 0, "code", 1.0, 2.1, 2.1)]
    rows = {r["loss"]: r for r in rep.table(records, order={"loss": ["kl", "lk-hybrid", "kl+kl", "kl+lk-hybrid"]})}
    assert list(rows) == ["kl", "lk-hybrid", "kl+kl", "kl+lk-hybrid"]
    assert rows["kl+lk-hybrid"]["served_gain_over_kl"] == pytest.approx(2.31 / 2.2 - 1)
    assert rows["kl+lk-hybrid"]["predicted_gain_over_kl"] == pytest.approx(2.42 / 2.2 - 1)
    assert rows["kl+kl"]["served_gain_over_kl"] == pytest.approx(0.0)
    assert rows["lk-hybrid"]["served_gain_over_kl"] == pytest.approx(0.05)
    assert set(rep.gain_summary(list(rows.values()), 1.0)["eagle3"]) == {"lk-hybrid", "kl+lk-hybrid"}


def test_finetune_config_starts_from_the_kl_export_for_the_extra_steps():
    config = ReproduceConfig(finetune_steps=40, warmup_steps=10)
    scratch = config.train_config("medusa", "lk-hybrid", 1)
    tuned = config.finetune_config("medusa", "lk-hybrid", 1, "/runs/medusa-kl-s1/drafter")
    assert (tuned.init_from, tuned.steps, tuned.loss, tuned.seed) == ("/runs/medusa-kl-s1/drafter", 40, "lk-hybrid", 1)
    assert tuned.model_copy(update={"init_from": None, "steps": scratch.steps, "checkpoint_every": scratch.checkpoint_every,
                                    "log_every": scratch.log_every}) == scratch
    assert ReproduceConfig.quick().finetune_steps == 0 and ReproduceConfig().finetune_steps == 100


def test_a_finetuning_pair_trains_from_the_kl_runs_export(tiny_target, tiny_train_data, tmp_path):
    """What reproduce runs for a "kl+lk-hybrid" row, on the tiny target: the KL run, then a run
    initialised from its export with the fine-tuning loss and step count, recorded in lk_metadata."""
    from pathlib import Path

    config = ReproduceConfig(drafters=["medusa"], num_speculative_tokens=2, steps=1, finetune_steps=3, batch_size=2, seq_len=64,
                             warmup_steps=0, eval_sequences=2)
    kl = train_pair(config, tiny_target, tiny_train_data, tmp_path / "kl", "medusa", "kl", 0)
    tuned = train_pair(config, tiny_target, tiny_train_data, tmp_path / "tuned", "medusa", "kl+lk-hybrid", 0, init_from=kl["drafter_dir"])
    trained = json.loads((Path(tuned["drafter_dir"]) / "lk_metadata.json").read_text())["train_config"]
    assert trained["init_from"] == str(Path(kl["drafter_dir"]).resolve())
    assert (trained["loss"], trained["steps"], trained["drafter"]) == ("lk-hybrid", 3, "medusa")


def test_config_precedence_quick_then_yaml_then_flags(tmp_path):
    full, quick = ReproduceConfig(), ReproduceConfig.quick()
    assert full.num_speculative_tokens == quick.num_speculative_tokens == 5
    assert full.temperatures == quick.temperatures == [0.0, 1.0]
    assert set(full.drafters) == {"eagle3", "medusa", "mlp", "draft-model"} and len(full.losses) == 4
    assert quick.steps < full.steps and len(quick.drafters) * len(quick.losses) == 4
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("steps: 7\nlosses: [kl, tv]\n")
    config = load_config(True, yaml_file, losses=["kl"], seeds=None)
    assert (config.steps, config.losses, config.seeds, config.drafters) == (7, ["kl"], [0], quick.drafters)
    assert load_config(False, None).steps == full.steps
    with pytest.raises(ValueError):
        ReproduceConfig(losses=["bogus"])


def test_finished_training_reuses_only_the_same_config(tmp_path):
    config = ReproduceConfig.quick()
    train_config = config.train_config("medusa", "kl", 0)
    assert finished_training(tmp_path, train_config) is None  # nothing yet (or checkpoints only): train/resume
    (tmp_path / "result.json").write_text(json.dumps({"train_config": train_config.model_dump(mode="json"), "drafter_dir": "x"}))
    assert finished_training(tmp_path, train_config)["drafter_dir"] == "x"
    with pytest.raises(ValueError, match="another config"):
        finished_training(tmp_path, config.train_config("medusa", "kl", 1))
    assert config.train_config("eagle3", "kl", 0).draft_vocab_size == config.draft_vocab_size
    assert config.train_config("medusa", "kl", 0).draft_vocab_size is None
    assert train_config.num_heads == 5


def test_pending_combos_and_eval_records(tmp_path):
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "lk_metadata.json").write_text("{}")
    config = ReproduceConfig.quick()
    settings = eval_settings(config, str(drafter))
    combos = [("code", 0.0), ("code", 1.0), ("docstring", 0.0), ("docstring", 1.0)]
    eval_file = tmp_path / "evals" / "medusa-kl-s0.json"
    assert pending_combos(eval_file, settings, combos) == ([], combos)
    stored = {"set": "code", "temperature": 1.0, "served": {"tau": 1.5, "per_position_acceptance": [0.5], "accepted_per_position": [2], "verification_steps": 4},
              "offline": {"tau": 2.1, "per_position_acceptance": [0.55]}}
    eval_file.parent.mkdir()
    eval_file.write_text(json.dumps({"drafter": "medusa", "loss": "kl", "seed": 0, "settings": settings, "combos": [stored]}))
    done, todo = pending_combos(eval_file, settings, combos)
    assert done == [stored] and todo == [c for c in combos if c != ("code", 1.0)]
    # other settings (a retrained drafter, another K, other prompts): everything is served again
    assert pending_combos(eval_file, eval_settings(config.model_copy(update={"heldout_prompts": 3}), str(drafter)), combos)[1] == combos
    (drafter / "lk_metadata.json").write_text("{} ")
    import os

    os.utime(drafter / "lk_metadata.json", ns=(1, 1))
    assert pending_combos(eval_file, eval_settings(config, str(drafter)), combos)[1] == combos
    (rec,) = eval_records({str(eval_file): json.loads(eval_file.read_text())})
    assert (rec["drafter"], rec["loss"], rec["set"], rec["temperature"], rec["served_tau"], rec["predicted_tau"]) == ("medusa", "kl", "code", 1.0, 1.5, 2.1)
    assert rec["source"] == str(eval_file) and rec["served_tau_se"] == pytest.approx(0.25)  # N in {0, 0, 1, 1}


def test_cli_bench_reproduce_resolves_preset_yaml_and_flags(tmp_path, monkeypatch, capsys):
    from server.cli import main

    seen = {}

    def fake_reproduce(config, out):
        seen.update(config=config, out=out)
        return {"fake": True}

    monkeypatch.setattr("training.bench.reproduce.reproduce", fake_reproduce)
    monkeypatch.setattr("training.bench.reproduce.summary", lambda report: "SUMMARY")
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("steps: 7\nheldout_prompts: 3\n")
    argv = ["bench", "reproduce", "--quick", "--out", str(tmp_path / "o"), "--config", str(yaml_file),
            "--steps", "5", "--losses", "[kl, tv]", "--target", str(tmp_path)]
    assert main(argv) == 0
    config = seen["config"]
    assert (config.steps, config.heldout_prompts, config.losses, config.drafters) == (5, 3, ["kl", "tv"], ["medusa", "eagle3"])
    assert config.target == tmp_path and seen["out"] == tmp_path / "o"
    assert "SUMMARY" in capsys.readouterr().out
    assert main(["bench", "reproduce", "--steps", "9"]) == 0 and seen["config"].drafters == ReproduceConfig().drafters


def test_recorded_seconds_sum_the_run_files():
    runs = {"a": {"seconds": 100.0}, "b": {"seconds": None}, "c": {"seconds": 20.5}}
    combo = {"served": {"seconds": 3.0}, "offline": {"seconds": 1.0}}
    evaluations = {"e1": {"combos": [combo, combo]}, "e2": {"combos": [{"served": {"seconds": 4.0}, "offline": {}}]}}
    assert recorded_seconds(runs, evaluations) == {"train_runs": 120.5, "serving": 10.0, "offline_prediction": 2.0}

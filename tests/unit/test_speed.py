"""training.bench.speed's report arithmetic on synthetic records (the measurement itself runs real
engines: `vllm-lk bench speed`, exercised by tests/e2e)."""

import json

import pytest

from training.bench.speed import SpeedConfig, markdown, plot, policy_settings, round_order, settings_of, summarize


def record(round_index, drafter, mode, k, temperature, concurrency, tokens_per_s, tau=None, drafts=None):
    steps = 100 if tau else 0
    return {"block": "mlp", "round": round_index, "drafter": drafter, "mode": mode, "K": k, "temperature": temperature,
            "concurrency": concurrency, "tokens": int(tokens_per_s * 10), "seconds": 10.0, "steps": steps,
            "accepted": round((tau - 1) * steps) if tau else 0, "drafted": round(drafts * steps) if drafts else 0}


def test_speedup_is_against_the_same_rounds_baseline_and_c_solves_the_bound():
    config = SpeedConfig(drafters=["mlp"], ks=[1, 3], temperatures=[0.0], concurrency=[1], rounds=2)
    records = []
    for rnd, base in enumerate([200.0, 100.0]):  # round 2 runs on a machine twice as slow
        records += [record(rnd, None, "none", 0, 0.0, 1, base), record(rnd, None, "none", 0, 0.0, 1, base)]
        records.append(record(rnd, "mlp", "fixed", 1, 0.0, 1, 1.5 * base, tau=1.8, drafts=1))
        records.append(record(rnd, "mlp", "fixed", 3, 0.0, 1, 2.0 * base, tau=2.6, drafts=3))
        records.append(record(rnd, "mlp", "adaptive", 3, 0.0, 1, 2.2 * base, tau=2.4, drafts=2))
    rows = {(r["mode"], r["K"]): r for r in summarize(records, config)}
    assert rows[("none", 0)]["speedup"] == pytest.approx(1.0)
    assert rows[("fixed", 1)]["speedup"] == pytest.approx(1.5) and rows[("fixed", 1)]["speedup_min"] == pytest.approx(1.5)
    assert rows[("fixed", 3)]["tau"] == pytest.approx(2.6)
    c = ((1.8 / 1.5 - 1) / 1 + (2.6 / 2.0 - 1) / 3) / 2  # speedup = tau / (1 + K c), per fixed row
    assert rows[("fixed", 3)]["c"] == pytest.approx(c)
    assert rows[("adaptive", 3)]["bound"] == pytest.approx(2.4 / (1 + 2 * c))  # K = drafts per step
    assert rows[("adaptive", 3)]["drafts_per_step"] == pytest.approx(2.0)
    report = {"config": json.loads(config.model_dump_json()), "rows": list(rows.values()),
              "environment": {"platform": "test", "cpus": 2}}
    text = markdown(report)
    assert "| 0 | 1 | mlp | adaptive | – | " in text and "2.20× [2.20–2.20]" in text


def test_each_round_visits_no_speculation_twice_and_every_setting_back_to_back():
    config = SpeedConfig(drafters=["mlp", "eagle3"], ks=[1, 3], temperatures=[0.0, 1.0], concurrency=[1, 8])
    for round_index in range(3):
        visits = round_order(config, "mlp", round_index)
        assert len(visits) == (2 + 2 + 1) * 4
        assert sum(1 for (kind, _, _, _), _, _ in visits if kind is None) == 2 * 4
        groups = [(t, c) for _, t, c in visits]
        # each (T, concurrency) group's cells are adjacent: the group changes exactly 3 times
        assert sum(a != b for a, b in zip(groups, groups[1:])) == 3
        assert sorted(visits, key=repr) == sorted([(s, t, c) for s in settings_of(config, "mlp") for t in (0.0, 1.0)
                                                   for c in (1, 8)], key=repr)
    assert round_order(config, "mlp", 0) != round_order(config, "mlp", 1)  # a new order each round


def test_adaptive_variants_are_cells_rows_and_full_settings():
    config = SpeedConfig(drafters=["mlp"], ks=[1, 3], temperatures=[0.0], concurrency=[1], rounds=1,
                         adaptive_variants={"trim": {"trim": True}})
    assert [(mode, variant) for _, mode, _, variant in settings_of(config, "mlp") if mode == "adaptive"] == [("adaptive", None), ("adaptive", "trim")]
    assert policy_settings(config, None) == {"warmup_steps": 24, "explore_every": 16, "trim": False, "explore_all": False, "measured_arms": True, "paired_arms": True, "refresh_every": 8, "request_factors": True, "switch_margin": 0.03, "label": "default"}
    assert policy_settings(config, "trim")["trim"] is True and policy_settings(config, "trim")["warmup_steps"] == 24
    records = [record(0, None, "none", 0, 0.0, 1, 100.0)]
    records += [{**record(0, "mlp", "adaptive", 3, 0.0, 1, rate, 2.0, 2), "policy": label} for label, rate in (("default", 150.0), ("trim", 120.0))]
    rows = {r.get("policy"): r for r in summarize(records, config)}
    assert rows["default"]["speedup"] == pytest.approx(1.5) and rows["trim"]["speedup"] == pytest.approx(1.2)
    text = markdown({"config": json.loads(config.model_dump_json()), "rows": list(rows.values()), "environment": {"platform": "test", "cpus": 2}})
    assert "| mlp | adaptive | – | 150 |" in text and "| mlp | adaptive (trim) | – | 120 |" in text


def test_plot_writes_a_png(tmp_path):
    config = SpeedConfig(drafters=["mlp"], ks=[1, 3], temperatures=[0.0], concurrency=[1], rounds=1)
    records = [record(0, None, "none", 0, 0.0, 1, 100.0), record(0, "mlp", "fixed", 1, 0.0, 1, 120.0, 1.5, 1),
               record(0, "mlp", "fixed", 3, 0.0, 1, 130.0, 2.0, 3), record(0, "mlp", "adaptive", 3, 0.0, 1, 140.0, 1.9, 2)]
    plot({"rows": summarize(records, config)}, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_adaptive_rows_report_the_caps_planned_and_the_arms_measured():
    """An adaptive row sums its rounds' planned caps; the markdown shows their shares and the
    arms' ms per step the policy held for that cell's batch and mode (to tell a wrong choice from
    a wrong measurement)."""
    config = SpeedConfig(drafters=["mlp"], ks=[1, 2], temperatures=[0.0], concurrency=[1], rounds=2, prompts=4)
    records = [record(rnd, None, "none", 0, 0.0, 1, 100.0) for rnd in range(2)]
    arms = {"1:greedy": [0.005, 0.006, None], "1:sampled": [0.006, 0.008, 0.010]}
    records += [{**record(rnd, "mlp", "adaptive", 2, 0.0, 1, 150.0, 2.0, 1.5), "policy": "default",
                 "chosen": [0, 10 * (rnd + 1), 30], "arm_seconds": arms} for rnd in range(2)]
    rows = [r for r in summarize(records, config) if r["mode"] == "adaptive"]
    assert rows[0]["chosen"] == [0, 30, 60]
    text = markdown({"config": json.loads(config.model_dump_json()), "rows": rows, "records": records,
                     "environment": {"platform": "test", "cpus": 2}})
    assert "| 0 | 1 | mlp | adaptive | 0 % | 33 % | 67 % | 5.00 / 6.00 / – |" in text

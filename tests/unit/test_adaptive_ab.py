"""benchmarks/adaptive_ab.py's pairing: every setting runs in every position across rounds, and
adaptive is compared with the fixed K run beside it in the same round."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("adaptive_ab", Path(__file__).parents[2] / "benchmarks" / "adaptive_ab.py")
adaptive_ab = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(adaptive_ab)


def test_order_puts_every_setting_in_every_position():
    settings = ["K=3", "K=4", "K=5", "adaptive"]
    rounds = [adaptive_ab.order(settings, r) for r in range(8)]
    assert all(sorted(r) == sorted(settings) for r in rounds)
    for name in settings:
        assert {r.index(name) for r in rounds} == set(range(len(settings)))


def test_summarize_pairs_adaptive_with_its_round():
    cells = {"T=0, c=1": {"K=3": [100.0, 50.0], "K=4": [120.0, 60.0], "adaptive": [110.0, 66.0], "adaptive:argmax": [60.0, 60.0]}}
    (row,) = adaptive_ab.summarize(cells)
    assert row["best_fixed"] == "K=4"  # median 90 against 75
    # round 1: 110 / 120; round 2: 66 / 60 (the machine was twice as slow in round 2, for every setting)
    assert row["vs_round_best"]["adaptive"] == pytest.approx([(110 / 120 + 66 / 60) / 2, 110 / 120, 66 / 60])
    assert row["vs_best_fixed"]["adaptive"] == row["vs_round_best"]["adaptive"]
    assert row["vs_round_best"]["adaptive:argmax"] == pytest.approx([0.75, 0.5, 1.0])
    text = adaptive_ab.markdown([row])
    assert "| T=0, c=1 |" in text and "| adaptive:argmax |" in text

"""`vllm-lk bench adapt`'s measuring pieces: served tau from /metrics, its standard error, the traffic."""

from __future__ import annotations

import random
import statistics

import pytest

from training.bench.adapt import AdaptBenchConfig, chat_requests, counters, ratio_tau

METRICS = """# HELP vllm_lk_spec_verification_steps_total Verification steps of served requests
# TYPE vllm_lk_spec_verification_steps_total counter
vllm_lk_spec_verification_steps_total 120.0
vllm_lk_spec_verification_steps_created 1.7e9
vllm_lk_spec_accepted_tokens_total{position="0"} 90.0
vllm_lk_spec_accepted_tokens_total{position="1"} 60.0
vllm_lk_spec_accepted_tokens_created{position="0"} 1.7e9
vllm_lk_spec_drafted_tokens_total{position="0"} 120.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 999.0
# HELP vllm_lk_capture_records_total Served choices written to the capture directory
# TYPE vllm_lk_capture_records_total counter
vllm_lk_capture_records_total 42.0
"""


def test_counters_read_our_steps_the_sum_over_positions_and_the_captured_records():
    assert counters(METRICS) == {"steps": 120.0, "accepted": 150.0, "captured": 42.0}
    assert counters("") == {"steps": 0.0, "accepted": 0.0, "captured": 0.0}


def test_ratio_tau_is_one_plus_accepted_over_steps_with_the_ratio_estimator_error():
    rows = [(10, 20), (5, 5), (0, 0), (20, 30)]  # a request without a verification step is left out
    tau, se = ratio_tau(rows)
    r = 55 / 35
    assert tau == pytest.approx(1 + r)
    by_hand = (((20 - r * 10) ** 2 + (5 - r * 5) ** 2 + (30 - r * 20) ** 2) / (3 * 2)) ** 0.5 / (35 / 3)
    assert se == pytest.approx(by_hand)


def test_ratio_tau_standard_error_matches_the_spread_of_repeated_periods():
    """Simulated periods of 60 requests (random lengths, per-request acceptance that varies): the
    mean reported SE is within 15 % of the standard deviation of tau over 400 periods (the SD
    estimate from 400 draws has ~3.5 % relative error; the ratio estimator's SE is consistent)."""
    rng = random.Random(0)

    def period():
        rows = []
        for _ in range(60):
            steps, p = rng.randint(5, 40), rng.uniform(0.2, 0.8)
            rows.append((steps, sum(sum(rng.random() < p for _ in range(4)) for _ in range(steps))))
        return ratio_tau(rows)

    results = [period() for _ in range(400)]
    spread = statistics.stdev(t for t, _ in results)
    reported = statistics.fmean(se for _, se in results)
    assert reported == pytest.approx(spread, rel=0.15)


def test_chat_requests_never_repeat_a_prompt_and_periods_come_first(tmp_path):
    config = AdaptBenchConfig(requests_per_period=10, rounds=2, background_prompts=20)
    requests = chat_requests(config, tmp_path)  # a directory without toy metadata: the default corpus split
    assert len(requests) == 30 + 2 * config.background_prompts
    contents = [r["messages"][0]["content"] for r in requests]
    assert len(set(contents)) == len(contents)
    assert {r["max_tokens"] for r in requests} == {128} and len({r["seed"] for r in requests}) == len(requests)
    assert chat_requests(config, tmp_path) == requests  # same config, same traffic

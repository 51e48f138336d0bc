"""`vllm-lk bench speed` end to end on the tiny target and a tiny MLP speculator: real engines,
runtime switches between fixed K and adaptive speculation, the JSON / markdown / PNG report and
the step breakdown. (Speeds on tiny models mean nothing; the toy target's figures are in
docs/speed.md, made by the same command.)"""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_speed_writes_every_cell(tiny_target, tiny_mlp, tmp_path, monkeypatch):
    from vllm.v1.engine.llm_engine import LLMEngine

    from training.bench.speed import SpeedConfig, bench_speed

    in_flight_at_admission = []  # requests the real engine still holds whenever the bench admits one
    add_request = LLMEngine.add_request

    def counting_add_request(self, *args, **kwargs):
        in_flight_at_admission.append(self.get_num_unfinished_requests())
        return add_request(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", counting_add_request)
    config = SpeedConfig(target=tiny_target, drafters=["mlp"], drafter_dirs={"mlp": tiny_mlp}, num_heads=3, ks=[1, 3],
                         temperatures=[0.0, 1.0], concurrency=[1, 2], prompts=2, max_tokens=16, rounds=1, waves=2,
                         warmup_requests=1, max_model_len=256, profile_k=3)
    report = bench_speed(config, json_path=tmp_path / "speed.json")
    # a cell at concurrency c decodes max(prompts, waves * c) requests, never more than c at once
    for record in report["records"]:
        expected = max(2, 2 * record["concurrency"])
        assert (record["requests"], record["tokens"]) == (expected, expected * 16)
    warmups = 2 * 2  # two engines (none, mlp) x two temperatures x warmup_requests
    assert max(in_flight_at_admission) == 1 and len(in_flight_at_admission) == warmups + sum(r["requests"] for r in report["records"])
    rows = {(r["drafter"], r["mode"], r["K"], r["temperature"], r["concurrency"]) for r in report["rows"]}
    for t in (0.0, 1.0):
        for c in (1, 2):
            assert {("none", "none", 0, t, c), ("mlp", "fixed", 1, t, c), ("mlp", "fixed", 3, t, c), ("mlp", "adaptive", 3, t, c)} <= rows
    fixed1 = [r for r in report["rows"] if r["mode"] == "fixed" and r["K"] == 1]
    assert all(r["drafts_per_step"] == pytest.approx(1.0) for r in fixed1)  # the runtime K switch took effect
    assert all(1.0 <= r["tau"] <= 2.0 for r in fixed1)
    written = json.loads((tmp_path / "speed.json").read_text())
    assert {"drafter", "mode", "K", "temperature", "concurrency", "tokens_per_s", "speedup", "tau"} <= set(written["rows"][0])
    assert (tmp_path / "speed.md").read_text().startswith("# vllm-lk bench speed")
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    breakdown = {(b["drafter"], b["mode"], b["temperature"]): b for b in written["breakdown"]}
    assert set(breakdown) == {(d, m, t) for d, m in [("none", "none"), ("mlp", "fixed"), ("mlp", "adaptive")] for t in (0.0, 1.0)}
    assert breakdown[("mlp", "fixed", 1.0)]["ms_per_step"]["draft_forward"] > 0
    # drafting's parts are timed inside vLLM's EAGLE / draft-model loop; the MLP speculator runs
    # its own stages (their logits inside each stage's draft_forward), so it reports none
    assert breakdown[("mlp", "fixed", 1.0)]["drafting_ms_per_step"] == {}
    assert breakdown[("none", "none", 1.0)]["ms_per_step"]["draft_forward"] == 0

"""`generate` and `eval` on real vLLM engines with the tiny target and the tiny independent draft.

Engines: one for eval (started and stopped inside evaluate_pair, first, so two engines never
share the machine), one target engine shared by the in-process generate runs, and one in the
`vllm-lk generate` subprocess that is killed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest

from training.generate import GenerateConfig, generate, make_llm

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 512
OUTPUT_KEYS = {"id", "completion", "prompt_token_ids", "completion_token_ids", "finish_reason"}


def test_eval_measures_tau_and_matches_the_offline_prediction(tiny_target, tiny_draft, tmp_path):
    """Position 1 has no independence assumption: served acceptance there is a mean of per-step
    Bernoulli(alpha_row) outcomes, whose variance is at most the binomial p(1-p)/n, and the
    prediction is the mean alpha over the rows of the same sequences. So |served - predicted|
    <= 4 binomial sigmas (~0.09 at n ~ 370 steps, p ~ 0.76) fails a correct pair with
    probability < 1e-4, plus a small allowance (0.02) because serving verifies the rows where
    steps happen to start rather than every row. Measured: 0.763 served vs 0.767 predicted."""
    from training.evaluate import EvalConfig, evaluate_pair, save_result, summary_line

    config = EvalConfig(
        target=tiny_target, drafter=tiny_draft, prompts="builtin:code:heldout:16", temperature=1.0,
        num_speculative_tokens=3, max_tokens=64, max_model_len=MAX_MODEL_LEN,
    )
    save_result(evaluate_pair(config), tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    served, offline = result["served"], result["offline"]
    assert result["method"] == "draft_model" and result["drafter_kind"] == "draft-model"
    assert served["requests"] == 16 and served["verification_steps"] > 100
    assert 1 < served["tau"] <= 4
    assert served["tau"] == pytest.approx(1 + served["accepted_tokens"] / served["verification_steps"])
    assert all(0 < a <= 1 for a in served["per_position_acceptance"])
    assert served["per_position_acceptance"] == sorted(served["per_position_acceptance"], reverse=True)
    assert served["decode_tokens_per_s"] > 0

    alpha = offline["alpha_per_head"][0]
    assert offline["per_position_acceptance"] == pytest.approx([alpha, alpha**2, alpha**3])
    assert offline["tau"] == pytest.approx(1 + alpha + alpha**2 + alpha**3)
    assert offline["rows_per_head"] == [served["output_tokens"]]  # every generated token's row
    measured, steps = served["per_position_acceptance"][0], served["drafted_per_position"][0]
    tolerance = 4 * math.sqrt(measured * (1 - measured) / steps) + 0.02
    assert abs(offline["per_position_acceptance"][0] - measured) < tolerance, (offline, served)
    # at the served steps position 1 has no selection allowance: only the Bernoulli noise (and the
    # last steps, which run past the generated tokens and are skipped: 0.01)
    at_steps = offline["at_served_steps"]
    assert served["verification_steps"] - 16 * 3 <= at_steps["steps"] <= served["verification_steps"]
    assert abs(at_steps["per_position_acceptance"][0] - measured) < 4 * math.sqrt(measured * (1 - measured) / steps) + 0.01
    line = summary_line(result)
    assert "tau served" in line and "predicted" in line


def test_greedy_prediction_at_the_served_steps_equals_the_served_tau(tiny_target, tiny_draft):
    """At T=0 a draft is accepted iff it is the target's argmax, and an accepted draft is the token
    the sequence continues with, so walking the served steps over the teacher-forced agreement of
    the offline forward reproduces every step's accepted count; only argmax near-ties between
    vLLM's and transformers' float32 forwards can differ (allowance 1 %)."""
    from training.evaluate import EvalConfig, evaluate_pair

    config = EvalConfig(
        target=tiny_target, drafter=tiny_draft, prompts="builtin:code:heldout:8", temperature=0.0,
        num_speculative_tokens=3, max_tokens=48, max_model_len=MAX_MODEL_LEN,
    )
    result = evaluate_pair(config)
    served, at_steps = result["served"], result["offline"]["at_served_steps"]
    assert at_steps["steps"] >= served["verification_steps"] - 8 * 3
    assert at_steps["tau"] == pytest.approx(served["tau"], rel=0.01), (served, at_steps)


@pytest.fixture(scope="module")
def target_llm(tiny_target):
    llm = make_llm(tiny_target, GenerateConfig(max_model_len=MAX_MODEL_LEN), seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_generate_writes_every_record_and_a_rerun_skips_them(target_llm, tiny_target, tmp_path):
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "def main(", "id": "a"}\n'
        '{"messages": [{"role": "user", "content": "Return the sum of a list."}]}\n'
        '{"prompt": "import os\\n"}\n'
    )
    config = GenerateConfig(target=tiny_target, prompts=str(prompts), max_tokens=24, max_model_len=MAX_MODEL_LEN)
    out = tmp_path / "out.jsonl"
    assert generate(config, out, llm=target_llm)["written"] == 3
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"a", 2, 3}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_target))
    chat = lines[2]
    assert set(chat) == OUTPUT_KEYS | {"messages"} and set(lines["a"]) == OUTPUT_KEYS | {"prompt"}
    rendered = tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
    assert chat["prompt_token_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for line in lines.values():
        assert 1 <= len(line["completion_token_ids"]) <= 24 and line["finish_reason"] in ("stop", "length")
        assert line["completion"] == tokenizer.decode(line["completion_token_ids"], skip_special_tokens=True)

    before = out.read_bytes()
    assert generate(config, out, llm=target_llm) == {"out": str(out), "records": 3, "skipped": 3, "written": 0}
    assert out.read_bytes() == before


def test_killed_cli_run_resumes_without_duplicates(target_llm, tiny_target, tmp_path, venv_bin, clean_env):
    """`vllm-lk generate` is SIGKILLed (with its engine processes) once lines appear; a rerun
    with the same settings completes the file, every id once. max_num_seqs=2 makes records finish
    a few at a time, so the kill lands mid-run."""
    count = 24
    out = tmp_path / "out.jsonl"
    args = ["--target", str(tiny_target), "--prompts", f"builtin:code:heldout:{count}", "--max-tokens", "48",
            "--max-model-len", str(MAX_MODEL_LEN), "--seed", "3"]
    proc = subprocess.Popen(
        [str(venv_bin / "vllm-lk"), "generate", "--out", str(out), "--max-num-seqs", "2", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, "generate exited before writing two lines"
            assert time.monotonic() < deadline, "no output within 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < count, f"the kill came too late ({written} of {count} written)"
    with out.open("ab") as handle:  # and a line cut short, as a kill inside a write would leave
        handle.write(b'{"id": "code:heldout:0:99", "completion": "tru')

    config = GenerateConfig(target=tiny_target, prompts=f"builtin:code:heldout:{count}", max_tokens=48,
                            max_model_len=MAX_MODEL_LEN, seed=3)
    summary = generate(config, out, llm=target_llm)
    assert summary["skipped"] == written and summary["written"] == count - written
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"code:heldout:0:{i}" for i in range(count))

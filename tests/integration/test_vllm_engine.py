"""A real vLLM CPU engine loads the toy-target format, computes the same distribution as
transformers, generates, and has the vllm_lk plugin active in every process it starts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine_run(tiny_target, clean_env):
    script = Path(__file__).with_name("run_llm.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_target)], capture_output=True, text=True, env=clean_env, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), log


def test_generates_tokens(engine_run):
    result, _ = engine_run
    for out in result["greedy"]:
        assert len(out["token_ids"]) == 16
    assert all(len(ids) == 16 for ids in result["sampled"])


def test_prompt_logprobs_match_transformers(engine_run, tiny_target):
    from transformers import AutoModelForCausalLM

    result, _ = engine_run
    model = AutoModelForCausalLM.from_pretrained(tiny_target, torch_dtype=torch.float32)
    for out in result["greedy"]:
        ids = torch.tensor([out["prompt_token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        expected = logprobs.gather(1, ids[0, 1:, None])[:, 0]
        # fp32 on both sides, different kernels (vLLM CPU attention vs. SDPA): agree to 1e-3 nats
        assert torch.allclose(torch.tensor(out["prompt_logprobs"], dtype=torch.float64), expected, atol=1e-3)


def test_plugin_is_active_in_every_vllm_process(engine_run):
    _, log = engine_run
    pids = set(re.findall(r"vllm_lk \S+ active \(pid (\d+)\)", log))
    # the front-end process, the engine-core process it spawns and the worker
    assert len(pids) >= 3, log[-3000:]

"""The full embedded toy target, as `make serve` builds it: trained, cached, served by vLLM.

Slow (~6 min on 2 cores the first time; reuses the per-user cache after that): run with
`make test-slow`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.toy.target import ToyTargetConfig, build_toy_target

pytestmark = pytest.mark.slow

PYTHON_MARKERS = ("def ", "return", "self", "import", " = ", "):", "None", "if ", "for ")


@pytest.fixture(scope="module")
def full_target() -> dict:
    return build_toy_target(ToyTargetConfig())


def test_meets_the_size_and_quality_bar(full_target):
    assert full_target["num_parameters"] >= 5_000_000
    config = json.loads((Path(full_target["path"]) / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    # uniform over 4096 tokens is 8.3 nats; the 7 M model reaches ~4 on held-out stdlib files
    assert full_target["heldout_loss"] < 5.0


def test_vllm_continues_code_with_python(full_target, clean_env):
    script = Path(__file__).parents[1] / "integration" / "run_llm.py"
    proc = subprocess.run([sys.executable, str(script), full_target["path"]], capture_output=True, text=True,
                          env=clean_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    for out in result["greedy"]:
        hits = [m for m in PYTHON_MARKERS if m in out["text"]]
        assert len(hits) >= 2, out["text"]

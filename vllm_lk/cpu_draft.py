"""bf16 GEMMs for EAGLE / EAGLE-3 / draft-model drafters on CPU.

On CPU vLLM runs every linear layer through its GEMM dispatch (``dispatch_cpu_unquantized_gemm``:
oneDNN with a prepacked copy of the weight), in the model's dtype. A draft pass on the toy target
(EAGLE-3, hidden 256, K = 4, 2 cores) spends most of its GEMM time streaming weights that the
target's forward evicted from the caches: op-level profile (docs/speed.md), 0.21 ms a pass in the
decoder layer's GEMMs and 0.19 ms in the draft lm_head's. Where the CPU has AVX512-BF16 the
drafter's own linear layers get bf16 prepacked copies instead (half the bytes), as the MLP
speculator's heads do (``vllm_lk.heads.mlp_speculator``; one switch for both,
``VLLM_LK_CPU_BF16_HEADS=0`` keeps fp32).

Exactness does not move: the draft tokens are sampled from q = softmax of the logits these GEMMs
produce, and verification uses that same q; only how good the drafts are moves by bf16 rounding.
Layers the drafter shares with the target (EAGLE's lm_head and embeddings when its checkpoint has
none) are the target's modules, packed when the target loaded, and stay in the target's dtype.

Mechanism: while a KV drafter's weights load (``SpecDecodeBaseProposer.load_model``, and the
in-place reload in :mod:`vllm_lk.reload`), :func:`drafter_weights` is active and the wrapped
dispatch packs each fp32 weight as bf16. Nothing else is changed: the target, MEDUSA and the MLP
speculator load outside it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

ENV = "VLLM_LK_CPU_BF16_HEADS"  # shared with vllm_lk.heads.mlp_speculator
_loading = 0  # > 0 while a KV drafter's weights are processed (engine workers load on one thread)


def enabled() -> bool:
    """bf16 draft GEMMs apply here: a CPU with AVX512-BF16, not switched off."""
    if os.environ.get(ENV, "1").strip() == "0" or not torch.cpu._is_avx512_bf16_supported():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextlib.contextmanager
def drafter_weights():
    """Linear layers processed inside this block belong to a KV drafter."""
    global _loading
    _loading += 1
    try:
        yield
    finally:
        _loading -= 1


def _bf16_linear(packed: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [tokens, in] in the model's dtype; the product comes back in it
    out = packed.cpu_linear(x.to(torch.bfloat16), packed.weight, None).to(x.dtype)
    return out if bias is None else out.add_(bias)


def wrap_dispatch(original):
    """``dispatch_cpu_unquantized_gemm`` that packs a drafter's fp32 2-D weights as bf16."""

    @functools.wraps(original)
    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if not _loading or weight.is_meta or weight.dim() != 2 or weight.dtype != torch.float32 or not enabled():
            return original(layer, remove_weight)
        packed = torch.nn.Module()  # holds only the bf16 GEMM handle
        packed.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        original(packed, remove_weight=True)
        if remove_weight:  # as vLLM's own dispatch: the packed copy is the only one kept
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
        layer.cpu_linear = functools.partial(_bf16_linear, packed)

    return dispatch


def install() -> None:
    """Wrap vLLM's CPU GEMM dispatch (its callers import it at call time) and the KV drafters'
    ``load_model``. Once per process (patch.apply)."""
    from vllm.model_executor.layers import utils
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    utils.dispatch_cpu_unquantized_gemm = wrap_dispatch(utils.dispatch_cpu_unquantized_gemm)
    load_model = SpecDecodeBaseProposer.load_model

    @functools.wraps(load_model)
    def load_drafter(self, target_model):
        with drafter_weights():
            return load_model(self, target_model)

    SpecDecodeBaseProposer.load_model = load_drafter

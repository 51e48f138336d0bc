"""vllm_lk.cpu_draft (bf16 GEMMs for KV drafters on CPU) and the EAGLE-3 logit scatter with its
draft->target index computed once (vllm_lk.patch.lk_eagle3_compute_logits) and its greedy drafts
taken in the draft vocabulary; the GEMMs through vLLM's real
CPU GEMM dispatch (oneDNN).

Tolerances: fp32 oneDNN against torch's fp32 linear differ in summation order only (1e-5). The
bf16 path multiplies bf16-rounded inputs and weights with fp32 accumulation, so it is compared with
exactly that product computed by torch in fp32 (differences: summation order and the bf16
output rounding, 2^-8 relative), and must differ from the fp32 product (else it did not run).
"""

from types import SimpleNamespace

import pytest
import torch

from vllm_lk import cpu_draft
from vllm_lk.patch import lk_eagle3_compute_logits

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="bf16 GEMMs need a CPU with AVX512-BF16")


def linear(gen, out_features=96, in_features=64, bias=True) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=gen) * 0.1, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=gen), requires_grad=False) if bias else None
    return layer


@pytest.mark.parametrize("remove_weight", [True, False])
def test_layers_loaded_as_a_drafter_run_bf16_gemms_and_others_stay_fp32(monkeypatch, remove_weight):
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    monkeypatch.delenv(cpu_draft.ENV, raising=False)
    dispatch = cpu_draft.wrap_dispatch(dispatch_cpu_unquantized_gemm)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)  # [tokens, in]
    target, drafter, switched_off = linear(gen), linear(gen), linear(gen)
    weights = {name: (layer.weight.detach().clone(), layer.bias.detach().clone())
               for name, layer in [("target", target), ("drafter", drafter), ("off", switched_off)]}
    dispatch(target, remove_weight)  # outside drafter_weights(): vLLM's own dispatch
    with cpu_draft.drafter_weights():
        dispatch(drafter, remove_weight)
        monkeypatch.setenv(cpu_draft.ENV, "0")
        dispatch(switched_off, remove_weight)
    for name, layer in [("target", target), ("off", switched_off)]:
        w, b = weights[name]
        out = layer.cpu_linear(x, layer.weight, layer.bias)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    w, b = weights["drafter"]
    assert drafter.weight.numel() == (0 if remove_weight else w.numel())  # as vLLM's dispatch leaves it
    out = drafter.cpu_linear(x, drafter.weight, drafter.bias)
    assert out.dtype == torch.float32
    rounded = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float(), b)
    torch.testing.assert_close(out, rounded, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(out, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_eagle3_logits_scatter_into_the_target_vocabulary_and_follow_d2t():
    gen = torch.Generator().manual_seed(1)
    lm_head = torch.randn(5, 8, generator=gen)  # [V_draft, H]
    d2t = torch.tensor([0, 1, 3, 3, 6])  # draft ids 0..4 -> target ids 0, 2, 5, 6, 10
    model = SimpleNamespace(lm_head=lm_head, draft_id_to_target_id=d2t, config=SimpleNamespace(vocab_size=12),
                            logits_processor=lambda head, hidden: hidden @ head.t())
    hidden = torch.randn(3, 8, generator=gen)  # [B, H]

    def expected(target_ids):
        out = torch.full((3, 12), float("-inf"))
        out[:, target_ids] = hidden @ lm_head.t()
        return out

    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([0, 2, 5, 6, 10]))
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([0, 2, 5, 6, 10]))  # from the cache
    d2t.copy_(torch.tensor([1, 1, 1, 2, 2]))  # an in-place weight load: the cached index must follow
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([1, 2, 3, 5, 6]))
    model.draft_id_to_target_id = None  # full draft vocabulary: the logits as they are
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), hidden @ lm_head.t())


def test_eagle3_greedy_drafts_are_the_argmax_over_the_scattered_logits():
    """The greedy draft from the draft vocabulary (argmax, then d2t) equals the argmax over the
    logits scattered into the target vocabulary, ties included (d2t keeps the target order)."""
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    from vllm_lk.patch import _wrap_greedy_sample

    gen = torch.Generator().manual_seed(2)
    lm_head = torch.randn(6, 8, generator=gen)
    lm_head[4] = lm_head[1]  # draft ids 1 and 4 tie on every row
    d2t = torch.tensor([0, 2, 2, 4, 5, 5])  # -> target ids 0, 3, 4, 7, 9, 10
    model = Eagle3LlamaForCausalLM.__new__(Eagle3LlamaForCausalLM)  # no vLLM config needed: only these fields are read
    model.__dict__.update(lm_head=lm_head, draft_id_to_target_id=d2t, config=SimpleNamespace(vocab_size=11),
                          logits_processor=lambda head, hidden: hidden @ head.t())
    proposer = SimpleNamespace(model=model, use_local_argmax_reduction=False, use_heterogeneous_vocab=False)
    greedy = _wrap_greedy_sample(lambda self, hidden: lk_eagle3_compute_logits(self.model, hidden).argmax(dim=-1),
                                 Eagle3LlamaForCausalLM)
    hidden = torch.randn(64, 8, generator=gen)
    hidden[:8] = lm_head[1] * 5  # rows where the tied pair wins
    expected = lk_eagle3_compute_logits(model, hidden).argmax(dim=-1)
    assert torch.equal(greedy(proposer, hidden), expected)
    assert (expected[:8] == 3).all()  # the tie resolves to the lower target id, as the scattered argmax

"""Draft-training losses: KL, TV, LK-hybrid and LK-alpha (fp32 math, chunked over tokens).

Notation: p = target distribution, q = draft distribution, both softmax(logits / T) at the training
temperature T. Per token:

    alpha = sum_{v in draft vocab} min(p_v, q_v)        (= 1 - TV for a full draft vocabulary)
    KL    = sum_v p~_v log(p~_v / q_v)                   p~ = p restricted to the draft vocab, renormalised
    TV    = 1 - alpha
    LK-hybrid = lambda * KL + (1 - lambda) * TV,  lambda = exp(-eta * sg[alpha_bar])
    LK-alpha  = -log alpha

alpha uses the *full-vocabulary* target softmax: target mass outside a truncated draft vocabulary
counts as rejected (as it is in serving). KL uses the renormalised p~ (a draft cannot put mass
outside its vocabulary, so the unrenormalised KL would be infinite). alpha_bar is the mean alpha
of the batch for this head (default) or each token's own alpha (``lambda_per_token``).

Memory: a custom autograd function keeps only its inputs and recomputes softmaxes chunk by chunk
in backward, so peak memory is O(chunk_size x V) beyond the logits themselves. Given the target
as ``TargetRows`` (its hidden rows and lm_head), the target's logits are computed per chunk too,
in forward and again in backward, and never exist for all rows at once. Gradients with
respect to the draft logits z (q = softmax(z / T)), per token, restated for the tests:

    dKL/dz       = (q - p~) / T
    dalpha/dz_j  = q_j (1[q_j < p_j] - sum_v q_v 1[q_v < p_v]) / T       (min's subgradient)
    dTV/dz       = -dalpha/dz,   d(-log alpha)/dz = dTV/dz / alpha
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossKind = Literal["kl", "tv", "lk-hybrid", "lk-alpha"]
# Elements per chunk of [tokens, vocab] temporaries: 2^21 fp32 = 8 MiB each, small enough to stay
# in cache-friendly sizes (measured: 64 x 32k-token chunks run 2.2x faster than 1024 x 32k).
CHUNK_ELEMENTS = 2**21
ALPHA_FLOOR = 1e-6  # -log alpha and its 1/alpha gradient are clamped here (alpha = 0 only for disjoint supports)


def _chunk_terms(draft_logits, target_logits, draft_ids, temperature):
    """Per-token alpha, KL and the pieces of their gradients for one chunk (fp32)."""
    log_q = torch.log_softmax(draft_logits.float() / temperature, dim=-1)  # [n, Vd]
    q = log_q.exp()
    p_full = torch.softmax(target_logits.float() / temperature, dim=-1)  # [n, V]
    p = p_full if draft_ids is None else p_full[:, draft_ids]  # [n, Vd], not renormalised
    below = q < p
    alpha = torch.where(below, q, p).sum(-1)  # [n]
    p_tilde = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    kl = (torch.special.xlogy(p_tilde, p_tilde) - p_tilde * log_q).sum(-1)  # [n]; finite where q underflows
    return q, p_tilde, below, alpha, kl


def _target_chunk(target_logits, head_weight, head_bias, start, stop):
    """[stop - start, V] target logits: a slice of the given ones, or computed from the target's
    hidden rows and lm_head (``target_logits`` then holds the hidden rows, [N, H])."""
    if head_weight is None:
        return target_logits[start:stop]
    return torch.nn.functional.linear(target_logits[start:stop], head_weight, head_bias).float()


class _DraftLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, draft_logits, target_logits, head_weight, head_bias, draft_ids, kind, temperature, eta, lambda_per_token, chunk_size):
        n = draft_logits.shape[0]
        alphas, kls = [], []
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                target = _target_chunk(target_logits, head_weight, head_bias, start, stop)
                _, _, _, alpha, kl = _chunk_terms(draft_logits[start:stop], target, draft_ids, temperature)
                alphas.append(alpha)
                kls.append(kl)
        alpha = torch.cat(alphas)
        kl = torch.cat(kls)
        if kind == "kl":
            weight_kl, per_token = torch.ones_like(alpha), kl
        elif kind == "tv":
            weight_kl, per_token = torch.zeros_like(alpha), 1 - alpha
        elif kind == "lk-hybrid":
            lam = torch.exp(-eta * (alpha if lambda_per_token else alpha.mean().expand_as(alpha)))
            weight_kl, per_token = lam, lam * kl + (1 - lam) * (1 - alpha)
        elif kind == "lk-alpha":
            weight_kl, per_token = torch.zeros_like(alpha), -torch.log(alpha.clamp_min(ALPHA_FLOOR))
        else:
            raise ValueError(f"unknown loss {kind!r}")
        ctx.mark_non_differentiable(alpha, kl)
        ctx.save_for_backward(draft_logits, target_logits, draft_ids if draft_ids is not None else torch.empty(0), alpha, weight_kl,
                              head_weight, head_bias)
        ctx.config = (kind, temperature, chunk_size, draft_ids is not None)
        return per_token.mean(), alpha, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_alpha, _grad_kl):
        draft_logits, target_logits, draft_ids, alpha, weight_kl, head_weight, head_bias = ctx.saved_tensors
        kind, temperature, chunk_size, truncated = ctx.config
        draft_ids = draft_ids if truncated else None
        n = draft_logits.shape[0]
        grad = torch.empty(draft_logits.shape, dtype=torch.float32, device=draft_logits.device)
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            target = _target_chunk(target_logits, head_weight, head_bias, start, stop)
            q, p_tilde, below, _, _ = _chunk_terms(draft_logits[start:stop], target, draft_ids, temperature)
            d_kl = q - p_tilde
            q_below = q * below
            d_alpha = q_below - q * q_below.sum(-1, keepdim=True)
            a = alpha[start:stop, None]
            if kind == "lk-alpha":
                g = -d_alpha / a.clamp_min(ALPHA_FLOOR)
            else:  # kl, tv and hybrid: w * dKL + (1 - w) * dTV (the weight is a stop-gradient)
                w = weight_kl[start:stop, None]
                g = w * d_kl - (1 - w) * d_alpha
            grad[start:stop] = g / temperature
        grad *= grad_loss / n
        return grad.to(draft_logits.dtype), None, None, None, None, None, None, None, None, None


def draft_loss(
    draft_logits: torch.Tensor,  # [N, Vd] one head's logits at N token positions
    target_logits,  # [N, V] the target's logits at the same positions (no grad), or a
    # training.drafters.base.TargetRows (hidden rows + lm_head: the logits are computed per chunk)
    kind: LossKind,
    *,
    temperature: float = 1.0,
    draft_ids: torch.Tensor | None = None,  # [Vd] target id of each draft id (truncated vocab)
    eta: float = 3.0,
    lambda_per_token: bool = False,
    chunk_size: int | None = None,  # tokens per chunk; default: CHUNK_ELEMENTS // vocab
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (scalar loss, [N] alpha, [N] KL), no grad on the last two
    """One head's loss, mean over tokens. See the module docstring for the formulas."""
    rows = target_logits if hasattr(target_logits, "hidden") else None  # TargetRows
    target_shape = tuple(rows.shape if rows is not None else target_logits.shape)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // target_shape[1])
    assert draft_logits.dim() == 2 and len(target_shape) == 2 and draft_logits.shape[0] == target_shape[0]
    if draft_ids is None:
        assert draft_logits.shape[1] == target_shape[1], (draft_logits.shape, target_shape)
    else:
        assert draft_ids.shape == (draft_logits.shape[1],), (draft_ids.shape, draft_logits.shape)
    if draft_logits.shape[0] == 0:
        zero = draft_logits.sum() * 0.0
        empty = draft_logits.new_zeros(0, dtype=torch.float32)
        return zero, empty, empty
    if rows is not None:
        target, weight, bias = rows.hidden.detach(), rows.weight.detach(), None if rows.bias is None else rows.bias.detach()
    else:
        target, weight, bias = target_logits.detach(), None, None
    return _DraftLoss.apply(
        draft_logits, target, weight, bias, draft_ids, kind, float(temperature), float(eta), lambda_per_token, chunk_size
    )


def head_weights(num_heads: int, gamma: float = 0.8) -> list[float]:
    """gamma^(k-1) for heads k = 1..K, normalised to sum to 1 (so the loss scale does not grow with K)."""
    raw = [gamma**k for k in range(num_heads)]
    return [w / sum(raw) for w in raw]


def multi_head_loss(
    draft_logits: list[torch.Tensor],  # K x [N_k, Vd]
    target_logits: list[torch.Tensor],  # K x [N_k, V]
    kind: LossKind,
    *,
    gamma: float = 0.8,
    temperatures: tuple[float, ...] = (1.0,),
    **kwargs,
) -> tuple[torch.Tensor, list[float]]:  # (scalar loss, mean alpha per head at the first temperature)
    """sum_k gamma^(k-1) L_k, each L_k averaged over the training temperatures."""
    weights = head_weights(len(draft_logits), gamma)
    total = draft_logits[0].new_zeros((), dtype=torch.float32)
    alphas = []
    for weight, draft, target in zip(weights, draft_logits, target_logits):
        for i, temperature in enumerate(temperatures):
            loss, alpha, _ = draft_loss(draft, target, kind, temperature=temperature, **kwargs)
            total = total + weight * loss / len(temperatures)
            if i == 0:
                alphas.append(float(alpha.mean()) if alpha.numel() else math.nan)
    return total, alphas

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
in backward, so peak memory is O(chunk_size x V) beyond its inputs. Given a side as ``HeadRows``
(the rows a linear head reads, and the head), that side's logits are computed per chunk too, in
forward and again in backward, and never exist for all rows at once; for the draft side the
backward pushes each chunk's logit gradient through the head (rows: g W; weight: g^T x), so
neither [N, V] logits nor their gradient is ever whole: memory is O(N x H), not O(N x V). With a
truncated draft vocabulary, multi_head_loss hands the target side over as its draft-vocabulary
columns plus the full vocabulary's logsumexp (restrict_to_draft_vocab; the logsumexp comes from
one full-V pass per batch position that all heads share, TargetOutputs.position_lse) instead of a
full-V pass in forward and another in backward per head, and [N, Vd] softmax work after it. Gradients with
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
# With a side given as HeadRows each chunk is also a [rows, H] x [H, V] matmul, which reads the
# whole head weight once per chunk: at least 256 rows a chunk keep it compute-bound (measured on
# AMX bf16: 1 GB of a 128k lm_head read per chunk vs ~270 GFLOP), and a fixed row count keeps the
# [rows, V] temporaries a constant (128 MiB each in fp32 at V = 128k), whatever N and V.
MIN_ROWS_PER_CHUNK = 256
ALPHA_FLOOR = 1e-6  # -log alpha and its 1/alpha gradient are clamped here (alpha = 0 only for disjoint supports)


def _scaled(logits, temperature):  # [n, V] fp32 logits / T, never writing into ``logits``
    z = logits.float()
    if temperature == 1.0:
        return z
    return z.div_(temperature) if z is not logits else z / temperature


def _chunk_terms(draft_logits, target_logits, draft_ids, temperature, target_lse=None):
    """Per-token alpha, KL and the pieces of their gradients for one chunk (fp32). With
    ``target_lse`` [n], ``target_logits`` are the draft vocabulary's columns only and p on them is
    exp(z / T - lse), lse taken over the full vocabulary."""
    log_q = torch.log_softmax(_scaled(draft_logits, temperature), dim=-1)  # [n, Vd]
    q = log_q.exp()
    if target_lse is not None:
        p = torch.exp(_scaled(target_logits, temperature) - target_lse[:, None])  # [n, Vd], not renormalised
    else:
        p_full = torch.softmax(_scaled(target_logits, temperature), dim=-1)  # [n, V]
        p = p_full if draft_ids is None else p_full[:, draft_ids]  # [n, Vd], not renormalised
    below = q < p
    alpha = torch.where(below, q, p).sum(-1)  # [n]
    p_tilde = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    kl = (torch.special.xlogy(p_tilde, p_tilde) - p_tilde * log_q).sum(-1)  # [n]; finite where q underflows
    return q, p_tilde, below, alpha, kl


class _Side:
    """One side of a loss pair inside the autograd function: logits [N, V] (``weight`` None) or a
    head's input rows [N, H] with its ``weight`` [V, H] and ``bias`` [V], cast once to the matmul
    dtype (what autocast caches for a parameter in a forward pass)."""

    def __init__(self, x, weight, bias, dtype) -> None:
        self.x, self.rows = x, weight is not None
        dtype = dtype or x.dtype
        self.dtype = dtype
        self.weight = None if weight is None else weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)

    def chunk(self, start: int, stop: int) -> torch.Tensor:  # [stop - start, V] fp32
        if not self.rows:
            return self.x[start:stop]
        return torch.nn.functional.linear(self.x[start:stop].to(self.dtype), self.weight, self.bias).float()


def _tensor_or_empty(t):
    return t if t is not None else torch.empty(0)


class _DraftLoss(torch.autograd.Function):
    """Inputs: the draft side (logits, or rows + weight + bias: the differentiable ones), the
    target side (the same two forms, no gradient), then the loss settings."""

    @staticmethod
    def forward(ctx, draft_x, draft_w, draft_b, target_x, target_w, target_b, target_lse, draft_ids, kind, temperature, eta,
                lambda_per_token, chunk_size, dtypes):
        n = draft_x.shape[0]
        alphas, kls = [], []
        with torch.no_grad(), torch.autocast(draft_x.device.type, enabled=False):
            draft, target = _Side(draft_x, draft_w, draft_b, dtypes[0]), _Side(target_x, target_w, target_b, dtypes[1])
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                lse = None if target_lse is None else target_lse[start:stop]
                _, _, _, alpha, kl = _chunk_terms(draft.chunk(start, stop), target.chunk(start, stop), draft_ids, temperature, lse)
                alphas.append(alpha)
                kls.append(kl)
        alpha = torch.cat(alphas)
        kl = torch.cat(kls)
        weight_kl, per_token = _combine(kind, alpha, kl, eta, lambda_per_token)
        ctx.mark_non_differentiable(alpha, kl)
        ctx.save_for_backward(draft_x, _tensor_or_empty(draft_w), _tensor_or_empty(draft_b), target_x, _tensor_or_empty(target_w),
                              _tensor_or_empty(target_b), _tensor_or_empty(target_lse), _tensor_or_empty(draft_ids), alpha, weight_kl)
        optional = (draft_w, draft_b, target_w, target_b, target_lse, draft_ids)
        ctx.config = (kind, temperature, chunk_size, dtypes, tuple(t is not None for t in optional))
        return per_token.mean(), alpha, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_alpha, _grad_kl):
        draft_x, draft_w, draft_b, target_x, target_w, target_b, target_lse, draft_ids, alpha, weight_kl = ctx.saved_tensors
        kind, temperature, chunk_size, dtypes, present = ctx.config
        draft_w, draft_b, target_w, target_b, target_lse, draft_ids = (
            t if ok else None for t, ok in zip((draft_w, draft_b, target_w, target_b, target_lse, draft_ids), present))
        n = draft_x.shape[0]
        draft, target = _Side(draft_x, draft_w, draft_b, dtypes[0]), _Side(target_x, target_w, target_b, dtypes[1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # the gradient w.r.t. the draft logits, chunk by chunk; with rows, pushed through the head
        # at once (x: g W, weight: sum g^T x, bias: sum g) so [N, V] never exists
        grad_x = torch.empty(draft_x.shape, dtype=draft_x.dtype if draft.rows else torch.float32, device=draft_x.device) if need_x else None
        grad_w = torch.zeros(draft_w.shape, dtype=torch.float32, device=draft_x.device) if draft.rows and need_w else None
        grad_b = torch.zeros(draft_b.shape, dtype=torch.float32, device=draft_x.device) if draft_b is not None and need_b else None
        scale = grad_loss / n
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            lse = None if target_lse is None else target_lse[start:stop]
            q, p_tilde, below, _, _ = _chunk_terms(draft.chunk(start, stop), target.chunk(start, stop), draft_ids, temperature, lse)
            g = _logit_grad(kind, q, p_tilde, below, alpha[start:stop, None], weight_kl[start:stop, None]) * (scale / temperature)
            if not draft.rows:
                if need_x:
                    grad_x[start:stop] = g
                continue
            g = g.to(draft.dtype)
            if need_x:
                grad_x[start:stop] = g @ draft.weight
            if grad_w is not None:
                grad_w += (g.T @ draft_x[start:stop].to(draft.dtype)).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        grad_x = grad_x.to(draft_x.dtype) if need_x else None
        grad_w = None if grad_w is None else grad_w.to(draft_w.dtype)
        grad_b = None if grad_b is None else grad_b.to(draft_b.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None


def _combine(kind, alpha, kl, eta, lambda_per_token):
    """(stop-gradient KL weight [N], per-token loss [N]) of loss ``kind``."""
    if kind == "kl":
        return torch.ones_like(alpha), kl
    if kind == "tv":
        return torch.zeros_like(alpha), 1 - alpha
    if kind == "lk-hybrid":
        lam = torch.exp(-eta * (alpha if lambda_per_token else alpha.mean().expand_as(alpha)))
        return lam, lam * kl + (1 - lam) * (1 - alpha)
    if kind == "lk-alpha":
        return torch.zeros_like(alpha), -torch.log(alpha.clamp_min(ALPHA_FLOOR))
    raise ValueError(f"unknown loss {kind!r}")


def _logit_grad(kind, q, p_tilde, below, alpha, weight_kl):  # [n, Vd]: d(per-token loss)/dz * T
    d_kl = q - p_tilde
    q_below = q * below
    d_alpha = q_below - q * q_below.sum(-1, keepdim=True)
    if kind == "lk-alpha":
        return -d_alpha / alpha.clamp_min(ALPHA_FLOOR)
    # kl, tv and hybrid: w * dKL + (1 - w) * dTV (the weight is a stop-gradient)
    return weight_kl * d_kl - (1 - weight_kl) * d_alpha


def _parts(side):
    """(x, weight, bias, dtype) of a pair side: logits, or HeadRows (duck-typed: training.drafters
    imports this module's users, not the other way round)."""
    if hasattr(side, "hidden"):
        return side.hidden, side.weight, side.bias, side.dtype
    return side, None, None, None


def draft_loss(
    draft_logits,  # [N, Vd] one head's logits at N token positions, or HeadRows (its input rows + head)
    target_logits,  # [N, V] the target's logits at the same positions, or HeadRows; never differentiated
    kind: LossKind,
    *,
    temperature: float = 1.0,
    draft_ids: torch.Tensor | None = None,  # [Vd] target id of each draft id (truncated vocab)
    target_lse: torch.Tensor | None = None,  # [N] see below
    eta: float = 3.0,
    lambda_per_token: bool = False,
    chunk_size: int | None = None,  # tokens per chunk; default CHUNK_ELEMENTS // V (>= MIN_ROWS_PER_CHUNK with HeadRows)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (scalar loss, [N] alpha, [N] KL), no grad on the last two
    """One head's loss, mean over tokens. See the module docstring for the formulas.

    ``target_lse`` (fp32, logsumexp of the target's logits / ``temperature`` over the full
    vocabulary) says the target side holds only the draft vocabulary's columns (logits [N, Vd], or
    HeadRows over the weight's draft rows, as ``restrict_to_draft_vocab`` makes them); then
    ``draft_ids`` must be None."""
    draft_x, draft_w, draft_b, draft_dtype = _parts(draft_logits)
    target_x, target_w, target_b, target_dtype = _parts(target_logits)
    draft_shape = tuple(draft_logits.shape)
    target_shape = tuple(target_logits.shape)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // target_shape[1])
        if draft_w is not None or target_w is not None:
            chunk_size = max(chunk_size, MIN_ROWS_PER_CHUNK)
    assert len(draft_shape) == 2 and len(target_shape) == 2 and draft_shape[0] == target_shape[0], (draft_shape, target_shape)
    if draft_ids is None:
        assert draft_shape[1] == target_shape[1], (draft_shape, target_shape)
    else:
        assert draft_ids.shape == (draft_shape[1],) and target_lse is None, (draft_ids.shape, draft_shape)
    assert target_lse is None or target_lse.shape == (draft_shape[0],), (target_lse.shape, draft_shape)
    if draft_shape[0] == 0:
        zero = draft_x.sum() * 0.0 + (0.0 if draft_w is None else draft_w.sum() * 0.0)
        empty = draft_x.new_zeros(0, dtype=torch.float32)
        return zero, empty, empty
    target_w = None if target_w is None else target_w.detach()
    target_b = None if target_b is None else target_b.detach()
    return _DraftLoss.apply(
        draft_x, draft_w, draft_b, target_x.detach(), target_w, target_b, target_lse, draft_ids, kind, float(temperature),
        float(eta), lambda_per_token, chunk_size, (draft_dtype, target_dtype),
    )


@torch.no_grad()
def head_lse(rows, temperatures: tuple[float, ...]) -> torch.Tensor:  # [len(temperatures), N] fp32
    """logsumexp(logits / T) of a HeadRows side over its whole vocabulary, at each temperature, in
    one pass of chunked matmuls (no gradient)."""
    x, weight, bias, dtype = _parts(rows)
    side = _Side(x, weight, bias, dtype)
    n = x.shape[0]
    lse = torch.empty(len(temperatures), n, dtype=torch.float32, device=x.device)
    step = max(MIN_ROWS_PER_CHUNK, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n, step):
            z = side.chunk(start, start + step)  # [step, V] fp32
            for i, temperature in enumerate(temperatures):
                lse[i, start:start + step] = torch.logsumexp(_scaled(z, temperature), dim=-1)
    return lse


@torch.no_grad()
def restrict_to_draft_vocab(
    target,  # HeadRows: the target's rows [N, H] and lm_head [V, H]
    draft_ids: torch.Tensor,  # [Vd] target id of each draft id
    temperatures: tuple[float, ...],
    weight_rows: tuple | None = None,  # (weight[draft_ids], bias[draft_ids]) already gathered (heads share them)
) -> tuple:  # (HeadRows over [Vd, H], [len(temperatures), N] fp32 lse)
    """The target side a truncated draft vocabulary needs: p on the draft ids is exp(z / T - lse)
    with lse over the full vocabulary (``target.row_lse`` when the rows bring it: select_rows
    shares one computation per batch position across the heads, else head_lse here). The loss's
    forward and backward then compute only the [N, Vd] columns (at 128k target and 32k draft
    tokens, a quarter of the target-side matmuls and softmax traffic)."""
    x, weight, bias, dtype = _parts(target)
    provider = getattr(target, "row_lse", None)
    lse = provider(tuple(temperatures)) if provider is not None else head_lse(target, tuple(temperatures))
    if weight_rows is None:
        weight_rows = (weight[draft_ids], None if bias is None else bias[draft_ids])
    return type(target)(x, weight_rows[0], weight_rows[1], dtype), lse


def head_weights(num_heads: int, gamma: float = 0.8) -> list[float]:
    """gamma^(k-1) for heads k = 1..K, normalised to sum to 1 (so the loss scale does not grow with K)."""
    raw = [gamma**k for k in range(num_heads)]
    return [w / sum(raw) for w in raw]


def multi_head_loss(
    draft_logits: list,  # K x [N_k, Vd] logits or HeadRows
    target_logits: list,  # K x [N_k, V] logits or HeadRows
    kind: LossKind,
    *,
    gamma: float = 0.8,
    temperatures: tuple[float, ...] = (1.0,),
    draft_ids: torch.Tensor | None = None,
    restrict_target: bool = True,  # a HeadRows target with draft_ids: restrict_to_draft_vocab (False: the full-V path)
    **kwargs,
) -> tuple[torch.Tensor, list[float]]:  # (scalar loss, mean alpha per head at the first temperature)
    """sum_k gamma^(k-1) L_k, each L_k averaged over the training temperatures."""
    weights = head_weights(len(draft_logits), gamma)
    total = 0.0
    alphas = []
    gathered = {}  # id(target weight) -> its draft rows, gathered once for every head
    for weight, draft, target in zip(weights, draft_logits, target_logits):
        lse, ids = None, draft_ids
        if draft_ids is not None and restrict_target and hasattr(target, "hidden"):
            key = id(target.weight)
            target, lse = restrict_to_draft_vocab(target, draft_ids, temperatures, gathered.get(key))
            gathered[key] = (target.weight, target.bias)
            ids = None
        for i, temperature in enumerate(temperatures):
            loss, alpha, _ = draft_loss(draft, target, kind, temperature=temperature, draft_ids=ids,
                                        target_lse=None if lse is None else lse[i], **kwargs)
            total = total + weight * loss / len(temperatures)
            if i == 0:
                alphas.append(float(alpha.mean()) if alpha.numel() else math.nan)
    return total, alphas

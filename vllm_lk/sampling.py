"""Exact speculative sampling as pure tensor math (no vLLM imports).

Notation (Leviathan et al. 2023; Chen et al. 2023): p = target distribution, q = draft
distribution, both *after* the request's sampling transforms (temperature, top-k, top-p), so the
acceptance rate at a position is sum_v min(p_v, q_v). One verification step for a request with K
drafts x_1..x_K:

    for k = 1..K:  accept x_k with probability min(1, p_k(x_k) / q_k(x_k))
    first rejection at k:  emit a token from normalize(max(0, p_k - q_k)) and stop
    all K accepted:        emit a bonus token from p_{K+1}

Greedy requests (temperature 0) accept while x_k == argmax p_k and emit argmax at the stop.
Randomness comes in as arguments (uniform draws: one per draft for acceptance, one per categorical
draw by inverse CDF), so every function is deterministic and testable; the vLLM wiring draws them
from per-request generators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PLACEHOLDER = -1  # output slot with no token (rejected tail), as in vLLM


def sampling_logits(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N]; rows with 0 (greedy) are scaled by 1
    top_k: torch.Tensor | None = None,  # [N] int; >= V or <= 0 keeps everything
    top_p: torch.Tensor | None = None,  # [N] float; 1.0 keeps everything
    inplace: bool = False,  # scale ``logits`` in place (it must be float32/float64)
) -> torch.Tensor:  # [N, V]: logits / T with tokens outside top-k/top-p at -inf
    """The request's sampling transforms; softmax of the result is the distribution sampled.

    The same rules as vLLM's sampler (``apply_top_k_top_p``), so a speculative step samples from
    exactly the distribution the request gets without speculation: top-k keeps every token whose
    logit is >= the k-th largest (ties at the boundary are kept); top-p then sorts ascending and
    drops tokens while the cumulative probability stays <= 1 - p, always keeping the largest.
    """
    assert logits.dim() == 2 and temperature.shape == logits.shape[:1], (logits.shape, temperature.shape)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[1]
    temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(dtype)
    if inplace and logits.dtype == dtype:
        scaled = logits.div_(temperature[:, None])
    else:
        scaled = logits.to(dtype) / temperature[:, None]
    if (top_k is None and top_p is None) or scaled.shape[0] == 0:
        return scaled
    if top_k is not None:
        k = top_k.to(torch.long)
        k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
        if top_p is None:  # top-k alone needs no full sort
            kth_largest = scaled.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            return scaled.masked_fill_(scaled < kth_largest, float("-inf"))
    sorted_logits, order = scaled.sort(dim=-1, stable=True)  # ascending
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab - k)[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cumulative <= (1 - top_p.to(dtype))[:, None]
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return scaled.scatter_(1, order, sorted_logits)


def sampling_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N]
    top_k: torch.Tensor | None = None,  # [N]
    top_p: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [N, V], rows sum to 1, float32 (float64 for float64 logits)
    """softmax(logits / T) restricted to the top-k tokens, then to the top-p nucleus."""
    return sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """alpha = sum_v min(p_v, q_v) = 1 - TV(p, q) over the last dim: P(accept) at one position."""
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


def residual_probs(
    target_probs: torch.Tensor,  # [..., V]
    draft_probs: torch.Tensor,  # [..., V]
) -> torch.Tensor:  # [..., V]
    """normalize(max(0, p - q)): what to sample after a rejection.

    Where p <= q everywhere (then a rejection has probability 0 and only happens through rounding)
    the row falls back to p.
    """
    residual = (target_probs - draft_probs).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(residual.dtype).tiny), target_probs)


def sample_from_uniform(
    probs: torch.Tensor,  # [R, V], rows with positive mass (need not be normalized)
    uniforms: torch.Tensor,  # [R] U[0, 1)
) -> torch.Tensor:  # [R] int64
    """Inverse-CDF draw: the first token whose cumulative mass exceeds u * total mass.

    Exact (cumulative sums in float64, compared against the row's own last sum, so a token of
    zero mass is never drawn) and it needs one uniform per row, where the exponential race needs V
    Exp(1) draws: on CPU generating those cost more than the rest of a small verification step.
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [R, V]
    threshold = uniforms.to(torch.float64) * cdf[:, -1]  # [R]
    return torch.searchsorted(cdf, threshold[:, None], right=True)[:, 0].clamp_max_(probs.shape[-1] - 1)


def verify(
    draft_token_ids: torch.Tensor,  # [B, K] int; slots at or past num_drafts are ignored
    num_drafts: torch.Tensor,  # [B] int, 0..K
    draft_probs: torch.Tensor | None,  # [N, V] q the drafts were drawn from; None: one-hot q
    target_logits: torch.Tensor,  # [N, V] p = softmax(target_logits) at each draft position
    token_rows: torch.Tensor,  # [B, K] long: row of slot (b, k) in the [N, V] tensors
    bonus_token_ids: torch.Tensor,  # [B] int, drawn from p at position num_drafts (argmax if greedy)
    is_greedy: torch.Tensor,  # [B] bool, temperature 0
    uniforms: torch.Tensor,  # [B, K] U[0, 1) draws for acceptance
    residual_uniforms: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],  # [B] U[0, 1), or [B] bool -> [B]
    has_greedy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, K+1] int64 tokens, PLACEHOLDER-padded; [B] accepted)
    """One verification step for a batch; greedy and sampled requests may be mixed.

    Row b emits its first ``num_accepted[b]`` drafts and then one more token: the residual sample
    at the first rejection, or the bonus token when every draft is accepted. The bonus token comes
    from the caller because it is an ordinary sample from the target at the next position (vLLM
    draws it with its own sampler, penalties and all). A draft with q(x) = 0 or a negative id is
    rejected: it cannot have been drawn from q. One-hot q (``draft_probs=None``) is exact only for
    drafts that were chosen deterministically (argmax, n-gram).

    The [N, V] tensors stay flat, as vLLM lays them out (requests' draft positions back to back):
    the step takes one softmax over them and reads the drafted tokens' entries, then one [B, V]
    row per request at its stop slot. Nothing in it waits on the device (no ``nonzero``, no
    ``.item()``): every request's stop token is computed and the right one selected, so a GPU
    step is not stalled; a residual row computed for a request that accepted everything is
    discarded. ``residual_uniforms`` may be a function of the [B] mask of rows whose residual draw
    is used (seeded requests draw from their own generators only there; called once).
    ``has_greedy``: whether any ``is_greedy`` may be set, if the caller knows (None: read from the
    tensor, one host sync); without greedy rows the target's argmax is not computed.
    """
    batch, k_max = draft_token_ids.shape
    vocab = target_logits.shape[-1]
    assert num_drafts.shape == (batch,) and is_greedy.shape == (batch,) and bonus_token_ids.shape == (batch,)
    assert token_rows.shape == (batch, k_max) and uniforms.shape == (batch, k_max)
    assert callable(residual_uniforms) or residual_uniforms.shape == (batch,), residual_uniforms.shape
    assert draft_probs is None or draft_probs.shape == target_logits.shape, (draft_probs.shape, target_logits.shape)
    device = target_logits.device
    output = torch.full((batch, k_max + 1), PLACEHOLDER, dtype=torch.long, device=device)
    if k_max == 0 or target_logits.shape[0] == 0:
        output[:, 0] = bonus_token_ids
        return output, torch.zeros(batch, dtype=torch.long, device=device)
    if has_greedy is None:
        has_greedy = bool(is_greedy.any())
    slots = torch.arange(k_max, device=device)[None, :]  # [1, K]
    drafts = draft_token_ids.to(torch.long)
    safe_drafts = drafts.clamp_min(0)  # [B, K]
    target_probs = target_logits.softmax(dim=-1)  # [N, V]: one fused pass (logsumexp takes several)
    p_draft = target_probs[token_rows, safe_drafts]  # [B, K]
    if draft_probs is None:
        accept = uniforms < p_draft  # q(x) = 1
    else:
        q_draft = draft_probs[token_rows, safe_drafts].to(p_draft.dtype)
        accept = (q_draft > 0) & (uniforms.to(p_draft.dtype) * q_draft < p_draft)
    if has_greedy:
        argmax = target_logits.argmax(dim=-1)[token_rows]  # [B, K]
        accept = torch.where(is_greedy[:, None], drafts == argmax, accept)
    accept &= (slots < num_drafts[:, None]) & (drafts >= 0)
    num_accepted = accept.to(torch.long).cumprod(dim=1).sum(dim=1)  # [B]

    # Stop token: the bonus if every draft was accepted, else at the rejected slot the residual
    # sample (sampled requests) or the argmax (greedy requests).
    slot = num_accepted.clamp_max(k_max - 1)[:, None]  # [B, 1]: the first rejected slot where there is one
    slot_rows = token_rows.gather(1, slot)[:, 0]  # [B]
    p_slot = target_probs[slot_rows]  # [B, V]
    if draft_probs is None:
        drafted = drafts.gather(1, slot)[:, 0]
        q_slot = torch.nn.functional.one_hot(drafted.clamp_min(0), vocab).to(p_slot.dtype)
        q_slot *= (drafted >= 0)[:, None]
    else:
        q_slot = draft_probs[slot_rows].to(p_slot.dtype)
    rejected = num_accepted < num_drafts  # [B]
    if callable(residual_uniforms):
        draws = residual_uniforms(rejected & ~is_greedy if has_greedy else rejected)
    else:
        draws = residual_uniforms
    stop_token = sample_from_uniform(residual_probs(p_slot, q_slot), draws)
    if has_greedy:
        stop_token = torch.where(is_greedy, argmax.gather(1, slot)[:, 0], stop_token)
    stop_token = torch.where(rejected, stop_token, bonus_token_ids.to(torch.long))

    output[:, :k_max] = torch.where(slots < num_accepted[:, None], drafts, PLACEHOLDER)
    output.scatter_(1, num_accepted[:, None], stop_token[:, None])
    return output, num_accepted


def verify_greedy(
    draft_token_ids: torch.Tensor,  # [B, K] int; slots at or past num_drafts are ignored
    num_drafts: torch.Tensor,  # [B] int, 0..K
    target_logits: torch.Tensor,  # [N, V]
    token_rows: torch.Tensor,  # [B, K] long
    bonus_token_ids: torch.Tensor,  # [B] int, the target's argmax at position num_drafts
) -> tuple[torch.Tensor, torch.Tensor]:  # as verify()
    """verify() for a batch whose every request is greedy: accept while the draft is the
    target's argmax, then emit the argmax (or the bonus). Equal to verify() with ``is_greedy``
    all true (tested), without its softmax, gathers and host syncs: on CPU at B=1, K=4, V=4096
    the general path spent more time here than on a sampled batch."""
    batch, k_max = draft_token_ids.shape
    output = torch.full((batch, k_max + 1), PLACEHOLDER, dtype=torch.long, device=target_logits.device)
    if k_max == 0 or target_logits.shape[0] == 0:
        output[:, 0] = bonus_token_ids
        return output, torch.zeros(batch, dtype=torch.long, device=target_logits.device)
    slots = torch.arange(k_max, device=target_logits.device)[None, :]  # [1, K]
    drafts = draft_token_ids.to(torch.long)
    argmax = target_logits.argmax(dim=-1)[token_rows]  # [B, K]
    accept = (drafts == argmax) & (slots < num_drafts[:, None])
    num_accepted = accept.to(torch.long).cumprod(dim=1).sum(dim=1)  # [B]
    at_stop = argmax.gather(1, num_accepted.clamp_max(k_max - 1)[:, None])[:, 0]
    stop_token = torch.where(num_accepted < num_drafts, at_stop, bonus_token_ids.to(torch.long))
    output[:, :k_max] = torch.where(slots < num_accepted[:, None], drafts, PLACEHOLDER)
    output.scatter_(1, num_accepted[:, None], stop_token[:, None])
    return output, num_accepted


def padded_rows(num_drafts: torch.Tensor, k_max: int) -> torch.Tensor:  # [B, K] long
    """``token_rows`` for drafts laid out back to back ([N, V] with N = sum num_drafts); slots past
    a request's drafts point at a valid row and are masked by ``num_drafts``."""
    counts = num_drafts.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts
    rows = starts[:, None] + torch.arange(k_max, device=counts.device)[None, :]
    return rows.clamp(0, max(int(counts.sum()) - 1, 0))

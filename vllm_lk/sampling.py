"""Exact speculative sampling as pure tensor math (no vLLM imports).

Notation (Leviathan et al. 2023; Chen et al. 2023): p = target distribution, q = draft
distribution, both *after* the request's sampling transforms (temperature, top-k, top-p), so the
acceptance rate at a position is sum_v min(p_v, q_v). One verification step for a request with K
drafts x_1..x_K:

    for k = 1..K:  accept x_k with probability min(1, p_k(x_k) / q_k(x_k))
    first rejection at k:  emit a token from normalize(max(0, p_k - q_k)) and stop
    all K accepted:        emit a bonus token from p_{K+1}

Greedy requests (temperature 0) accept while x_k == argmax p_k and emit argmax at the stop.
Randomness comes in as arguments (uniform draws for acceptance, Exp(1) noise for the one
categorical draw per request), so every function is deterministic and testable; the vLLM wiring
draws them from per-request generators.
"""

from __future__ import annotations

import torch

PLACEHOLDER = -1  # output slot with no token (rejected tail), as in vLLM


def sampling_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N]; rows with 0 (greedy) are scaled by 1
    top_k: torch.Tensor | None = None,  # [N] int; >= V or <= 0 keeps everything
    top_p: torch.Tensor | None = None,  # [N] float; 1.0 keeps everything
) -> torch.Tensor:  # [N, V], rows sum to 1, in logits' dtype (>= float32)
    """softmax(logits / T) restricted to the top-k tokens, then to the top-p nucleus.

    The same rules as vLLM's sampler (``apply_top_k_top_p``), so a speculative step samples from
    exactly the distribution the request gets without speculation: top-k keeps every token whose
    logit is >= the k-th largest (ties at the boundary are kept); top-p then sorts ascending and
    drops tokens while the cumulative probability stays <= 1 - p, always keeping the largest.
    """
    assert logits.dim() == 2 and temperature.shape == logits.shape[:1], (logits.shape, temperature.shape)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[1]
    temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(dtype)
    scaled = logits.to(dtype) / temperature[:, None]
    if top_k is None and top_p is None:
        return scaled.softmax(dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, stable=True)  # ascending
    if top_k is not None:
        k = top_k.to(torch.long)
        k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
        kth_largest = sorted_logits.gather(1, (vocab - k)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p.to(dtype))[:, None]
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    restricted = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    return restricted.softmax(dim=-1)


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


def sample_with_noise(
    probs: torch.Tensor,  # [N, V]
    exp_noise: torch.Tensor,  # [N, V], i.i.d. Exp(1)
) -> torch.Tensor:  # [N] int64
    """argmax(probs / noise): an exact draw from each row's categorical (the exponential race)."""
    return (probs / exp_noise).argmax(dim=-1)


def verify(
    draft_token_ids: torch.Tensor,  # [B, K] int; slots at or past num_drafts are ignored
    num_drafts: torch.Tensor,  # [B] int, 0..K
    draft_probs: torch.Tensor | None,  # [B, K, V] q the drafts were sampled from; None: one-hot q
    target_probs: torch.Tensor,  # [B, K, V] p at each draft position
    bonus_token_ids: torch.Tensor,  # [B] int, drawn from p at position num_drafts (argmax if greedy)
    is_greedy: torch.Tensor,  # [B] bool, temperature 0
    uniforms: torch.Tensor,  # [B, K] U[0, 1) draws for acceptance
    exp_noise: torch.Tensor,  # [B, V] Exp(1) draws for the residual sample
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, K+1] int64 tokens, PLACEHOLDER-padded; [B] accepted)
    """One verification step for a batch; greedy and sampled requests may be mixed.

    Row b emits its first ``num_accepted[b]`` drafts and then one more token: the residual sample
    at the first rejection, or the bonus token when every draft is accepted. The bonus token comes
    from the caller because it is an ordinary sample from the target at the next position (vLLM
    draws it with its own sampler, penalties and all). A draft with q(x) = 0 or a negative id is
    rejected: it cannot have been drawn from q. One-hot q (``draft_probs=None``) is exact only for
    drafts that were chosen deterministically (argmax, n-gram).
    """
    batch, k_max = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    assert num_drafts.shape == (batch,) and is_greedy.shape == (batch,) and bonus_token_ids.shape == (batch,)
    assert target_probs.shape == (batch, k_max, vocab), target_probs.shape
    assert uniforms.shape == (batch, k_max) and exp_noise.shape == (batch, vocab)
    assert draft_probs is None or draft_probs.shape == (batch, k_max, vocab), draft_probs.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    output = torch.full((batch, k_max + 1), PLACEHOLDER, dtype=torch.long, device=device)
    if k_max == 0:
        output[:, 0] = bonus_token_ids
        return output, torch.zeros(batch, dtype=torch.long, device=device)
    in_range = torch.arange(k_max, device=device)[None, :] < num_drafts[:, None]  # [B, K]
    drafts = draft_token_ids.to(torch.long)
    safe_drafts = drafts.clamp_min(0)[..., None]  # [B, K, 1]

    target_argmax = target_probs.argmax(dim=-1)  # [B, K]
    p_draft = target_probs.gather(-1, safe_drafts)[..., 0]  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(-1, safe_drafts)[..., 0].to(p_draft.dtype)
    accept_sampled = (q_draft > 0) & (uniforms.to(p_draft.dtype) * q_draft < p_draft)
    accept_greedy = drafts == target_argmax
    accept = torch.where(is_greedy[:, None], accept_greedy, accept_sampled) & in_range & (drafts >= 0)
    num_accepted = accept.to(torch.long).cumprod(dim=1).sum(dim=1)  # [B]

    # After a rejection at slot j = num_accepted: residual sample (argmax of p_j if greedy).
    slot = num_accepted.clamp_max(k_max - 1)
    p_slot = target_probs[rows, slot]  # [B, V]
    if draft_probs is None:
        q_slot = torch.nn.functional.one_hot(safe_drafts[rows, slot, 0], vocab).to(p_slot.dtype)
        q_slot = q_slot * (drafts[rows, slot] >= 0)[:, None]
    else:
        q_slot = draft_probs[rows, slot].to(p_slot.dtype)
    residual_token = sample_with_noise(residual_probs(p_slot, q_slot), exp_noise.to(p_slot.dtype))
    residual_token = torch.where(is_greedy, target_argmax[rows, slot], residual_token)
    rejected = num_accepted < num_drafts
    stop_token = torch.where(rejected, residual_token, bonus_token_ids.to(torch.long))

    positions = torch.arange(k_max, device=device)[None, :]
    output[:, :k_max] = torch.where(positions < num_accepted[:, None], drafts, PLACEHOLDER)
    output[rows, num_accepted] = stop_token
    return output, num_accepted

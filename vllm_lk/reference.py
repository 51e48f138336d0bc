"""Slow, obviously-correct versions of :mod:`vllm_lk.sampling`, for tests.

Plain Python loops over rows and positions, written from the definitions rather than from the
vectorised code; given the same random draws they must produce exactly the same tokens.
"""

from __future__ import annotations

import math

import torch


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    rows = []
    for i in range(logits.shape[0]):
        t = float(temperature[i]) if float(temperature[i]) > 0 else 1.0
        scaled = [float(x) / t for x in logits[i]]
        vocab = len(scaled)
        keep = [True] * vocab
        if top_k is not None:
            k = int(top_k[i])
            if 0 < k < vocab:
                kth = sorted(scaled, reverse=True)[k - 1]
                keep = [s >= kth for s in scaled]
        if top_p is not None:
            # ascending by logit, ties in index order; drop while the running sum stays <= 1 - p
            order = sorted(range(vocab), key=lambda v: (scaled[v], v))
            weights = {v: math.exp(scaled[v] - max(scaled)) for v in range(vocab) if keep[v]}
            total = sum(weights.values())
            running = 0.0
            for position, v in enumerate(order):
                if not keep[v]:
                    continue
                running += weights[v] / total
                if running <= 1 - float(top_p[i]) and position != vocab - 1:
                    keep[v] = False
        peak = max(s for s, kept in zip(scaled, keep) if kept)
        weights = [math.exp(s - peak) if kept else 0.0 for s, kept in zip(scaled, keep)]
        total = sum(weights)
        rows.append([w / total for w in weights])
    return torch.tensor(rows, dtype=torch.float64)


def _softmax(row) -> list[float]:
    values = [float(x) for x in row]
    peak = max(values)
    weights = [math.exp(v - peak) if v != float("-inf") else 0.0 for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def _inverse_cdf(dist: list[float], u: float) -> int:
    """The first token whose running sum exceeds u * (the full sum)."""
    cumulative = []
    for weight in dist:
        cumulative.append((cumulative[-1] if cumulative else 0.0) + weight)
    threshold = u * cumulative[-1]
    return next((v for v, c in enumerate(cumulative) if c > threshold), len(dist) - 1)


def verify(draft_token_ids, num_drafts, draft_probs, target_logits, token_rows, bonus_token_ids, is_greedy, uniforms, residual_uniforms):
    batch, k_max = draft_token_ids.shape
    vocab = target_logits.shape[-1]
    output = torch.full((batch, k_max + 1), -1, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        emitted = []
        rejected_at = None
        for k in range(int(num_drafts[b])):
            row = int(token_rows[b, k])
            x = int(draft_token_ids[b, k])
            p = _softmax(target_logits[row])
            if bool(is_greedy[b]):
                ok = x == max(range(vocab), key=lambda v: (p[v], -v))
            else:
                q_x = 1.0 if draft_probs is None else float(draft_probs[row, x]) if x >= 0 else 0.0
                ok = x >= 0 and q_x > 0 and float(uniforms[b, k]) * q_x < p[x]
            if not ok:
                rejected_at = k
                break
            emitted.append(x)
        if rejected_at is None:
            token = int(bonus_token_ids[b])
        else:
            row = int(token_rows[b, rejected_at])
            p = _softmax(target_logits[row])
            if bool(is_greedy[b]):
                token = max(range(vocab), key=lambda v: (p[v], -v))
            else:
                x = int(draft_token_ids[b, rejected_at])
                if draft_probs is None:
                    q = [1.0 if v == x else 0.0 for v in range(vocab)]
                else:
                    q = [float(w) for w in draft_probs[row]]
                residual = [max(0.0, p[v] - q[v]) for v in range(vocab)]
                total = sum(residual)
                dist = [r / total for r in residual] if total > 0 else p
                token = _inverse_cdf(dist, float(residual_uniforms[b]))
        accepted[b] = len(emitted)
        emitted.append(token)
        output[b, : len(emitted)] = torch.tensor(emitted)
    return output, accepted

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


def verify(draft_token_ids, num_drafts, draft_probs, target_probs, bonus_token_ids, is_greedy, uniforms, exp_noise):
    batch, k_max = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    output = torch.full((batch, k_max + 1), -1, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        emitted = []
        rejected_at = None
        for k in range(int(num_drafts[b])):
            x = int(draft_token_ids[b, k])
            p = target_probs[b, k]
            if bool(is_greedy[b]):
                ok = x == int(p.argmax())
            else:
                q_x = 1.0 if draft_probs is None else float(draft_probs[b, k, x]) if x >= 0 else 0.0
                ok = x >= 0 and q_x > 0 and float(uniforms[b, k]) * q_x < float(p[x])
            if not ok:
                rejected_at = k
                break
            emitted.append(x)
        if rejected_at is None:
            token = int(bonus_token_ids[b])
        elif bool(is_greedy[b]):
            token = int(target_probs[b, rejected_at].argmax())
        else:
            p = target_probs[b, rejected_at]
            if draft_probs is None:
                q = torch.zeros(vocab, dtype=p.dtype)
                x = int(draft_token_ids[b, rejected_at])
                if x >= 0:
                    q[x] = 1.0
            else:
                q = draft_probs[b, rejected_at].to(p.dtype)
            residual = torch.tensor([max(0.0, float(p[v]) - float(q[v])) for v in range(vocab)], dtype=p.dtype)
            dist = residual / residual.sum() if float(residual.sum()) > 0 else p
            token = int((dist / exp_noise[b].to(dist.dtype)).argmax())
        accepted[b] = len(emitted)
        emitted.append(token)
        output[b, : len(emitted)] = torch.tensor(emitted)
    return output, accepted

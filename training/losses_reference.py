"""Eager, obviously-correct versions of :mod:`training.losses` for tests: whole-batch softmaxes
and autograd through ``torch.minimum`` (no chunking, no hand-written gradients)."""

from __future__ import annotations

import torch

from training.losses import ALPHA_FLOOR


def draft_loss(draft_logits, target_logits, kind, *, temperature=1.0, draft_ids=None, eta=3.0, lambda_per_token=False):
    log_q = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    q = log_q.exp()
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    if draft_ids is not None:
        p = p[:, draft_ids]
    alpha = torch.minimum(p, q).sum(-1)
    p_tilde = p / p.sum(-1, keepdim=True)
    kl = (torch.special.xlogy(p_tilde, p_tilde) - p_tilde * log_q).sum(-1)
    tv = 1 - alpha
    if kind == "kl":
        per_token = kl
    elif kind == "tv":
        per_token = tv
    elif kind == "lk-hybrid":
        lam = torch.exp(-eta * (alpha if lambda_per_token else alpha.mean()).detach())
        per_token = lam * kl + (1 - lam) * tv
    elif kind == "lk-alpha":
        # -log alpha; below ALPHA_FLOOR (disjoint supports) the value is -log(floor) and the
        # gradient -dalpha / floor, so training still moves q toward p there
        floor = alpha.detach().clamp_min(ALPHA_FLOOR)
        per_token = -torch.log(floor) - (alpha - alpha.detach()) / floor
    else:
        raise ValueError(kind)
    return per_token.mean(), alpha.detach(), kl.detach()

"""Comparing two training runs that should have taken the same steps (shared by unit and
integration tests)."""

from __future__ import annotations

import torch


def assert_same_training(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], smooth: bool) -> None:
    """Two runs took the same steps, up to floating-point summation order. ``smooth`` (KL): the
    RMS difference < 1e-6, at most 0.1 % of elements beyond 1e-5 and none beyond half a step.
    Otherwise (a loss with min(p, q), whose kink lets a flipped near-tie move isolated elements
    by whole steps; see test_two_gloo_ranks_match_one_process): the median difference < 2e-7 and
    the 90th percentile < 1e-5. A wrong step moves the bulk: dropping one of 96 tokens a row from
    the loss gives a median of 6e-6 and a 90th percentile of 7.5e-5."""
    assert one.keys() == two.keys()
    diff = torch.cat([(one[k].float() - two[k].float()).flatten() for k in one]).abs()
    rms, worst, far = float(diff.pow(2).mean().sqrt()), float(diff.max()), int((diff > 1e-5).sum())
    median, q90 = float(diff.median()), float(diff.quantile(0.9))
    figures = dict(rms=rms, worst=worst, far=far, elements=diff.numel(), median=median, q90=q90)
    if smooth:
        assert rms < 1e-6 and worst < 5e-4 and far <= diff.numel() // 1000, figures
    else:
        assert median < 2e-7 and q90 < 1e-5, figures

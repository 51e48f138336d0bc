"""training.evaluate's offline predictions, on hand-made alphas (no model, no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from training.evaluate import alpha_grid, predict, predict_at_steps

NAN = math.nan


def test_alpha_grid_puts_each_row_at_its_context_end():
    # prompt of 2 tokens + 6 generated: rows t = 1..6 train (token t + 1 was generated)
    mask = torch.tensor([[False, True, True, True, True, True, True, False]])
    head0 = torch.arange(6, dtype=torch.float64)  # rows t = 1..6
    grid0 = alpha_grid(head0, mask, 0)
    assert grid0[0, 1:7].tolist() == head0.tolist() and math.isnan(grid0[0, 0]) and math.isnan(grid0[0, 7])
    # head 1: draft row t is trained where target row t + 1 is: t = 0..5 for mask rows 1..6
    grid1 = alpha_grid(torch.arange(6, dtype=torch.float64), mask, 1)
    assert grid1[0, :6].tolist() == list(range(6)) and math.isnan(grid1[0, 6]) and math.isnan(grid1[0, 7])
    assert alpha_grid(torch.zeros(0, dtype=torch.float64), mask, 8).isnan().all()


def test_prediction_walks_the_served_steps():
    """Steps accepted (1, 0, 2) from context end 2: contexts 2, 4, 5; the step at 7 runs past the
    generated tokens and is skipped."""
    a0 = torch.tensor([[NAN, NAN, 0.5, NAN, 0.8, 0.9, NAN, NAN]], dtype=torch.float64)
    a1 = torch.tensor([[NAN, NAN, 0.4, NAN, 0.5, 0.1, NAN, NAN]], dtype=torch.float64)
    sums, used = predict_at_steps([a0, a1], [(2, [1, 0, 2, 0])], 2)
    assert used == 3
    assert sums.tolist() == pytest.approx([0.5 + 0.8 + 0.9, 0.5 * 0.4 + 0.8 * 0.5 + 0.9 * 0.1])


def test_independent_draft_uses_its_one_head_along_the_positions():
    a0 = torch.tensor([[NAN, 0.5, 0.4, 0.3, 0.2, NAN]], dtype=torch.float64)
    sums, used = predict_at_steps([a0], [(1, [2, 5])], 3)  # contexts 1 (positions 1..3), then 4: past the end
    assert used == 1 and sums.tolist() == pytest.approx([0.5, 0.5 * 0.4, 0.5 * 0.4 * 0.3])


def test_independence_prediction():
    out = predict([0.5, 0.4], 2)
    assert out["per_position_acceptance"] == pytest.approx([0.5, 0.2]) and out["tau"] == pytest.approx(1.7)
    assert predict([0.5], 3)["per_position_acceptance"] == pytest.approx([0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="fewer than num_speculative_tokens"):
        predict([0.5, 0.4], 3)

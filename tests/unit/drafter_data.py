"""Helpers for the drafter unit tests: real target outputs from ``tiny_target``, synthetic ones
with recognisable rows, and a short training loop."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from tests.conftest import one_torch_thread
from training.drafters.base import TargetOutputs
from training.losses import multi_head_loss
from training.target import run_target
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def target_model(tiny_target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target), dtype=torch.float32).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(tiny_target))


def real_batch(target_model, batch: int = 4, length: int = 48) -> TargetOutputs:
    """``batch`` windows of real Python source (json's encoder) through the tiny target; the
    first 4 rows of each window play the prompt (untrained)."""
    model, tokenizer = target_model
    ids = tokenizer(inspect.getsource(json.encoder)[:3000], add_special_tokens=False)["input_ids"]
    assert len(ids) >= batch * length, len(ids)
    windows = torch.tensor([ids[i * length : (i + 1) * length] for i in range(batch)])  # [B, T]
    mask = torch.ones_like(windows, dtype=torch.bool)
    mask[:, :4] = False
    return run_target(model, windows, mask, hidden_layers=(model.config.num_hidden_layers,))


def synthetic_batch(layers: int, hidden: int, vocab: int, batch: int = 2, length: int = 10, seed: int = 0) -> TargetOutputs:
    """Random hidden states / logits / tokens and a random mask, for alignment bookkeeping."""
    gen = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(batch, length, hidden, generator=gen) if i == layers else None for i in range(layers + 1))
    return TargetOutputs(
        input_ids=torch.randint(0, vocab, (batch, length), generator=gen),
        loss_mask=torch.rand(batch, length, generator=gen) < 0.7,
        hidden_states=states,
        logits=torch.randn(batch, length, vocab, generator=gen),
    )


def train(drafter, target: TargetOutputs, steps: int, lr: float = 3e-3, loss: str = "lk-hybrid") -> list[float]:
    """Full-batch AdamW steps on ``multi_head_loss``; the loss before each step (one intra-op
    thread: these tensors are tiny)."""
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=lr)
    losses = []
    with one_torch_thread():
        for _ in range(steps):
            pairs = drafter(target)
            value, _ = multi_head_loss([d for d, _ in pairs], [t for _, t in pairs], loss, eta=drafter.default_eta,
                                       draft_ids=drafter.draft_ids)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
    return losses


def config(kind: str, **overrides) -> TrainConfig:
    return TrainConfig(drafter=kind, num_heads=3, **overrides)


def expected_pairs(head_logits: list[torch.Tensor], target: TargetOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Alignment restated as a loop: head k's row t goes with target row t+k when row t+k is trained."""
    pairs = []
    batch, length = target.input_ids.shape
    for k, logits in enumerate(head_logits, start=1):
        rows = [(b, t) for b in range(batch) for t in range(length - k) if target.loss_mask[b, t + k]]
        draft = torch.stack([logits[b, t] for b, t in rows]) if rows else logits.new_zeros(0, logits.shape[-1])
        full = target.all_logits()
        ref = torch.stack([full[b, t + k] for b, t in rows]) if rows else full.new_zeros(0, logits.shape[-1])
        pairs.append((draft, ref))
    return pairs

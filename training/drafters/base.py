"""What every drafter shares: the target's outputs it trains on, head alignment, the interface.

Alignment (the same for every drafter, and the one vLLM serves): at a verification step the target
has just produced token x_{t+1} from its row t. Draft k (1-based, k = 1..K) proposes x_{t+1+k}
and is verified against the target's row t+k (the target's distribution for x_{t+k+1} given the
prefix). So a drafter that predicts from anchor row t with ``offset`` k is trained against
``target.logits[:, t + k]``; an independent draft model predicts every row itself (offset 0).

Rows whose next token is not a training token (prompt tokens, padding) are left out through
``loss_mask``: only the target's own responses are distilled, as the paper does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class HeadRows:
    """The logits of a linear head at N rows, kept as what the head reads: ``hidden`` [N, H] and
    ``weight`` [V, H] (+ ``bias`` [V]); logits = hidden @ weight.T + bias. Both sides of a
    training pair come this way: the target's rows (no gradient) and the drafter's (gradient to
    hidden, weight and bias). The losses turn them into logits chunk by chunk, so [N, V] never
    exists at once: 8 x 2048 rows of a 128k vocabulary are 8.4 GB in fp32, their hidden rows
    0.27 GB. ``dtype`` is the matmul's (the autocast dtype the drafter ran under, else hidden's)."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    dtype: torch.dtype | None = None
    # temperatures -> [len(temperatures), N] fp32 logsumexp of these rows' logits / T over the
    # whole vocabulary, when it is shared with other heads' rows (select_rows: the target's)
    row_lse: Callable[[tuple[float, ...]], torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hidden.shape[0], self.weight.shape[0])

    def logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:  # [stop - start, V] fp32
        """Rows start..stop as the head computes them (in ``dtype``), returned in fp32;
        differentiable (the materialised path)."""
        dtype = self.dtype or self.hidden.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(self.hidden[start:stop].to(dtype), self.weight.to(dtype), bias).float()

    @classmethod
    def of(cls, hidden: torch.Tensor, head: nn.Module) -> HeadRows:
        """Rows of ``head`` (an nn.Linear) over ``hidden`` [N, H], with the matmul dtype autocast
        would give ``head(hidden)`` here."""
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return cls(hidden, head.weight, getattr(head, "bias", None), dtype)


@dataclass(frozen=True)
class TargetOutputs:
    """One batch as the frozen target sees it (no gradients anywhere)."""

    input_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool: row t is trained (token t+1 is a response token)
    # (L+1) x [B, T, H]: [0] the embeddings, [l] the output of decoder layer l for 0 < l < L
    # (vLLM's aux hidden state id l), [L] the final *normed* state that lm_head reads
    # (what vLLM hands MEDUSA / MLP speculators). Empty when the drafter needs none.
    hidden_states: tuple[torch.Tensor, ...]
    # the target's next-token logits, one of two ways: ``logits`` [B, T, V] (row t = the logits
    # for token t+1), or ``head_input`` [B, T, H] (the final normed state) with ``lm_head``,
    # from which the losses compute only the trained rows' logits, a chunk at a time
    logits: torch.Tensor | None = None
    head_input: torch.Tensor | None = None
    lm_head: nn.Module | None = None
    _lse: dict = field(default_factory=dict, compare=False, repr=False)  # temperatures -> position_lse

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def position_lse(self, temperatures: tuple[float, ...]) -> torch.Tensor:  # [len(temperatures), B, T] fp32
        """logsumexp(logits / T) at every position, computed once per batch and temperature set:
        the K heads of EAGLE-3 / MEDUSA / MLP read the same target rows shifted, so a truncated
        draft vocabulary needs one full-vocabulary pass per batch instead of one per head."""
        if temperatures not in self._lse:
            from training.losses import head_lse

            rows = HeadRows(self.head_input.flatten(0, 1), self.lm_head.weight, getattr(self.lm_head, "bias", None))
            self._lse[temperatures] = head_lse(rows, temperatures).unflatten(1, self.head_input.shape[:2])
        return self._lse[temperatures]

    def all_logits(self) -> torch.Tensor:  # [B, T, V] fp32
        """Every row's logits at once (for tests and small models; training never needs them)."""
        if self.logits is not None:
            return self.logits
        return F.linear(self.head_input, self.lm_head.weight, getattr(self.lm_head, "bias", None)).float()


def as_logits(side) -> torch.Tensor:  # [N, V] fp32
    """One side of a select_rows pair as a logits tensor (materialising HeadRows)."""
    return side.logits() if isinstance(side, HeadRows) else side


def select_rows(
    draft: torch.Tensor,  # [B, T, Vd] draft logits, or with ``head`` [B, T, Hd] what the head reads
    target: TargetOutputs,
    offset: int,
    head: nn.Module | None = None,  # the drafter's lm_head (nn.Linear) over ``draft``
) -> tuple[torch.Tensor | HeadRows, torch.Tensor | HeadRows]:  # ([N, Vd] draft, [N, V] target) over the trained rows
    """Pair each draft row with the target row ``offset`` later, keeping rows the mask trains.
    Given the heads (``head`` here, the target's ``lm_head`` in ``target``), a side is returned
    as HeadRows and its logits are computed only inside the losses, a chunk at a time."""
    length = target.length
    keep = target.loss_mask[:, offset:]  # [B, T - offset]
    rows = draft[:, : max(length - offset, 0)][keep]
    draft_side = rows if head is None else HeadRows.of(rows, head)
    if target.logits is not None:
        return draft_side, target.logits[:, offset:][keep]
    lm_head = target.lm_head
    row_lse = lambda temperatures: target.position_lse(temperatures)[:, :, offset:][:, keep]  # noqa: E731
    return draft_side, HeadRows(target.head_input[:, offset:][keep], lm_head.weight, getattr(lm_head, "bias", None), row_lse=row_lse)


class Drafter(nn.Module):
    """A trainable draft head for a frozen target.

    ``forward`` returns one (draft, target) pair per loss term, in head order, each side [N, Vd] /
    [N, V] logits or HeadRows (see select_rows) (the γ^(k-1) weights follow that order); ``export`` writes a directory vLLM 0.32 with
    the vllm_lk plugin loads as ``speculative_config={"method": vllm_method, "model": out}``.
    Weights shared with the target (embeddings) are frozen references, not parameters.
    """

    kind: ClassVar[str]  # the --drafter name
    vllm_method: ClassVar[str]  # speculative_config["method"]
    default_eta: ClassVar[float] = 3.0  # LK-hybrid η (the paper uses 10 for MEDUSA)
    hidden_layers: tuple[int, ...] = ()  # which entries of TargetOutputs.hidden_states it reads
    activation_checkpointing: bool = False  # rerun each step's layers in backward (set_activation_checkpointing)

    def forward(self, target: TargetOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each step's (head's, stage's) inputs in the forward pass and recompute its
        layers in backward: less activation memory for about one more forward of the drafter."""
        self.activation_checkpointing = enabled

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """[Vd] target id of each draft-vocabulary id when the vocabulary is truncated, else None."""
        return None

    def hf_config(self) -> dict:
        """The exported config.json (architecture and sizes vLLM reads)."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: every parameter under its own name (drafter modules name their
        parameters exactly as vLLM's checkpoint layout does), fp32."""
        return {name: p.detach().float().contiguous().clone() for name, p in self.named_parameters()}

    def export(self, out: Path) -> None:
        """Write config.json + model.safetensors in the layout vLLM loads (no LK metadata here)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        save_file(self.export_tensors(), str(out / "model.safetensors"), metadata={"format": "pt"})

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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TargetRows:
    """The target's logits at N rows, kept as the state its lm_head reads: ``hidden`` [N, H] and
    ``weight`` [V, H] (+ ``bias`` [V]). The losses turn them into logits chunk by chunk
    (:meth:`logits`), so [N, V] never exists at once: 8 x 2048 rows of a 128k vocabulary would
    be 8.4 GB in fp32, the hidden rows 0.27 GB."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hidden.shape[0], self.weight.shape[0])

    def logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:  # [stop - start, V] fp32
        """Rows start..stop, as the target's own forward computes them (its dtype), in fp32."""
        return F.linear(self.hidden[start:stop], self.weight, self.bias).float()


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

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def all_logits(self) -> torch.Tensor:  # [B, T, V] fp32
        """Every row's logits at once (for tests and small models; training never needs them)."""
        if self.logits is not None:
            return self.logits
        return F.linear(self.head_input, self.lm_head.weight, getattr(self.lm_head, "bias", None)).float()


def as_logits(target) -> torch.Tensor:  # [N, V] fp32
    """The target side of a select_rows pair as a tensor (materialising TargetRows)."""
    return target.logits() if isinstance(target, TargetRows) else target


def select_rows(
    draft_logits: torch.Tensor,  # [B, T, Vd] draft logits; row t predicts what target row t+offset does
    target: TargetOutputs,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor | TargetRows]:  # ([N, Vd] draft, [N, V] target) over the trained rows
    """Pair each draft row with the target row ``offset`` later, keeping rows the mask trains."""
    length = target.length
    keep = target.loss_mask[:, offset:]  # [B, T - offset]
    draft = draft_logits[:, : max(length - offset, 0)][keep]
    if target.logits is not None:
        return draft, target.logits[:, offset:][keep]
    head = target.lm_head
    return draft, TargetRows(target.head_input[:, offset:][keep], head.weight, getattr(head, "bias", None))


class Drafter(nn.Module):
    """A trainable draft head for a frozen target.

    ``forward`` returns one (draft logits [N, Vd], target logits [N, V]) pair per loss term, in
    head order (the γ^(k-1) weights follow that order); ``export`` writes a directory vLLM 0.32 with
    the vllm_lk plugin loads as ``speculative_config={"method": vllm_method, "model": out}``.
    Weights shared with the target (embeddings) are frozen references, not parameters.
    """

    kind: ClassVar[str]  # the --drafter name
    vllm_method: ClassVar[str]  # speculative_config["method"]
    default_eta: ClassVar[float] = 3.0  # LK-hybrid η (the paper uses 10 for MEDUSA)
    hidden_layers: tuple[int, ...] = ()  # which entries of TargetOutputs.hidden_states it reads

    def forward(self, target: TargetOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

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

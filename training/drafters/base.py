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


@dataclass(frozen=True)
class TargetOutputs:
    """One batch as the frozen target sees it (no gradients anywhere)."""

    input_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] bool: row t is trained (token t+1 is a response token)
    # (L+1) x [B, T, H]: [0] the embeddings, [l] the output of decoder layer l for 0 < l < L
    # (vLLM's aux hidden state id l), [L] the final *normed* state that lm_head reads
    # (what vLLM hands MEDUSA / MLP speculators). Empty when the drafter needs none.
    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor  # [B, T, V] row t = the target's logits for token t+1


def select_rows(
    draft_logits: torch.Tensor,  # [B, T, Vd] draft logits; row t predicts what target row t+offset does
    target: TargetOutputs,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, Vd] draft, [N, V] target) over the trained rows
    """Pair each draft row with the target row ``offset`` later, keeping rows the mask trains."""
    length = target.logits.shape[1]
    if offset >= length:
        empty = draft_logits.new_zeros(0, draft_logits.shape[-1])
        return empty, target.logits.new_zeros(0, target.logits.shape[-1])
    keep = target.loss_mask[:, offset:]  # [B, T - offset]
    draft = draft_logits[:, : length - offset][keep]
    reference = target.logits[:, offset:][keep]
    return draft, reference


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

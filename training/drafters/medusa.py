"""MEDUSA heads (Cai et al. 2024) as vLLM 0.32 serves them (``MedusaModel``, method "medusa").

Head k (1-based) reads the target's final normed hidden state h_t at the anchor row t — the row
that produced the last sampled token x_{t+1} — and proposes x_{t+1+k}:

    block_k(x) = x + silu(W_{k,j} x + b_{k,j}), applied for j = 1..num_layers (b = 0 unless medusa_fc_bias)
    logits_k = lm_head_k(block_k(h_t))

which is ``vllm/model_executor/models/medusa.py`` (``ResidualBlock``, biased when ``medusa_fc_bias``
is set, one ``ParallelLMHead`` per head, ``logit_scale`` 1) and ``vllm_lk.proposers.lk_medusa_propose``
(q_k = softmax of head k's logits after the request's sampling transforms). With a truncated
draft vocabulary (``--draft-vocab-size``) each lm_head has a row per draft token only and the
checkpoint's ``token_map`` names their target ids; vLLM scatters the logits into the target
vocabulary with -inf elsewhere, so q is 0 off the draft vocabulary, as in training's loss.
Every head sees the same h_t, so heads are independent given the anchor: head k is verified
against target row t+k and trained with ``select_rows(..., offset=k)``.

Initialisation follows the MEDUSA reference: residual weights zero (each block starts as the
identity, so head k starts as the target's own next-token head) and lm_heads copied from the
target's lm_head (all trainable).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.drafters import VLLM_METHODS
from training.drafters.base import Drafter, HeadRows, TargetOutputs, select_rows
from training.vocab import draft_vocab_for

ARCHITECTURE = "MedusaModel"


class ResidualBlock(nn.Module):
    """vLLM's ``ResidualBlock``: x + silu(linear(x)) per layer, each layer on the previous output."""

    def __init__(self, hidden_size: int, num_layers: int, bias: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaDrafter(Drafter):
    kind = "medusa"
    vllm_method = VLLM_METHODS["medusa"]
    default_eta = 10.0  # the paper's MEDUSA setting

    def __init__(
        self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int, target_layers: int,
        draft_vocab: torch.Tensor | None = None,  # [Vd] sorted target ids, or None: the full vocabulary
        fc_bias: bool = False,  # vLLM's medusa_fc_bias: biased residual layers (the MEDUSA authors' heads)
    ) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers, self.fc_bias = num_heads, num_layers, fc_bias
        self.hidden_layers = (target_layers,)  # the final normed state, as vLLM hands it to MEDUSA
        rows = vocab_size if draft_vocab is None else draft_vocab.shape[0]
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size, num_layers, fc_bias) for _ in range(num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, rows, bias=False) for _ in range(num_heads))
        self.register_buffer("draft_vocab", draft_vocab, persistent=True)  # checkpoints carry it

    @property
    def draft_ids(self) -> torch.Tensor | None:
        return self.draft_vocab

    def head_hidden(self, hidden: torch.Tensor) -> list[torch.Tensor]:  # [..., H] -> K x [..., H]
        """What each head's lm_head reads: its residual block over the target's final normed
        hidden states (vLLM's ``Medusa.forward``)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return [checkpoint(block, hidden, use_reentrant=False) for block in self.blocks]
        return [block(hidden) for block in self.blocks]

    def head_logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:  # [..., H] -> K x [..., Vd]
        """Every head's logits (``head_hidden``, then vLLM's ``compute_logits``)."""
        return [lm_head(h) for h, lm_head in zip(self.head_hidden(hidden), self.lm_heads)]

    def forward(self, target: TargetOutputs) -> list[tuple[HeadRows, torch.Tensor | HeadRows]]:
        """K pairs (head k's rows at anchor rows t, target rows t+k)."""
        hidden = target.hidden_states[self.hidden_layers[0]]  # [B, T, H]
        assert hidden.shape[-1] == self.hidden_size, (hidden.shape, self.hidden_size)
        return [select_rows(h, target, offset=k, head=lm_head)
                for k, (h, lm_head) in enumerate(zip(self.head_hidden(hidden), self.lm_heads), start=1)]

    def hf_config(self) -> dict:
        """config.json as vLLM's ``MedusaConfig`` reads it (keys as tests/heads.py::write_medusa)."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "medusa",
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "truncated_vocab_size": self.lm_heads[0].out_features,
            "medusa_fc_bias": self.fc_bias,
            "torch_dtype": "float32",
        }

    def export_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().export_tensors()
        if self.draft_vocab is not None:  # vLLM's name for the draft -> target id map
            tensors["token_map"] = self.draft_vocab.detach().cpu().to(torch.int64).contiguous()
        return tensors




def build(target_model, config, token_counts=None) -> MedusaDrafter:
    """Fresh heads for ``target_model``: zero residual weights, lm_heads = the target's lm_head
    (its rows of the draft vocabulary when ``config.draft_vocab_size`` truncates it: the most
    frequent tokens of ``token_counts``). Parameters are fp32 whatever torch's default dtype
    (lower precision comes from autocast)."""
    tc = target_model.config
    draft_vocab = draft_vocab_for(config.draft_vocab_size, tc.vocab_size, token_counts)
    drafter = MedusaDrafter(
        tc.hidden_size, tc.vocab_size, config.num_heads, config.medusa_num_layers, tc.num_hidden_layers, draft_vocab
    ).float()
    lm_head = target_model.get_output_embeddings().weight.detach().float()  # [V, H]
    with torch.no_grad():
        for block in drafter.blocks:
            for layer in block.layers:
                layer.weight.zero_()
        for head in drafter.lm_heads:
            head.weight.copy_(lm_head if draft_vocab is None else lm_head[draft_vocab])
    return drafter


def load(path: str | Path, target_model) -> MedusaDrafter:
    """The MEDUSA heads at ``path``, ours or the MEDUSA authors' (``training.formats.medusa``),
    checked against ``target_model`` before a weight is copied: every tensor present, none
    extra, each of the shape the target needs (its hidden size and vocabulary)."""
    from training.formats import medusa as layout
    from training.formats.files import check_shapes, check_value

    tc = target_model.config
    c = layout.read(path, tc.vocab_size)
    drafter = MedusaDrafter(
        tc.hidden_size, tc.vocab_size, c.num_heads, c.num_layers, tc.num_hidden_layers, c.token_map, fc_bias=c.fc_bias
    ).float()
    check_shapes(c.tensors, {name: p.shape for name, p in drafter.named_parameters()}, c.source)
    check_value("vocab_size", c.vocab_size, tc.vocab_size, c.source)
    drafter.load_state_dict(c.tensors, strict=False)  # draft_vocab is the buffer set above
    return drafter

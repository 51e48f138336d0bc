"""Independent draft model: a smaller Llama on the target's tokenizer, distilled from the target.

It predicts every row of the sequence itself (offset 0 in base.select_rows): served with
``method="draft_model"``, vLLM runs it autoregressively over the same tokens the target sees, so
its row t is checked against the target's row t. One loss term; K only matters when serving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.drafters import VLLM_METHODS
from training.drafters.base import Drafter, HeadRows, TargetOutputs, select_rows
from vllm_lk.errors import InvalidInput

MIN_HEAD_DIM = 32  # vLLM's CPU attention rejects head_dim 16


class DraftModelDrafter(Drafter):
    kind = "draft-model"
    vllm_method = VLLM_METHODS["draft-model"]

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model  # a transformers LlamaForCausalLM

    def forward(self, target: TargetOutputs) -> list[tuple[HeadRows, torch.Tensor | HeadRows]]:
        """One pair: the draft's rows (its final normed states + lm_head; a Llama's logits are
        exactly lm_head of them) against the target's, row for row."""
        hidden = self.model.model(input_ids=target.input_ids, use_cache=False).last_hidden_state  # [B, T, H]
        return [select_rows(hidden, target, offset=0, head=self.model.lm_head)]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        super().set_activation_checkpointing(enabled)
        if enabled:  # transformers reruns each decoder layer in backward
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def export(self, out: Path) -> None:
        self.model.save_pretrained(str(out), safe_serialization=True)


def draft_llama_config(target_config, config):
    """The target's config with the draft's depth and width (head_dim kept, at least 32)."""
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
    hidden = config.draft_hidden_size or max(target_config.hidden_size // 2, head_dim)
    if hidden % head_dim or head_dim < MIN_HEAD_DIM:
        raise InvalidInput(f"draft_hidden_size {hidden} must be a multiple of the target's head_dim {head_dim} (>= {MIN_HEAD_DIM})")
    heads = hidden // head_dim
    ratio = target_config.intermediate_size / target_config.hidden_size
    draft = target_config.__class__.from_dict(target_config.to_dict())
    draft.hidden_size = hidden
    draft.intermediate_size = int(round(hidden * ratio))
    draft.num_hidden_layers = config.draft_num_layers
    draft.num_attention_heads = heads
    draft.num_key_value_heads = heads
    draft.head_dim = head_dim
    draft.architectures = ["LlamaForCausalLM"]
    return draft


def build(target_model, config, token_counts=None) -> DraftModelDrafter:
    from transformers import LlamaForCausalLM

    draft_config = draft_llama_config(target_model.config, config)
    model = LlamaForCausalLM(draft_config)
    if draft_config.hidden_size == target_model.config.hidden_size:
        # same width: start from the target's token embeddings and output head
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(target_model.get_input_embeddings().weight)
            model.lm_head.weight.copy_(target_model.lm_head.weight)
    return DraftModelDrafter(model.float().train())


def load(path: Path, target_model) -> DraftModelDrafter:
    """The independent draft at ``path`` (any transformers causal LM: ours, or a small model of
    the target's family), refused unless it predicts over the target's vocabulary."""
    from transformers import AutoModelForCausalLM

    from training.formats.files import check_shapes

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    embed = model.get_input_embeddings().weight  # [V', H']
    needed = torch.Size([target_model.config.vocab_size, embed.shape[1]])
    check_shapes({"embed_tokens.weight": embed}, {"embed_tokens.weight": needed}, f"{path} (draft-model)")
    return DraftModelDrafter(model.eval())

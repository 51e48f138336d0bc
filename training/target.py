"""The frozen target in training: load it, and run it over a batch to get what drafters learn from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from training.drafters.base import TargetOutputs
from vllm_lk.errors import InvalidInput, MissingInput


def load_target(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of an HF causal-LM directory, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingInput(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def target_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def logits_head(model) -> nn.Linear | None:
    """The target's lm_head when its logits are exactly lm_head(final normed state) (Llama and
    the like), so they can be computed later for the trained rows only; None otherwise (logit
    soft-capping or scaling: the full logits are then materialised)."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = model.get_output_embeddings()
    return head if getattr(model, "model", None) is not None and isinstance(head, nn.Linear) else None


@torch.no_grad()
def run_target(
    model,
    input_ids: torch.Tensor,  # [B, T] int64
    loss_mask: torch.Tensor,  # [B, T] bool
    hidden_layers: tuple[int, ...] = (),
    autocast_dtype: torch.dtype | None = None,
    materialise_logits: bool = False,
) -> TargetOutputs:
    """What the drafter trains on: the hidden states ``hidden_layers`` asks for (ids as in
    TargetOutputs: 0 = embeddings, l = output of layer l, num_layers = final normed state), and
    the target's logits as the final normed state + lm_head (``head_input``, ``lm_head``: the
    losses compute the trained rows' logits chunk by chunk), or as [B, T, V] fp32 ``logits``
    when ``materialise_logits`` or the model's logits are not a plain lm_head."""
    num_layers = model.config.num_hidden_layers
    if any(not 0 <= layer <= num_layers for layer in hidden_layers):
        raise InvalidInput(f"hidden layer ids {hidden_layers} must be in 0..{num_layers}")
    device_type = input_ids.device.type
    head = None if materialise_logits else logits_head(model)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        runner = model if head is None else model.model  # the decoder stack alone: no [B, T, V] logits
        out = runner(input_ids=input_ids, output_hidden_states=bool(hidden_layers), use_cache=False)
    states = tuple(out.hidden_states[i].float() if i in hidden_layers else None for i in range(num_layers + 1)) if hidden_layers else ()
    if head is None:
        return TargetOutputs(input_ids=input_ids, loss_mask=loss_mask, hidden_states=states, logits=out.logits.float())
    return TargetOutputs(input_ids=input_ids, loss_mask=loss_mask, hidden_states=states,
                         head_input=out.last_hidden_state.to(head.weight.dtype), lm_head=head)

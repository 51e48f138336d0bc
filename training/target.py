"""The frozen target in training: load it, and run it over a batch to get what drafters learn from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


@torch.no_grad()
def run_target(
    model,
    input_ids: torch.Tensor,  # [B, T] int64
    loss_mask: torch.Tensor,  # [B, T] bool
    hidden_layers: tuple[int, ...] = (),
    autocast_dtype: torch.dtype | None = None,
) -> TargetOutputs:
    """The target's logits (fp32) and the hidden states ``hidden_layers`` asks for (ids as in
    TargetOutputs: 0 = embeddings, l = output of layer l, num_layers = final normed state)."""
    num_layers = model.config.num_hidden_layers
    if any(not 0 <= layer <= num_layers for layer in hidden_layers):
        raise InvalidInput(f"hidden layer ids {hidden_layers} must be in 0..{num_layers}")
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(input_ids=input_ids, output_hidden_states=bool(hidden_layers), use_cache=False)
    states = tuple(out.hidden_states[i].float() if i in hidden_layers else None for i in range(num_layers + 1)) if hidden_layers else ()
    return TargetOutputs(input_ids=input_ids, loss_mask=loss_mask, hidden_states=states, logits=out.logits.float())

"""MEDUSA heads in the two public layouts, read for ``training.drafters.medusa.load`` (this module
knows layouts, not drafter classes).

**vLLM** (``MedusaModel``, ours; vllm/transformers_utils/configs/medusa.py, models/medusa.py):
config ``hidden_size``, ``vocab_size``, ``num_heads``, ``num_hidden_layers``,
``truncated_vocab_size``, optional ``medusa_fc_bias`` and ``original_lm_head``; tensors
``blocks.{i}.layers.{j}.weight`` (+ ``.bias``), ``lm_heads.{i}.weight`` and, for a truncated
vocabulary, ``token_map`` (draft id -> target id). vLLM strips a ``medusa_heads.`` prefix.

**MEDUSA authors** (FasterDecoding/Medusa, ``medusa/train/train.py``): config.json from their
``MedusaConfig`` (``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path``; no
sizes), weights ``medusa_lm_head.pt`` = ``medusa_head.state_dict()`` of a ModuleList of
``Sequential(ResBlock x L, Linear(H, V, bias=False))``: ``{i}.{j}.linear.weight`` and
``{i}.{j}.linear.bias`` (their ResBlock's linear has a bias) and ``{i}.{L}.weight``. vLLM 0.32's
``Medusa._remap_old_checkpoint_key`` maps exactly these names, but its config reader neither
sizes the heads from the tensors nor turns the bias on, so such a directory does not serve as
is; read here, then exported in vLLM's layout (``medusa_fc_bias`` true), it does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from training.formats.detect import MEDUSA_ORIGINAL as ORIGINAL
from training.formats.detect import detect_kind
from training.formats.files import as_float32, read_tensors
from vllm_lk.errors import InvalidInput

_ORIGINAL_BLOCK = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.linear\.(weight|bias)$")
_ORIGINAL_HEAD = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.weight$")


def architecture(layout: str, config: dict) -> tuple[int, int]:
    """(heads, residual layers per head) the checkpoint's config declares."""
    if layout == ORIGINAL:
        return int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
    return int(config["num_heads"]), int(config.get("num_hidden_layers", 1))


def _original_names(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The MEDUSA authors' names in vLLM's layout (unmatched names stay, to be reported)."""
    renamed = {}
    for name, tensor in tensors.items():
        if block := _ORIGINAL_BLOCK.match(name):
            head, layer, kind = block.groups()
            name = f"blocks.{head}.layers.{layer}.{kind}"
        elif (head := _ORIGINAL_HEAD.match(name)) and int(head.group(2)) == num_layers:
            name = f"lm_heads.{head.group(1)}.weight"
        renamed[name] = tensor
    return renamed


@dataclass(frozen=True)
class MedusaCheckpoint:
    """What a MEDUSA checkpoint holds, in vLLM's names."""

    num_heads: int
    num_layers: int
    fc_bias: bool
    vocab_size: int  # its own (the drafter module checks it against the target's)
    token_map: torch.Tensor | None  # [Vd] ascending target ids of a truncated vocabulary, int64
    tensors: dict[str, torch.Tensor]  # fp32, vLLM's names: blocks.{i}.layers.{j}.*, lm_heads.{i}.weight
    source: str


def read(path: str | Path, target_vocab: int) -> MedusaCheckpoint:
    """The MEDUSA heads at ``path`` in either layout (``target_vocab``: the vocabulary whose ids the
    token_map must name; sizes are checked against the target by the drafter module)."""
    checkpoint = detect_kind(path, "medusa")
    config, source = checkpoint.config, checkpoint.source
    heads, layers = architecture(checkpoint.layout, config)
    tensors = {k.removeprefix("medusa_heads."): v for k, v in read_tensors(checkpoint.path).items()}
    if checkpoint.layout == ORIGINAL:
        tensors = _original_names(tensors, layers)
    tensors = as_float32(tensors)
    token_map = tensors.pop("token_map", None)
    vocab = int(config.get("vocab_size", target_vocab))
    truncated = config.get("truncated_vocab_size") or vocab
    if (token_map is None) != (truncated == vocab) or (token_map is not None and token_map.shape[0] != truncated):
        raise InvalidInput(f"{source}: truncated_vocab_size {truncated} and the token_map tensor do not match")
    if token_map is not None and (int(token_map.max()) >= target_vocab or not bool((token_map[1:] > token_map[:-1]).all())):
        raise InvalidInput(f"{source} does not fit the target: token_map must hold ascending target ids below {target_vocab}")
    if config.get("original_lm_head"):  # one lm_head shared by every head: each starts from a copy
        shared = tensors.pop("lm_head.weight", tensors.pop("lm_heads.0.weight", None))
        tensors.update({f"lm_heads.{i}.weight": shared for i in range(heads)} if shared is not None else {})
    for name in [n for n in tensors if n.startswith("lm_heads.")]:
        if token_map is not None and tensors[name].shape[0] == vocab:  # full rows: vLLM keeps the token_map's
            tensors[name] = tensors[name][token_map.long()]
    bias = bool(config.get("medusa_fc_bias")) or any(name.endswith(".bias") for name in tensors)
    token_map = None if token_map is None else token_map.to(torch.int64)
    return MedusaCheckpoint(heads, layers, bias, vocab, token_map, tensors, source)

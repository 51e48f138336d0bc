"""MLP speculators in IBM's fms-extras layout, read for ``training.drafters.mlp.load`` (this module
knows the layout, not the drafter class).

fms-extras' ``MLPSpeculatorPreTrainedModel`` (fms_extras/models/hf/modeling_mlp_speculator.py)
writes config.json with ``model_type`` "mlp_speculator", ``vocab_size``, ``emb_dim``,
``inner_dim`` (0 = emb_dim), ``n_predict``, ``top_k_tokens_per_head``, ``n_candidates``,
``scale_input`` and, in later releases, ``tie_weights``; its tensors are the ``MLPSpeculator``'s
under ``speculator.``: ``emb.{i}.weight``, ``proj.{i}.weight``, ``head.{i}.weight``,
``ln.{i}.weight`` and ``ln.{i}.bias``. fms's own checkpoints have the same names without the
prefix (fms's ``_rename_hf_weights_to_fms`` strips it). With tied weights every stage shares
emb, ln and head, and stages >= 2 share proj; a checkpoint may store any copy of each, and
``MLPSpeculatorCore.load_weights`` (the serving class's loader) takes them all.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from training.formats.detect import detect_kind
from training.formats.files import as_float32, read_tensors


def inner_dim(config: dict) -> int:
    return int(config.get("inner_dim") or config["emb_dim"])


def _canonical(name: str, tie: bool) -> str:
    """The parameter a checkpoint name loads into (tied stages: the one shared module)."""
    name = name.removeprefix("speculator.")
    if tie:
        name = re.sub(r"^(emb|ln|head)\.\d+\.", r"\1.0.", name)
        name = re.sub(r"^proj\.([1-9]\d*)\.", "proj.1.", name)
    return name


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config.json, fp32 tensors under the names of ``MLPSpeculatorCore``'s parameters, source
    for messages) of the speculator at ``path``; tied checkpoints may store any stage's copy of a
    shared tensor (fms's state dict stores them all, equal): one is kept."""
    checkpoint = detect_kind(path, "mlp")
    tie = bool(checkpoint.config.get("tie_weights"))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in as_float32(read_tensors(checkpoint.path)).items():
        tensors.setdefault(_canonical(name, tie), tensor)
    return checkpoint.config, tensors, checkpoint.source

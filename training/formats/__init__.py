"""Checkpoint layouts: which public layouts a drafter is read from (``vllm-lk train --init-from``,
evaluation of an export) and written to (``--export-format``).

Read, detected from config.json (then tensor names where the config alone is ambiguous):

=====================  =========================================================  ===========
layout                 recognised by                                              drafter
=====================  =========================================================  ===========
eagle3-original        architectures ``LlamaForCausalLMEagle3`` (ours, SpecForge,  eagle3
                       the EAGLE authors), or a ``*ForCausalLM`` whose tensors
                       are ``fc.weight`` + ``midlayer.*`` (EAGLE's training config)
eagle3-speculators     ``speculators_model_type`` "eagle3" (vllm-project/speculators) eagle3
medusa-vllm            architectures ``MedusaModel`` / model_type "medusa" (ours)  medusa
medusa-original        ``medusa_num_heads`` (FasterDecoding/Medusa)                medusa
mlp-fms                ``MLPSpeculatorPreTrainedModel`` / "mlp_speculator" (ours,   mlp
                       IBM fms-extras)
draft-model            any other ``*ForCausalLM`` (ours: a small Llama)            draft-model
=====================  =========================================================  ===========

Anything else is refused, naming what was found. Every reader checks the checkpoint against the
target before a weight is copied (tensor shapes, vocabulary, aux layers); a mismatch is an
:class:`~vllm_lk.errors.InvalidInput` naming the tensor and both shapes.

Written: every drafter in the layout above marked "ours"; EAGLE-3 also in the speculators layout
(``export_format="speculators"``). See :mod:`training.formats.eagle3` for why the original layout
stays the default.

Layering (no import cycles, tests/unit/test_layout.py): the submodules (``files``, ``detect``,
``eagle3``, ``medusa``, ``mlp``) know layouts and nothing of the drafter classes; each drafter
module's ``load()`` builds its drafter from them; this top level, which dispatches to the drafter
modules and resolves TrainConfigs, sits above both.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from safetensors.torch import save_file

from training.formats.detect import Checkpoint, detect
from vllm_lk.errors import InvalidInput

__all__ = ["EXPORT_FORMATS", "Checkpoint", "architecture", "detect", "load_checkpoint", "load_for_training",
           "resolve_init_from", "write"]

EXPORT_FORMATS = ("original", "speculators")


def architecture(checkpoint: Checkpoint) -> tuple[dict, dict]:
    """(fixed, suggested) TrainConfig fields of the checkpoint: ``fixed`` is its architecture (a
    config that says otherwise is refused); ``suggested`` (EAGLE-3's TTT steps, a training
    choice the checkpoint records) applies where the config leaves the field unset."""
    from training.formats import medusa, mlp

    c, kind = checkpoint.config, checkpoint.kind
    if kind == "eagle3":
        from training.formats.eagle3 import SPECULATORS, flat_config

        flat = flat_config(c, str(checkpoint.path)) if checkpoint.layout == SPECULATORS else c
        vocab, draft = flat.get("vocab_size"), flat.get("draft_vocab_size")
        aux = (flat.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        fixed = {"drafter": kind, "draft_vocab_size": draft if draft and draft != vocab else None,
                 "aux_layers": sorted(aux) if aux else None}
        return fixed, ({"num_heads": int(flat["ttt_steps"])} if flat.get("ttt_steps") else {})
    if kind == "medusa":
        heads, layers = medusa.architecture(checkpoint.layout, c)
        truncated = c.get("truncated_vocab_size")
        draft = truncated if truncated and truncated != c.get("vocab_size") else None
        return {"drafter": kind, "num_heads": heads, "medusa_num_layers": layers, "draft_vocab_size": draft}, {}
    if kind == "mlp":
        return {"drafter": kind, "num_heads": int(c["n_predict"]), "mlp_inner_dim": mlp.inner_dim(c),
                "mlp_tie_weights": bool(c.get("tie_weights"))}, {}
    return {"drafter": kind, "draft_num_layers": int(c["num_hidden_layers"]), "draft_hidden_size": int(c["hidden_size"])}, {}


def resolve_init_from(config):
    """``config`` with the architecture of its ``init_from`` checkpoint: unset fields take the
    checkpoint's values; a field the config sets to something else is refused, naming both
    values. Idempotent (a resolved config resolves to itself), so a resumed run, which resolves
    its command line again, compares equal to the checkpoint's saved config."""
    from training.train_config import TrainConfig
    from vllm_lk.hub import resolve_model_path

    if config.init_from is None:
        return config
    checkpoint = detect(resolve_model_path(config.init_from, kind="init_from"))  # a directory, or an id in the local HF cache
    fixed, suggested = architecture(checkpoint)
    for name, theirs in fixed.items():
        ours = getattr(config, name)
        if name in config.model_fields_set and (sorted(ours) if name == "aux_layers" and ours else ours) != theirs:
            raise InvalidInput(
                f"{name}: the config asks for {ours!r}, but --init-from {checkpoint.path} ({checkpoint.layout}) has {theirs!r}; "
                f"the checkpoint fixes the drafter's architecture: leave {name} unset or start from another checkpoint")
    updates = {**{k: v for k, v in suggested.items() if k not in config.model_fields_set}, **fixed}
    try:
        resolved = TrainConfig(**{**config.model_dump(), **updates, "init_from": str(checkpoint.path.resolve())})
    except ValidationError as err:  # e.g. a --draft-vocab-size for an MLP checkpoint
        raise InvalidInput(f"--init-from {checkpoint.path} ({checkpoint.layout}): {err}") from None
    if resolved.export_format == "speculators" and resolved.drafter != "eagle3":
        raise InvalidInput(f"export_format speculators applies to eagle3 drafters; --init-from {checkpoint.path} is {resolved.drafter}")
    return resolved


def load_checkpoint(path: str | Path, target_model, *, kind: str | None = None, num_steps: int | None = None):
    """The drafter at ``path`` in any layout :func:`detect` knows, checked against
    ``target_model`` by its drafter module's ``load``. ``kind``: refuse another drafter kind;
    ``num_steps``: EAGLE-3's TTT steps (default: what the checkpoint records, else 3)."""
    from training.drafters import module

    checkpoint = detect(path)
    if kind is not None and checkpoint.kind != kind:
        raise InvalidInput(f"{checkpoint.source}: a {checkpoint.kind} checkpoint, not {kind}")
    extra = {"num_steps": num_steps} if checkpoint.kind == "eagle3" else {}
    return module(checkpoint.kind).load(checkpoint.path, target_model, **extra)


def load_for_training(config, target_model):
    """The drafter a run with ``config.init_from`` (resolved by :func:`resolve_init_from`) starts from."""
    drafter = load_checkpoint(config.init_from, target_model, kind=config.drafter,
                              num_steps=config.num_heads if config.drafter == "eagle3" else None)
    return drafter.train()  # parameters are fp32 already; .float() would copy a bf16 target's shared embeddings


def write(drafter, out: Path, export_format: str = "original", target_dir: Path | None = None) -> None:
    """Write ``drafter`` to ``out`` in ``export_format`` (config.json + model.safetensors; no LK
    metadata here). ``target_dir`` is recorded as the speculators verifier."""
    if export_format not in EXPORT_FORMATS:
        raise InvalidInput(f"export_format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if export_format == "original":
        drafter.export(out)
        return
    if drafter.kind != "eagle3":
        raise InvalidInput(f"export_format speculators applies to eagle3 drafters, not {drafter.kind}")
    from training.formats.eagle3 import speculators_config, speculators_tensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(speculators_config(drafter, target_dir), indent=2))
    save_file(speculators_tensors(drafter), str(out / "model.safetensors"), metadata={"format": "pt"})

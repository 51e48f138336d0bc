"""Draft architectures, one module each. Every module defines a ``Drafter`` subclass and

    build(target_model, config: TrainConfig, token_counts: Tensor | None) -> Drafter
        a fresh drafter for ``target_model`` (deterministic under the caller's torch seed;
        ``token_counts`` [V] are training-data token frequencies, for truncated vocabularies)
    load(path, target_model) -> Drafter
        the drafter an ``export`` wrote to ``path`` (its forward equals the exported one's); the
        readers of every layout, ours and public, live in ``training.formats``
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vllm_lk.errors import InvalidInput

# The one table of drafter kinds: kind (`--drafter`) -> (module here, the config.json
# "architectures" entry of its export, the vLLM speculative method that serves it).
KINDS: dict[str, tuple[str, str, str]] = {
    "eagle3": ("eagle3", "LlamaForCausalLMEagle3", "eagle3"),
    "medusa": ("medusa", "MedusaModel", "medusa"),
    "mlp": ("mlp", "MLPSpeculatorPreTrainedModel", "mlp_speculator"),
    "draft-model": ("draft_model", "LlamaForCausalLM", "draft_model"),
}
MODULES = {kind: module for kind, (module, _, _) in KINDS.items()}
ARCHITECTURES = {architecture: kind for kind, (_, architecture, _) in KINDS.items()}
VLLM_METHODS = {kind: method for kind, (_, _, method) in KINDS.items()}


def module(kind: str):
    if kind not in MODULES:
        raise InvalidInput(f"unknown drafter {kind!r}; choose one of {', '.join(MODULES)}")
    return importlib.import_module(f"training.drafters.{MODULES[kind]}")


def build_drafter(config, target_model, token_counts=None):
    return module(config.drafter).build(target_model, config, token_counts)


def exported_kind(path: str | Path) -> str:
    """The drafter kind of a checkpoint directory: an export of ours (either EAGLE-3 layout) or
    any public layout ``training.formats`` reads."""
    from training.formats.detect import detect

    return detect(path).kind


def load_drafter(path: str | Path, target_model):
    """The drafter at ``path``, in any layout its module's ``load`` reads, checked against ``target_model``."""
    return module(exported_kind(path)).load(Path(path), target_model)

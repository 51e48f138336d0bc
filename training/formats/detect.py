"""Which layout a checkpoint directory holds, from its config.json (and its tensor names where the
config alone is ambiguous), before any weight is read. The table is in training/formats/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.formats.files import read_config, tensor_names
from vllm_lk.errors import InvalidInput

EAGLE3_ORIGINAL, EAGLE3_SPECULATORS = "eagle3-original", "eagle3-speculators"
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
MEDUSA_VLLM, MEDUSA_ORIGINAL = "medusa-vllm", "medusa-original"
MLP_FMS = "mlp-fms"
DRAFT_MODEL = "draft-model"
READ = ("eagle3-original (ours, SpecForge, EAGLE authors)", "eagle3-speculators", "medusa-vllm (ours)",
        "medusa-original (FasterDecoding)", "mlp-fms (ours, IBM fms-extras)", "draft-model (any *ForCausalLM)")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and what it holds, known before any weight is read."""

    path: Path
    layout: str  # one of the layouts above
    kind: str  # the drafter kind (--drafter) it becomes
    config: dict  # its config.json

    @property
    def source(self) -> str:
        """How messages name it."""
        return f"{self.path} ({self.layout})"


def detect(path: str | Path) -> Checkpoint:
    """The layout of the checkpoint at ``path``, or InvalidInput naming what was found."""
    path = Path(path)
    config = read_config(path)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    found = lambda layout, kind: Checkpoint(path, layout, kind, config)  # noqa: E731
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise InvalidInput(f"{path}: speculators_model_type {config['speculators_model_type']!r}; only 'eagle3' is read")
        return found(EAGLE3_SPECULATORS, "eagle3")
    if any(a in EAGLE3_ARCHITECTURES for a in architectures):
        return found(EAGLE3_ORIGINAL, "eagle3")
    if "MedusaModel" in architectures or model_type == "medusa":
        return found(MEDUSA_VLLM, "medusa")
    if "medusa_num_heads" in config:
        return found(MEDUSA_ORIGINAL, "medusa")
    if "MLPSpeculatorPreTrainedModel" in architectures or model_type == "mlp_speculator":
        return found(MLP_FMS, "mlp")
    if any(a.endswith("ForCausalLM") for a in architectures):
        names = tensor_names(path)
        if "fc.weight" in names and any(n.startswith("midlayer.") for n in names):  # the EAGLE authors' training config
            return found(EAGLE3_ORIGINAL, "eagle3")
        if "fc.weight" in names:
            raise InvalidInput(f"{path}: an EAGLE-1/2 head (fc.weight over [embeddings; hidden state]); not supported")
        return found(DRAFT_MODEL, "draft-model")
    raise InvalidInput(f"{path}: unknown checkpoint layout (architectures {architectures}, model_type {model_type!r}); "
                       f"--init-from reads {', '.join(READ)}")


def detect_kind(path: str | Path, kind: str) -> Checkpoint:
    """:func:`detect`, refusing a checkpoint of another drafter kind."""
    checkpoint = detect(path)
    if checkpoint.kind != kind:
        raise InvalidInput(f"{checkpoint.source}: a {checkpoint.kind} checkpoint, not {kind}")
    return checkpoint

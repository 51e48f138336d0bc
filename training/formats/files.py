"""Reading checkpoint directories, whatever wrote them: config.json, the tensors in whichever
files hold them, and the one check that a checkpoint's tensors fit what the target needs.

Weights are read from ``*.safetensors`` (one file or shards), else ``pytorch_model*.bin`` (the
EAGLE authors' releases) or ``medusa_lm_head.pt`` (the MEDUSA authors' training script), the
pickles with ``weights_only=True`` so that a checkpoint cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_lk.errors import InvalidInput, MissingInput

PICKLES = ("pytorch_model*.bin", "medusa_lm_head.pt")
SHOWN = 4  # offending tensors named in one message (a wrong hidden size breaks all of them)


def read_config(path: Path) -> dict:
    """The directory's config.json as a dict."""
    if not path.is_dir():
        raise MissingInput(f"{path}: not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingInput(f"{path}: no config.json, so not a checkpoint directory this reads")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{config_file}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{config_file}: expected a JSON object")
    return config


def weight_files(path: Path) -> list[Path]:
    """The files holding the checkpoint's tensors (safetensors preferred: no pickle)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the shards (other *.safetensors may be unrelated)
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    found = sorted(path.glob("*.safetensors"))
    for pattern in PICKLES:
        found = found or sorted(path.glob(pattern))
    if not found:
        raise MissingInput(f"{path}: no weights (*.safetensors, pytorch_model*.bin or medusa_lm_head.pt)")
    return found


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, said as such
        raise InvalidInput(f"{file}: not a tensor checkpoint torch can load safely ({err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInput(f"{file}: expected a mapping of tensor names to tensors")
    return dict(state)


def tensor_names(path: Path) -> set[str]:
    """Every tensor name in the checkpoint (safetensors: read from the headers only)."""
    names: set[str] = set()
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
        else:
            names.update(_load_pickle(file))
    return names


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, in its stored dtype."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        tensors.update(load_file(str(file)) if file.suffix == ".safetensors" else _load_pickle(file))
    return tensors


def as_float32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in fp32 (drafter parameters are fp32; bf16 checkpoints widen exactly)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def check_shapes(found: Mapping[str, torch.Tensor], needed: Mapping[str, torch.Size], source: str) -> None:
    """Refuse ``found`` unless it holds exactly the tensors ``needed`` names, each of the shape
    needed; the message names each offending tensor with both shapes, e.g.
    ``fc.weight: checkpoint [4096, 12288], target needs [2048, 6144]``."""
    wrong = [f"{name}: checkpoint {list(found[name].shape)}, target needs {list(shape)}"
             for name, shape in needed.items() if name in found and tuple(found[name].shape) != tuple(shape)]
    problems = wrong[:SHOWN] + ([f"and {len(wrong) - SHOWN} more tensors of other shapes"] if len(wrong) > SHOWN else [])
    missing = [name for name in needed if name not in found]
    unexpected = sorted(set(found) - set(needed))
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise InvalidInput(f"{source} does not fit the target: " + "; ".join(problems))


def check_value(name: str, checkpoint, target, source: str) -> None:
    """Refuse a config value of the checkpoint that contradicts the target's."""
    if checkpoint != target:
        raise InvalidInput(f"{source} does not fit the target: {name}: checkpoint {checkpoint}, target needs {target}")

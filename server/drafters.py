"""What a drafter directory is, checked before an engine sees it: its config, tensor shapes,
LK metadata and identity; and whether two drafters have the same shape (an in-place swap).

A directory half-written by a crashed export, a truncated copy, or a config that does not parse
is refused here with the problem named, so a bad ``POST /admin/drafter`` never reaches the
running engine. Only headers are read (safetensors puts every tensor's dtype, shape and byte
range in its header), so a check of a multi-GB drafter costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vllm_lk.checkpoint import read_lk_metadata
from vllm_lk.errors import InvalidInput, MissingInput

# config.json keys that name or describe a checkpoint without changing what the engine builds
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "lk_metadata", "torch_dtype", "dtype"}
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps headers at 100 MB


@dataclass(frozen=True)
class DrafterDir:
    """A checked drafter directory."""

    path: Path
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    metadata: dict | None = None

    @cached_property  # read once per checked directory, not per request that records it
    def identity(self) -> str:
        """A short digest of config and tensor layout plus the weight files' sizes and times:
        what /v1/models and ``vllm_lk_info`` show to tell drafters apart."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        digest.update(json.dumps(sorted(self.tensors.items())).encode())
        for file in sorted(self.path.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:12]

    def layout(self) -> dict:
        """What must be equal for an in-place weight update."""
        config = {k: v for k, v in self.config.items() if k not in IGNORED_CONFIG_KEYS}
        return {"config": config, "tensors": self.tensors}


def _read_header(file: Path) -> dict:
    """A safetensors file's header, checked against the file's size."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{file}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > HEADER_LIMIT or 8 + length > size:
            raise InvalidInput(f"{file}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidInput(f"{file}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end != size:
        raise InvalidInput(f"{file}: truncated (its header declares {8 + length + end} bytes, the file has {size})")
    return header


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise InvalidInput(f"{index}: unreadable index ({err})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise MissingInput(f"{index} lists shards that are missing: {', '.join(missing)}")
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            return {}  # torch pickles: vLLM reads them; no header to check, and no in-place swap
        raise MissingInput(f"{path}: no weights (*.safetensors)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        for name, entry in _read_header(file).items():
            tensors[name] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
    return tensors


def check_drafter_dir(path: str | Path) -> DrafterDir:
    """Read and check a drafter directory (an export of `vllm-lk train` or any vLLM draft), or a
    training run directory holding one in ``drafter/``; raises InvalidInput / MissingInput."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"{path}: no such directory")
    if not (path / "config.json").is_file() and (path / "drafter" / "config.json").is_file():
        path = path / "drafter"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingInput(f"{path}: not a drafter directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInput(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{config_file}: not a JSON object")
    try:
        metadata = read_lk_metadata(path)
    except (ValueError, UnicodeDecodeError) as err:  # its messages name the file
        raise InvalidInput(str(err)) from None
    return DrafterDir(path=path.resolve(), config=config, tensors=_tensors(path), metadata=metadata)


def in_place_refusal(current: DrafterDir | None, new: DrafterDir, current_method: str | None, new_method: str) -> str | None:
    """Why ``new`` cannot replace ``current`` by a weight update in the running engine (None: it can)."""
    if current is None:
        return "the server runs no drafter"
    if current_method != new_method:
        return f"another method ({current_method} -> {new_method})"
    if not new.tensors or not current.tensors:
        return "no safetensors weights to update in place"
    old, fresh = current.layout(), new.layout()
    if old["config"] != fresh["config"]:
        keys = sorted(k for k in set(old["config"]) | set(fresh["config"]) if old["config"].get(k) != fresh["config"].get(k))
        return f"another architecture (config.json differs in {', '.join(keys[:5])})"
    if old["tensors"] != fresh["tensors"]:
        names = sorted(n for n in set(old["tensors"]) | set(fresh["tensors"]) if old["tensors"].get(n) != fresh["tensors"].get(n))
        return f"other tensors ({', '.join(names[:5])})"
    return None

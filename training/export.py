"""Export a trained drafter as a directory vLLM 0.32 + vllm_lk serves, with LK metadata beside it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from training.formats import write
from vllm_lk.checkpoint import FORMAT, METADATA_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_drafter(drafter, out: str | Path, *, target_dir: str | Path, metadata: dict, export_format: str | None = None) -> Path:
    """Write ``drafter`` to ``out`` atomically (temporary sibling, then rename) with
    ``lk_metadata.json``; an existing ``out`` is replaced only once the new export is complete.
    ``export_format`` (training.formats.EXPORT_FORMATS) defaults to the run's, as recorded in
    ``metadata["train_config"]``, else "original"."""
    out = Path(out)
    if export_format is None:
        export_format = (metadata.get("train_config") or {}).get("export_format", "original")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(drafter, tmp, export_format, Path(target_dir))
    if drafter.kind == "draft-model":  # a full model: ship the target's tokenizer with it
        for name in TOKENIZER_FILES:
            if (Path(target_dir) / name).is_file():
                shutil.copy2(Path(target_dir) / name, tmp / name)
    full = {"format": FORMAT, "drafter": drafter.kind, "vllm_method": drafter.vllm_method, "export_format": export_format,
            "target": str(Path(target_dir).resolve()), **metadata}
    (tmp / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    return out

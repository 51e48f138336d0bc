"""A Hugging Face hub cache built on disk by tests, in the layout ``huggingface_hub`` reads and
writes (https://huggingface.co/docs/huggingface_hub/guides/manage-cache): no download involved.

    CACHE/models--ORG--NAME/blobs/<sha256 of the file>         the bytes, stored once
                           /refs/<branch or tag>                the commit it points at (no newline)
                           /snapshots/<commit>/<file>           a relative symlink to its blob
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def add_to_hf_cache(cache: Path, repo_id: str, model_dir: Path, *, refs: tuple[str, ...] = ("main",),
                    commit: str | None = None) -> Path:
    """Put every file of ``model_dir`` into ``cache`` as ``repo_id`` at ``commit`` (default: a
    hash of the repo id), with each of ``refs`` pointing at it; returns the snapshot directory."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for source in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def fake_model(path: Path, **config) -> Path:
    """A directory that passes for a model wherever only its presence and config.json are read."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (path / "tokenizer.json").write_text("{}")
    return path

"""Model arguments (``--target``, ``--drafter``): a local directory, or a Hugging Face id found in
the local Hugging Face cache.

Resolution never touches the network, whatever ``HF_HUB_OFFLINE`` says: an id is looked up with
``snapshot_download(..., local_files_only=True)`` in the cache that ``HF_HUB_CACHE`` / ``HF_HOME``
name. Callers then hand vLLM and transformers the snapshot *directory*, so they do not go online
either. Shared by ``training`` and ``server``; vLLM processes never import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from vllm_lk.errors import InvalidInput, MissingInput

# The shape of a Hub model id, NAME or ORG/NAME, optionally @REVISION (a branch, tag or commit;
# branches may hold slashes, e.g. refs/pr/1). huggingface_hub's validator refines the id ("--", "..").
_HUB_ID = re.compile(r"(?P<repo>(?:[\w.-]+/)?[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


class ModelSource(NamedTuple):
    """Where a model argument points."""

    path: Path  # a local directory: what vLLM and transformers load
    repo_id: str | None  # the Hugging Face id it was found by; None when given as a directory
    revision: str | None  # the revision asked for (None: the cache's "main")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, with huggingface_hub's precedence (HF_HUB_CACHE, the legacy
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub), read now:
    huggingface_hub reads these once, when it is imported, which would pin a long-lived process
    (and tests) to the first environment it saw."""
    def expand(text: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(text)))

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return expand(home) / "hub"


def _looks_like_path(text: str) -> bool:
    """A value the user meant as a path: no Hub lookup, a missing one is "no such directory"."""
    head = text.split("@", 1)[0]
    return text.startswith(("/", "./", "../", "~")) or head.count("/") > 1 or "\\" in text


def resolve_model(value: str | Path, *, kind: str = "target") -> ModelSource:
    """A model directory for ``value``: an existing local directory as is, else a Hugging Face id
    (``org/name`` or ``name``, optionally ``@revision``) resolved in the local cache. ``kind``
    names the argument in messages. Raises MissingInput when neither exists."""
    text = str(value)
    local = Path(os.path.expanduser(text))  # (Path.expanduser raises on an unknown ~user)
    if local.is_dir():  # a directory wins, even when its name is also an id in the cache
        return ModelSource(local, None, None)
    if local.exists():
        raise InvalidInput(f"{kind} {text!r} is a file; expected a model directory or a Hugging Face id")
    match = _HUB_ID.fullmatch(text)
    if _looks_like_path(text) or match is None:
        raise MissingInput(f"{kind} {text!r}: no such directory")
    repo_id, revision = match["repo"], match["revision"]
    return ModelSource(_cached_snapshot(repo_id, revision, kind), repo_id, revision)


def resolve_model_path(value: str | Path, *, kind: str = "target") -> Path:
    """:func:`resolve_model`'s directory."""
    return resolve_model(value, kind=kind).path


def _cached_snapshot(repo_id: str, revision: str | None, kind: str) -> Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # newer huggingface_hub only

    cache = hub_cache_dir()
    ref = repo_id + (f"@{revision}" if revision else "")
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    how = (f"fetch it on a machine with Hub access (`{fetch}`; older huggingface_hub: `huggingface-cli download`) "
           "and copy the cache there or point HF_HUB_CACHE at a copy, or pass a model directory")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except HFValidationError as err:
        raise InvalidInput(f"{kind} {ref!r}: no such directory, and not a valid Hugging Face id ({err})") from None
    except incomplete as err:  # before its base class, LocalEntryNotFoundError: the files are partly there
        raise MissingInput(f"{kind} {ref!r}: the cached snapshot {err.snapshot_path} is incomplete; {how}") from None
    except LocalEntryNotFoundError:
        raise MissingInput(f"{kind} {ref!r} is neither a local directory nor in the Hugging Face cache at {cache}; {how}") from None
    if not (path / "config.json").is_file():  # e.g. `hf download ID README.md`: a snapshot of other files
        raise MissingInput(f"{kind} {ref!r}: the cached snapshot {path} has no config.json (downloaded in part?); {how}")
    return path

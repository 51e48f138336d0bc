"""The offline corpus: the Python standard library's own source files.

Every machine that runs Python has it, it is real and varied code (~30 MB on CPython 3.11), and it
needs no download. Files are listed in a fixed order and split into train / held-out by a hash of
their relative path, so the split is the same on every machine with the same Python version and
does not shift when a file is added elsewhere in the tree.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # path relative to the corpus root, '/'-separated
    text: str


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, heldout_every: int) -> bool:
    """One file in ``heldout_every`` is held out, chosen by a hash of its relative path."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "little") % heldout_every == 0


def list_sources(root: Path | None = None) -> list[Path]:
    """Every ``*.py`` file under ``root`` (default: the stdlib), sorted, without site-packages."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.relative_to(root).parts and path.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_sources(root: Path | None = None) -> list[SourceFile]:
    """All readable UTF-8 sources under ``root`` (files that are not UTF-8 are skipped:
    CPython's test suite contains deliberately mis-encoded files)."""
    root = root or stdlib_root()
    sources = []
    for path in list_sources(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            sources.append(SourceFile(path.relative_to(root).as_posix(), text))
    return sources


def split_sources(sources: list[SourceFile], heldout_every: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, heldout) by :func:`is_heldout`; order within each part is preserved."""
    train = [s for s in sources if not is_heldout(s.relpath, heldout_every)]
    heldout = [s for s in sources if is_heldout(s.relpath, heldout_every)]
    return train, heldout


def fingerprint(sources: list[SourceFile]) -> str:
    """sha256 over relative paths and contents: names the exact corpus a model was built from."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.relpath.encode() + b"\0" + source.text.encode() + b"\0")
    return digest.hexdigest()


def docstring_examples(source: str, max_chars: int = 2000) -> Iterator[tuple[str, str]]:
    """(docstring, function source) pairs for every documented function in ``source``.

    These become chat examples (user asks with the docstring, assistant answers with the code),
    so the toy target answers chat requests with code related to the request.
    Functions longer than ``max_chars`` and files that do not parse are skipped.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20:
            continue
        code = ast.get_source_segment(source, node, padded=True)
        if code and len(code) <= max_chars:
            yield doc.strip(), textwrap.dedent(code)

"""Prompt sets: a JSONL file of ``{"prompt"}`` / ``{"messages"}`` records, or a built-in set drawn
deterministically from the toy corpus (``builtin:KIND:SPLIT:COUNT[:SEED]``), with validated ids.

The held-out split is the toy target's: files it never trained on (split by path hash), so an
evaluation on ``builtin:code:heldout:N`` measures the drafter where neither model has seen the text.
"""

from __future__ import annotations

import ast
import functools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from training.data import DataError, Record, read_jsonl
from training.toy import corpus as corpus_lib
from vllm_lk.errors import InvalidInput

BUILTIN = "builtin"
KINDS = ("code", "docstring")
SPLITS = ("train", "heldout")


@functools.lru_cache(maxsize=4)
def _split_files(split: str, heldout_every: int, corpus_dir: str | None) -> tuple[corpus_lib.SourceFile, ...]:
    sources = corpus_lib.read_sources(Path(corpus_dir) if corpus_dir else None)
    train, heldout = corpus_lib.split_sources(sources, heldout_every)
    return tuple(train if split == "train" else heldout)


def _code_prompt(text: str, rng: random.Random, min_chars: int, max_chars: int) -> str | None:
    """A window of whole lines of ``text`` (``min_chars``..``max_chars`` long) that starts the
    continuation at a random line boundary; None if the file is too short."""
    ends = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 >= min_chars]
    if not ends:
        return None
    end = rng.choice(ends)
    start = end - rng.randint(min_chars, max_chars)
    if start > 0:
        start = text.find("\n", start) + 1  # first whole line inside the window
    window = text[max(0, start) : end]
    return window if len(window) >= min_chars // 2 and window.strip() else None


def _docstrings(text: str, max_chars: int = 2000) -> list[str]:
    """The docstrings ``corpus.docstring_examples`` pairs with code (>= 20 characters, function
    <= ``max_chars``), without slicing out each function: that slicing re-splits the whole file
    per function, which made a 200-prompt train set take ~20 s."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            size = starts[min(node.end_lineno, len(starts) - 1)] - starts[node.lineno - 1]
            if doc and len(doc) >= 20 and size <= max_chars:
                docs.append(doc.strip())
    return docs


def _docstring_records(files, rng: random.Random, make) -> Iterator[Record]:
    """Chat records, at most two per file in a first pass over the (shuffled) files so a set
    spans many files, then the remaining docstrings round-robin."""
    leftovers = []
    for source in files:
        docs = _docstrings(source.text)
        rng.shuffle(docs)
        leftovers.append((source, docs[2:]))
        for doc in docs[:2]:
            yield make(None, ({"role": "user", "content": doc},), source)
    while any(rest for _, rest in leftovers):
        for source, rest in leftovers:
            if rest:
                yield make(None, ({"role": "user", "content": rest.pop(0)},), source)


def _code_records(files, rng: random.Random, make, min_chars: int, max_chars: int) -> Iterator[Record]:
    for attempt in range(len(files) * 20):
        source = files[attempt % len(files)]
        prompt = _code_prompt(source.text, rng, min_chars, max_chars)
        if prompt is not None:
            yield make(prompt, None, source)


def builtin_prompts(
    kind: str,
    split: str,
    count: int,
    seed: int = 0,
    *,
    heldout_every: int | None = None,
    corpus_dir: Path | None = None,
    min_chars: int = 200,
    max_chars: int = 800,
    keep: Callable[[Record], bool] | None = None,
) -> list[Record]:
    """``count`` prompts drawn deterministically (same arguments, same Python -> same prompts).

    kind "code": a window of a source file ending at a line boundary, to be continued.
    kind "docstring": a chat request whose user turn is a function's docstring, exactly as the toy
    target's chat training examples ask (it answers with the function).
    split "heldout" draws only from the corpus files the toy target never trains on (the split
    is by path hash, ``heldout_every`` as the target was built with; default the toy default).
    ``keep``: candidates it rejects (e.g. too many tokens for the target's context) are skipped
    and more are drawn. Each record's extra holds its ``id`` ("KIND:SPLIT:SEED:INDEX") and
    ``source`` file.
    """
    from training.toy.target import ToyTargetConfig

    if kind not in KINDS or split not in SPLITS:
        raise InvalidInput(f"builtin prompts: kind must be one of {KINDS} and split one of {SPLITS}, got {kind!r}, {split!r}")
    if count < 1:
        raise InvalidInput(f"builtin prompts: count must be >= 1, got {count}")
    every = heldout_every or ToyTargetConfig().heldout_every
    files = list(_split_files(split, every, str(corpus_dir) if corpus_dir else None))
    if not files:
        raise InvalidInput(f"builtin prompts: the {split} split of the corpus is empty")
    rng = random.Random(f"{kind}:{split}:{seed}")  # str seeds are hashed with sha512: stable across runs
    rng.shuffle(files)
    records: list[Record] = []

    def make(prompt, messages, source) -> Record:
        extra = {"id": f"{kind}:{split}:{seed}:{len(records)}", "source": source.relpath}
        return Record(line=len(records) + 1, prompt=prompt, messages=messages, extra=extra)

    candidates = (_docstring_records(files, rng, make) if kind == "docstring"
                  else _code_records(files, rng, make, min_chars, max_chars))
    for record in candidates:
        if keep is None or keep(record):
            records.append(record)
            if len(records) == count:
                return records
    raise InvalidInput(f"builtin prompts: the {split} split yields only {len(records)} {kind} prompts, asked for {count}")


def parse_builtin(spec: str) -> tuple[str, str, int, int]:
    """"builtin:KIND:SPLIT:COUNT[:SEED]" -> (kind, split, count, seed)."""
    parts = spec.split(":")
    if parts[0] != BUILTIN or len(parts) not in (4, 5):
        raise InvalidInput(f"expected builtin:KIND:SPLIT:COUNT[:SEED], got {spec!r}")
    try:
        count, seed = int(parts[3]), int(parts[4]) if len(parts) == 5 else 0
    except ValueError:
        raise InvalidInput(f"{spec!r}: COUNT and SEED must be integers") from None
    return parts[1], parts[2], count, seed


def toy_corpus_settings(target: Path | None) -> dict:
    """heldout_every / corpus_dir a toy target was built with, so its held-out split is honoured."""
    from training.toy.target import read_metadata

    metadata = read_metadata(target) if target is not None else None
    if not metadata:
        return {}
    config = metadata.get("config", {})
    return {"heldout_every": config.get("heldout_every"), "corpus_dir": config.get("corpus_dir")}


def load_prompts(spec: str, target: Path | None = None, keep: Callable[[Record], bool] | None = None) -> list[Record]:
    """Records of a JSONL file, or of a built-in set (drawn among candidates ``keep`` accepts);
    ids are validated (unique, str or int)."""
    if spec.startswith(BUILTIN + ":"):
        kind, split, count, seed = parse_builtin(spec)
        records = builtin_prompts(kind, split, count, seed, keep=keep, **toy_corpus_settings(target))
    else:
        records = read_jsonl(spec)
    seen: dict = {}
    for record in records:
        rid = record_id(record, spec)
        if rid in seen:
            raise DataError(f"{spec}:{record.line}: id {rid!r} repeats line {seen[rid]}")
        seen[rid] = record.line
    return records


def record_id(record: Record, where: str = "<prompts>") -> str | int:
    """The record's own "id" (string or integer), else its 1-based line number."""
    rid = record.extra.get("id", record.line)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(f"{where}:{record.line}: 'id' must be a string or an integer, got {rid!r}")
    return rid


# ----------------------------------------------------------------------------------------------
# the output file: resume and whole-line appends

"""Prompt and conversation files (JSONL): read, validate every line, fail with file:line.

One JSON object per line, either ``{"prompt": "..."}`` (a completion prompt) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI chat shape; rendered with the
tokenizer's chat template). Other keys are kept as metadata (e.g. an ``id``). Blank lines are
skipped. The whole file is validated before anything is returned, so nothing is ever trained or
generated on part of a broken file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed input file; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the source file
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    extra: dict = field(default_factory=dict)

    def text(self, tokenizer, add_generation_prompt: bool = True) -> str:
        """The model input: the prompt itself, or the messages through the chat template."""
        if self.prompt is not None:
            return self.prompt
        return tokenizer.apply_chat_template(
            list(self.messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _parse_messages(value, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        messages.append({"role": role, "content": content})
    return tuple(messages)


def parse_line(text: str, where: str, line: int) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise DataError(f"{where}: expected exactly one of 'prompt' or 'messages'")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        return Record(line=line, prompt=obj["prompt"], extra=extra)
    return Record(line=line, messages=_parse_messages(obj["messages"], where), extra=extra)


def read_jsonl(path: str | Path) -> list[Record]:
    """Every record of ``path``; raises DataError naming ``path:line`` at the first bad line."""
    path = Path(path)
    records = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    records.append(parse_line(text, f"{path}:{number}", number))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


@dataclass(frozen=True)
class Example:
    """One training sequence: the prompt's tokens then the target's response tokens."""

    line: int
    token_ids: tuple[int, ...]
    response_start: int  # index of the first response token in token_ids


def _token_list(value, where: str, key: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataError(f"{where}: '{key}' must be a list of integers")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise DataError(f"{where}: '{key}' has token id {bad[0]} outside the target vocabulary [0, {vocab_size})")
    return tuple(value)


def read_examples(path: str | Path, vocab_size: int, tokenizer=None) -> list[Example]:
    """Training sequences from a `vllm-lk generate` file (``prompt_token_ids`` +
    ``completion_token_ids``), or from records with a ``completion`` text, tokenized with
    ``tokenizer``. The whole file is validated first; errors name ``path:line``."""
    path = Path(path)
    records = read_jsonl(path)
    examples = []
    for record in records:
        where = f"{path}:{record.line}"
        extra = record.extra
        if "prompt_token_ids" in extra or "completion_token_ids" in extra:
            prompt_ids = _token_list(extra.get("prompt_token_ids"), where, "prompt_token_ids", vocab_size)
            response_ids = _token_list(extra.get("completion_token_ids"), where, "completion_token_ids", vocab_size)
        elif isinstance(extra.get("completion"), str):
            if tokenizer is None:
                raise DataError(f"{where}: record has text only; a tokenizer is needed to train on it")
            prompt_ids = tuple(tokenizer(record.text(tokenizer), add_special_tokens=False)["input_ids"])
            response_ids = tuple(tokenizer(extra["completion"], add_special_tokens=False)["input_ids"])
        else:
            raise DataError(f"{where}: no response to train on: expected 'completion_token_ids' (from `vllm-lk generate`) or a 'completion' string")
        if not prompt_ids or not response_ids:
            raise DataError(f"{where}: empty prompt or response")
        examples.append(Example(line=record.line, token_ids=prompt_ids + response_ids, response_start=len(prompt_ids)))
    return examples


def collate(examples: list[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] input ids right-padded with ``pad_id``, [B, T] loss mask: row t is trained when
    token t+1 is a response token). Causal attention makes right padding invisible to real rows."""
    length = min(seq_len, max(len(e.token_ids) for e in examples))
    ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens = example.token_ids[:length]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, max(example.response_start - 1, 0) : len(tokens) - 1] = True
    return ids, mask

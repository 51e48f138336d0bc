"""Capture of served traffic (opt-in: ``--capture DIR``), the data `vllm-lk adapt` retrains on.

**It stores prompts and completions on disk.** Off unless asked for; files are created 0600 in
a directory created 0700.

Every finished request (a sample of them with ``--capture-rate``) becomes one JSONL line per
choice in the format `vllm-lk generate` writes and `vllm-lk train` reads (``id``, ``prompt``,
``completion``, ``prompt_token_ids``, ``completion_token_ids``, ``finish_reason``) plus what the
serving saw: ``sampling`` (the request's settings), ``speculative`` (per verification step,
drafted and accepted: the served acceptance of that exact text), the drafter's identity and the
time. A request never waits for the disk: records go through a bounded queue to a writer thread,
and when the queue is full the record is dropped and counted. Files rotate at a quarter of
``--capture-max-mib``; the oldest are deleted to keep the directory under the cap.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

QUEUE_RECORDS = 4096
FILE_PREFIX = "capture-"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens")


def sampling_record(params) -> dict:
    """A request's sampling settings (vLLM ``SamplingParams``) as JSON."""
    return {name: getattr(params, name, None) for name in SAMPLING_FIELDS}


class Capture:
    """The writer: ``offer(records)`` from the event loop, a thread writing to ``directory``."""

    def __init__(self, directory: Path, rate: float = 1.0, max_mib: float = 256.0, seed: int | None = None,
                 queue_records: int = QUEUE_RECORDS):
        self.directory = Path(directory)
        self.rate = rate
        self.max_bytes = int(max_mib * 2**20)
        self.file_bytes = max(self.max_bytes // 4, 1)
        self.rng = random.Random(seed)
        self.queue: queue.Queue = queue.Queue(queue_records)
        self.written = 0  # records on disk
        self.dropped = 0  # records lost to a full queue
        self.deleted_files = 0  # files removed to stay under the cap
        self.tokenizer = None  # the target's, set when the engine is up: prompts given as token ids get their text
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._handle = None
        self._size = 0
        self._last_ns = 0
        self._thread = threading.Thread(target=self._run, name="vllm-lk-capture", daemon=True)
        self._thread.start()
        logger.warning("capturing served requests (prompts and completions) to %s: rate %.3g, at most %.0f MiB",
                       self.directory, rate, max_mib)

    def sampled(self) -> bool:
        """Whether this request is captured (decided when it starts)."""
        return self.rate >= 1.0 or self.rng.random() < self.rate

    def offer(self, records: list[dict]) -> None:
        """Queue records for writing; never blocks (a full queue drops them)."""
        for record in records:
            try:
                self.queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self.queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            if record is None:
                break
            try:
                if record.get("prompt") is None:  # a prompt given as token ids: decoded here, off the event loop
                    record["prompt"] = self.tokenizer.decode(record["prompt_token_ids"]) if self.tokenizer else ""
                self._write(json.dumps(record, separators=(",", ":")) + "\n")
            except Exception:  # noqa: BLE001 - a disk problem must not take the server down
                logger.exception("capture: could not write a record to %s", self.directory)
                self.dropped += 1
        if self._handle is not None:
            self._handle.close()

    def _write(self, line: str) -> None:
        data = line.encode()
        if self._handle is None or self._size + len(data) > self.file_bytes:
            self._rotate()
        self._handle.write(data)
        self._handle.flush()  # a reader (adapt) sees whole lines; a crash loses at most the queue
        self._size += len(data)
        self.written += 1

    def _rotate(self) -> None:
        if self._handle is not None:
            self._handle.close()
        # Names sort in creation order (adapt and the trim read them oldest first): one clock reading
        # for the seconds and the nanoseconds (two readings disagree when a second ticks between
        # them), UTC, and never earlier than this writer's previous file.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        seconds, nanos = divmod(self._last_ns, 10**9)
        name = f"{FILE_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(seconds))}-{nanos:09d}.jsonl"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._handle = os.fdopen(fd, "ab")
        self._size = 0
        self._trim()

    def _trim(self) -> None:
        """Delete the oldest files until the directory (with a new full file) fits the cap."""
        files = sorted(self.directory.glob(f"{FILE_PREFIX}*.jsonl"))
        total = sum(f.stat().st_size for f in files)
        for old in files[:-1]:  # never the file just opened
            if total + self.file_bytes <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink()
            self.deleted_files += 1


def capture_files(directory: Path) -> list[Path]:
    """The capture's JSONL files, oldest first (what `vllm-lk train --data` can read one by one)."""
    return sorted(Path(directory).glob(f"{FILE_PREFIX}*.jsonl"))

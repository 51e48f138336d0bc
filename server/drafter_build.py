"""Serve first, speculate soon: build the default drafter while the target already serves.

`vllm-lk serve` without a cached default drafter starts the target without speculation (the first
request is answered as soon as the target's engine is up) and builds the drafter in a process of
its own (``python -m training.toy.default_drafter``: regenerate data with the target, train with
LK, export). Progress, read from the build's own files, shows on ``/ready``, ``/v1/models`` and
the dashboard; when the build finishes, the drafter is swapped in live (a new engine beside the
serving one, server.swap). A build that fails leaves the server serving without speculation, with
the reason and the build's log file named; an interrupted build resumes on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from server.errors import APIError
from server.state import ServerState
from server.swap import Swapper

logger = logging.getLogger(__name__)
POLL_S = 2.0


class DefaultDrafterBuild:
    """The background build of the default drafter for ``target`` and its swap into the server."""

    def __init__(self, target: Path, config=None, num_speculative_tokens: int | None = None):
        from training.toy.default_drafter import DefaultDrafterConfig, default_drafter_dir

        self.target = Path(target)
        self.config = config or DefaultDrafterConfig()
        self.k = num_speculative_tokens
        self.log_path = default_drafter_dir(self.target, self.config) / "build.log"
        self.process: asyncio.subprocess.Process | None = None

    def progress(self) -> dict:
        from training.toy.default_drafter import build_progress

        return build_progress(self.target, self.config)

    async def run(self, state: ServerState, swapper: Swapper) -> None:
        """Wait for the serving engine, build, then swap the drafter in."""
        started = time.monotonic()
        state.drafter_build = {"state": "waiting for the engine", "log": str(self.log_path)}
        while state.engine is None and not state.engine_dead:
            await asyncio.sleep(0.2)
        if state.engine_dead:
            return
        try:
            path = await self._build(state)
        except Exception as err:  # noqa: BLE001 - reported on /ready; the server keeps serving without speculation
            logger.error("the default drafter build failed (%s); serving without speculation. Log: %s", err, self.log_path)
            state.drafter_build = {"state": "failed", "error": str(err), "log": str(self.log_path)}
            return
        if state.swaps:
            logger.info("default drafter built at %s; not swapped in: another drafter was swapped in meanwhile", path)
            state.drafter_build = {"state": "built, not swapped (another drafter serves)", "path": str(path)}
            return
        state.drafter_build = {"state": "swapping in", "path": str(path), **self.progress()}
        try:
            record = await self._swap(swapper, path)
        except APIError as err:
            logger.error("the default drafter %s could not be swapped in: %s", path, err.message)
            state.drafter_build = {"state": "failed", "error": err.message, "path": str(path)}
            return
        state.drafter_build = {"state": "serving", "path": str(path), "seconds": round(time.monotonic() - started, 1),
                               "swap": record}
        logger.info("default drafter %s serves, %.0f s after the server started", path, time.monotonic() - started)

    async def _swap(self, swapper: Swapper, path: Path) -> dict:
        while True:
            try:
                return await swapper.swap(str(path), "auto", None, self.k)
            except APIError as err:
                if err.code not in ("swap_in_progress", "not_ready"):
                    raise
            await asyncio.sleep(POLL_S)

    async def _build(self, state: ServerState) -> Path:
        from training.toy.default_drafter import cached_default_drafter

        cached = cached_default_drafter(self.target, self.config)
        if cached is not None:
            return cached
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the default drafter for %s in the background (log: %s); serving without "
                    "speculation until it is ready", self.target, self.log_path)
        command = [sys.executable, "-m", "training.toy.default_drafter", "--target", str(self.target),
                   "--config", json.dumps(self.config.model_dump(mode="json"))]
        with self.log_path.open("ab") as log:
            # its own session: a stop reaches the vLLM engine process the build starts too
            self.process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=log,
                                                                start_new_session=True)
            waiter = asyncio.ensure_future(self.process.communicate())
            while not waiter.done():
                state.drafter_build = {"state": "building", **self.progress(), "log": str(self.log_path)}
                await asyncio.wait([waiter], timeout=POLL_S)
            out, _ = waiter.result()
        if self.process.returncode:
            raise RuntimeError(f"the build exited with status {self.process.returncode}: {_tail(self.log_path)}")
        return Path(out.decode().strip().splitlines()[-1])

    def stop(self) -> None:
        """Stop a running build (server shutdown); it resumes on the next start."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])

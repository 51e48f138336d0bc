"""Swapping the served drafter while the server runs (``POST /admin/drafter``).

Three ways, chosen per swap:

- **in place**: the new drafter has the served one's method, K, architecture and tensor shapes
  (a retrained or fine-tuned head). Its weights are loaded into the running engine between two
  engine steps (vllm_lk's worker method ``lk_load_drafter_weights``); no request notices
  anything but the acceptance rate.
- **beside** (``swap_strategy: beside``, the default): another shape or kind. A second engine is
  started next to the serving one; once it is up, new requests go to it, requests already
  running finish on the old one, which is then shut down (if this app built it). Needs memory
  for both engines while they overlap.
- **restart** (``swap_strategy: restart``): for when memory holds one engine. New requests wait;
  running ones finish; the old engine stops and the new one starts. If the new one fails to
  start, the old drafter is started again.

A swap never leaves the server without a working drafter setup: the directory is checked before
anything is touched (a 400 names the problem), a failed weight load is rolled back in the
engine, and a new engine that fails to start leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from server.drafters import DrafterDir, check_drafter_dir, in_place_refusal
from server.engine import SpecSetup, drafter_spec
from server.errors import APIError
from server.state import ServerState
from vllm_lk.errors import InvalidInput, MissingInput

logger = logging.getLogger(__name__)

Mode = Literal["auto", "in_place", "new_engine"]
POLL_S = 0.05


class Swapper:
    """One app's drafter swaps: one at a time (another request meanwhile gets 409)."""

    def __init__(self, state: ServerState, factory: Callable[[SpecSetup], Any]):
        self.state = state
        self.factory = factory  # spec -> a started engine (blocking: run in a thread)
        self._busy = False
        self.retiring: asyncio.Task | None = None  # the old engine's drain, after a swap beside

    async def swap(self, path: str, mode: Mode = "auto", method: str | None = None, k: int | None = None) -> dict:
        """Swap to the drafter at ``path``; returns the record of what was done."""
        if self._busy:
            raise APIError(409, "a drafter swap is already running; GET /admin/drafter shows its progress",
                           code="swap_in_progress")
        self.state.require_ready()
        self._busy = True
        keep_busy = False
        try:
            new, spec = await self._check(path, method, k)
            refusal = self._in_place_refusal(new, spec)
            if mode == "in_place" and refusal is not None:
                raise APIError(400, f"{new.path} cannot be loaded in place: {refusal}", param="mode", code="not_in_place")
            how = "in_place" if refusal is None and mode != "new_engine" else self.state.config.swap_strategy
            record = {"path": str(new.path), "identity": new.identity, "method": spec.method,
                      "num_speculative_tokens": spec.num_speculative_tokens, "how": how,
                      "reason": refusal if how != "in_place" else None,
                      "previous": {"path": self.state.spec.drafter, "identity": self.state.drafter_identity}}
            self.state.swap_status = {"state": "running", **record, "started": time.time()}
            started = time.monotonic()
            try:
                if how == "in_place":
                    await self._in_place(new, spec)
                elif how == "restart":
                    await self._restart(new, spec)
                else:
                    old = await self._beside(new, spec)
                    self.retiring = asyncio.get_running_loop().create_task(self._retire(old, record))
                    keep_busy = True  # the drain task ends the swap
            except APIError as err:
                self.state.swap_status = {"state": "failed", **record, "error": err.message}
                logger.warning("drafter swap to %s failed: %s", new.path, err.message)
                raise
            record["seconds"] = round(time.monotonic() - started, 3)
            record["swaps"] = self.state.swaps
            if not keep_busy:
                self.state.swap_status = {"state": "idle", "last": record}
            logger.info("drafter swapped (%s) to %s [%s] in %.1f s", how, new.path, new.identity, record["seconds"])
            return record
        finally:
            if not keep_busy:
                self._busy = False

    async def _check(self, path: str, method: str | None, k: int | None) -> tuple[DrafterDir, SpecSetup]:
        try:
            new = await asyncio.to_thread(check_drafter_dir, path)
            spec = drafter_spec(new.path, method, k, fallback_k=self.state.spec.num_speculative_tokens or None)
        except (InvalidInput, MissingInput) as err:
            raise APIError(400, str(err), param="path", code="invalid_drafter") from None
        return new, spec

    def _in_place_refusal(self, new: DrafterDir, spec: SpecSetup) -> str | None:
        current = self.state.spec
        refusal = in_place_refusal(self.state.drafter_dir, new, current.method, spec.method)
        if refusal is None and spec.num_speculative_tokens != current.num_speculative_tokens:
            refusal = f"another K ({current.num_speculative_tokens} -> {spec.num_speculative_tokens})"
        return refusal

    async def _in_place(self, new: DrafterDir, spec: SpecSetup) -> None:
        engine = self.state.engine
        try:
            await engine.collective_rpc("lk_load_drafter_weights", args=(str(new.path), self.state.spec.drafter))
        except Exception as err:  # noqa: BLE001 - the worker rolled its weights back; the old drafter serves
            raise APIError(400, f"{new.path}: the engine refused the weights ({err}); the served drafter is unchanged",
                           param="path", code="invalid_drafter") from None
        self.state.switch(engine, spec, new)

    async def _start(self, new: DrafterDir, spec: SpecSetup):
        try:
            engine = await asyncio.to_thread(self.factory, spec)
        except BaseException as err:  # noqa: BLE001 - reported to the caller; the old engine is untouched
            logger.exception("the engine for drafter %s failed to start", new.path)
            raise APIError(400, f"an engine with the drafter {new.path} failed to start ({type(err).__name__}: {err})",
                           param="path", code="engine_start_failed") from None
        self.state.owned_engines.append(engine)
        return engine

    async def _beside(self, new: DrafterDir, spec: SpecSetup):
        """Start the new engine next to the serving one, then switch; returns the old engine."""
        old = self.state.engine
        engine = await self._start(new, spec)
        self.state.switch(engine, spec, new)
        return old

    async def _retire(self, old, record: dict) -> None:
        """Let the old engine's requests finish, then shut it down (if this app built it)."""
        try:
            self.state.swap_status = {"state": "draining", **record}
            await self._drained(old)
            await self._shutdown(old)
            self.state.swap_status = {"state": "idle", "last": record}
        finally:
            self._busy = False

    async def _drained(self, engine) -> None:
        while self.state.in_flight_on(engine):
            await asyncio.sleep(POLL_S)

    async def _shutdown(self, engine) -> None:
        if engine in self.state.owned_engines:
            self.state.owned_engines.remove(engine)
            await asyncio.to_thread(engine.shutdown)
            logger.info("the previous engine is shut down")
        else:
            logger.info("the previous engine was handed to this app: it is left running for its owner")

    async def _restart(self, new: DrafterDir, spec: SpecSetup) -> None:
        """Drain and stop the serving engine, then start the new one (the old drafter again if
        the new one fails); new requests wait meanwhile (:meth:`ServerState.until_serving`)."""
        state = self.state
        old, old_spec = state.engine, state.spec
        state.pause()
        try:
            await self._drained(old)
            await self._shutdown(old)
            try:
                engine = await self._start(new, spec)
            except APIError:
                logger.warning("restarting the previous drafter %s", old_spec.drafter)
                try:
                    engine = await asyncio.to_thread(self.factory, old_spec)
                except BaseException as err:  # noqa: BLE001 - nothing left to serve with
                    state.failed = err
                    raise APIError(500, "the new engine failed to start and so did the previous one; the server "
                                   "cannot serve", code="engine_dead") from None
                state.owned_engines.append(engine)
                state.engine = engine
                raise
            state.switch(engine, spec, new)
        finally:
            state.resume()

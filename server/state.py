"""What one running app knows: config, engine, readiness, admission, metrics, the drafter.

Kept on ``app.state.server`` rather than in module globals, so several apps can live in one
process (tests run two over one engine) and nothing leaks between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from server.capture import Capture
from server.config import ServerConfig
from server.drafters import DrafterDir, check_drafter_dir
from server.engine import SpecSetup
from server.errors import APIError
from server.metrics import CaptureCollector, ServerMetrics
from server.window import SpecWindow
from vllm_lk.errors import InvalidInput, MissingInput

logger = logging.getLogger(__name__)


def _checked(drafter: str | None) -> DrafterDir | None:
    """The served drafter's checked directory (None without one, or when it cannot be read as
    one: vLLM is the judge of what it serves; only swaps need the check)."""
    if drafter is None:
        return None
    try:
        return check_drafter_dir(drafter)
    except (InvalidInput, MissingInput) as err:
        logger.warning("drafter %s: %s (it cannot be swapped in place)", drafter, err)
        return None


class Ticket:
    """One admitted request's slot; releasing twice is harmless (a stream may end by several paths)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.in_flight -= 1


class Admission:
    """Bounded admission: at most ``limit`` requests in the server at once, the rest refused with 429
    and Retry-After at once. vLLM's scheduler already queues what it cannot run, so a second
    unbounded queue in front of it would only hide overload and grow memory."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def admit(self) -> Ticket:
        if self.in_flight >= self.limit:
            raise APIError(429, f"server is at capacity ({self.limit} requests in flight); retry later",
                           code="queue_full", headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1
        return Ticket(self)


class ServerState:
    """Per-app state; ``engine`` stays None until the engine is up (then /ready turns 200)."""

    def __init__(self, config: ServerConfig, spec: SpecSetup):
        self.config = config
        self.spec = spec
        self.api_key = config.resolved_api_key()
        self.admin_key = config.resolved_admin_key()
        self.model_name = config.model_name()
        self.created = int(time.time())
        self.window = SpecWindow(spec.num_speculative_tokens, config.dashboard_bucket_s, config.dashboard_horizon_s)
        self.metrics = ServerMetrics(spec.num_speculative_tokens, self.window, config.window_s)
        self.admission = Admission(config.max_queue, config.retry_after_s)
        self.engine: Any = None
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.default_sampling: dict[str, Any] = {}
        self.draining = False
        self.failed: BaseException | None = None
        self.background: set[asyncio.Task] = set()  # keeps fire-and-forget tasks (aborts) alive
        # engine request id -> the engine running it (a drafter swap leaves old requests on the
        # old engine), aborted if a drain times out
        self.active_requests: dict[str, Any] = {}
        self._held: dict[int, int] = {}  # id(engine) -> client requests running on it
        self.owned_engines: list[Any] = []  # engines this app built and must shut down
        self.drafter_dir: DrafterDir | None = _checked(spec.drafter)  # the served drafter, as checked
        self.swaps = 0  # drafters swapped in since start
        self.swap_status: dict[str, Any] = {"state": "idle"}  # what GET /admin/drafter reports
        self.drafter_build: dict[str, Any] | None = None  # a background build of the default drafter
        self.capture: Capture | None = None  # server.capture, with --capture
        if config.capture_dir is not None:
            self.capture = Capture(config.capture_dir, config.capture_rate, config.capture_max_mib)
            self.metrics.registry.register(CaptureCollector(self.capture))
        self._serving = asyncio.Event()  # cleared while a restart swaps the engine
        self._serving.set()
        self.publish_info()

    def attach(self, engine) -> None:
        """Take a started engine: read what request validation needs from it, then turn ready."""
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len
        self.vocab_size = engine.model_config.get_vocab_size()
        self.default_sampling = dict(engine.model_config.get_diff_sampling_param() or {})
        if self.spec.num_speculative_tokens and self.default_sampling.pop("min_p", 0):
            logger.warning("the model's generation_config sets min_p, which speculative decoding cannot honour "
                           "(vLLM 0.32 does not apply it when verifying drafts): requests run without it")
        self.engine = engine
        if self.capture is not None:
            self.capture.tokenizer = self.tokenizer
        logger.info("engine ready: %s (max_model_len %d, drafter %s, method %s, K %d)", self.model_name,
                    self.max_model_len, self.spec.drafter, self.spec.method, self.spec.num_speculative_tokens)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and not self.engine_dead

    @property
    def engine_dead(self) -> bool:
        if self.failed is not None:
            return True
        return not self.paused and self.engine is not None and bool(getattr(self.engine, "errored", False))

    @property
    def paused(self) -> bool:
        """A drafter swap is restarting the engine: requests wait (:meth:`until_serving`)."""
        return not self._serving.is_set()

    def pause(self) -> None:
        self._serving.clear()

    def resume(self) -> None:
        self._serving.set()

    async def until_serving(self) -> None:
        """Wait out an engine restart (a drafter swap), then like :meth:`require_ready`."""
        if self.paused:
            try:
                await asyncio.wait_for(self._serving.wait(), self.config.request_timeout_s)
            except TimeoutError:
                pass  # require_ready says why
        self.require_ready()

    def require_ready(self) -> None:
        """503 unless requests can be served now."""
        if self.engine_dead:
            raise APIError(503, "the engine has failed; the server cannot serve requests", code="engine_dead")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.paused:
            raise APIError(503, "the engine is restarting with a new drafter; requests wait for it",
                           code="swapping_drafter", headers={"Retry-After": "5"})
        if self.engine is None:
            raise APIError(503, "the engine is still starting; retry when GET /ready returns 200",
                           code="not_ready", headers={"Retry-After": "5"})

    async def engine_stats(self, timeout_s: float = 2.0) -> dict | None:
        """The engine's drafting record (vllm_lk's worker method ``lk_speculation_stats``), or
        None without a drafter or when the engine does not answer within ``timeout_s``."""
        if self.engine is None or self.spec.drafter is None or self.engine_dead:
            return None
        try:
            answers = await asyncio.wait_for(self.engine.collective_rpc("lk_speculation_stats"), timeout_s)
        except Exception:  # noqa: BLE001 - /metrics must render without it
            logger.debug("lk_speculation_stats failed", exc_info=True)
            return None
        return answers[0] if answers else None

    def spawn(self, coro) -> None:
        """Run ``coro`` as its own task (outside any cancelled scope), keeping a reference."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def hold(self, engine) -> None:
        """A client request starts on ``engine`` (the one serving now)."""
        self._held[id(engine)] = self._held.get(id(engine), 0) + 1

    def release(self, engine) -> None:
        """A client request that :meth:`hold` counted has ended."""
        self._held[id(engine)] -= 1
        if not self._held[id(engine)]:
            del self._held[id(engine)]

    def in_flight_on(self, engine) -> int:
        """Client requests still running on ``engine`` (a swapped-out engine drains to 0)."""
        return self._held.get(id(engine), 0)

    @property
    def drafter_identity(self) -> str | None:
        return self.drafter_dir.identity if self.drafter_dir is not None else None

    def switch(self, engine, spec: SpecSetup, drafter: DrafterDir | None) -> None:
        """Serve new requests with ``engine`` and ``spec`` from now on (a drafter swap); requests
        already running stay where they are."""
        self.engine, self.spec, self.drafter_dir = engine, spec, drafter
        if spec.num_speculative_tokens and self.default_sampling.pop("min_p", 0):
            logger.warning("the model's generation_config sets min_p, which speculative decoding cannot honour: "
                           "requests run without it from now on")
        self.swaps += 1
        self.metrics.ensure_positions(spec.num_speculative_tokens)
        self.window.num_positions = max(self.window.num_positions, spec.num_speculative_tokens)
        self.metrics.drafter_swaps.inc()
        self.publish_info()

    def publish_info(self) -> None:
        """``vllm_lk_info``: what is served now."""
        spec = self.spec
        self.metrics.set_info(
            served_model_name=self.model_name, target=str(self.config.target), drafter=str(spec.drafter or ""),
            drafter_id=self.drafter_identity or "", swaps=str(self.swaps),
            method=str(spec.method or "none"), num_speculative_tokens=str(spec.num_speculative_tokens), loss=spec.loss,
            speculation=self.config.speculation if spec.drafter else "none",
        )

    def abort_soon(self, request_ids: list[str], engine=None) -> None:
        """Abort engine requests (on ``engine``, default the serving one) from a fresh task: a
        cancelled request's own task cannot await."""
        engine = engine if engine is not None else self.engine
        if request_ids and engine is not None:
            self.spawn(self._abort(engine, list(request_ids)))

    async def _abort(self, engine, request_ids: list[str]) -> None:
        try:
            await engine.abort(request_ids)
        except Exception:  # the engine may be shutting down; nothing left to free then
            logger.debug("abort of %s failed", request_ids, exc_info=True)

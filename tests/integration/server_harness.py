"""A real server for tests: one vLLM engine, and real uvicorn servers on 127.0.0.1 over it.

The engine is built once per test module (20-40 s on CPU) in the test's main thread; uvicorn runs
in a background thread with its own event loop, where every app over that engine lives (the
engine's output handler binds to the first loop that uses it, so all apps share this one). Tests
can start extra apps with other configs (a tiny admission limit, a short timeout, a failing
engine wrapper) over the same engine without paying for another.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import uvicorn

from server.app import create_app
from server.config import ServerConfig
from server.engine import build_engine, resolve_spec

API_KEY = "test-key-0123456789"
MODEL = "tiny"
K = 3


def tiny_config(target: Path, drafter: Path | None, **overrides) -> ServerConfig:
    values = dict(
        target=target, drafter=drafter, method="draft_model" if drafter else None,
        num_speculative_tokens=K if drafter else None, served_model_name=MODEL, api_key=API_KEY,
        default_drafter=False, engine_args={"max_model_len": 512, "gpu_memory_utilization": 0.1},
        dashboard_bucket_s=1.0,
    )
    values.update(overrides)
    return ServerConfig(**values)


class LiveEngine:
    """The shared engine plus the background event loop that serves apps over it."""

    def __init__(self, config: ServerConfig, start_engine: bool = True):
        self.config = config
        self.spec = resolve_spec(config)
        self.engine = build_engine(config, self.spec) if start_engine else None  # None: apps build their own
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="uvicorn-loop", daemon=True)
        self.thread.start()
        self.servers: list[tuple[uvicorn.Server, object]] = []

    def serve(self, config: ServerConfig | None = None, engine=None, **app_kwargs):
        """Start an app (default: the engine's own config) on a free port; returns (base_url, app)."""
        config = config or self.config
        app = create_app(config, engine if engine is not None else self.engine, spec=self.spec, **app_kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=config.drain_timeout_s))
        future = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), self.loop)
        deadline = time.monotonic() + 30
        while not server.started:
            if future.done():
                future.result()
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)
        self.servers.append((server, future))
        return f"http://127.0.0.1:{port}", app

    def stop(self, server_index: int | None = None) -> None:
        targets = self.servers if server_index is None else [self.servers[server_index]]
        for server, future in targets:
            server.should_exit = True
            future.result(timeout=60)

    def run(self, coro, timeout: float = 60):
        """Run ``coro`` on the server loop (to look at engine state from a test)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.run(self._shutdown_engine(), timeout=120)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


    async def _shutdown_engine(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class EngineWrapper:
    """The real engine, with ``after_output(count, output)`` run after each output a request's
    stream passes on (``count`` outputs so far); the engine stream is closed (the request aborted)
    when the wrapper's stream ends early."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def after_output(self, count: int, output) -> None:
        pass

    async def generate(self, *args, **kwargs):
        stream = self.engine.generate(*args, **kwargs)
        try:
            count = 0
            async for output in stream:
                yield output
                count += 1
                await self.after_output(count, output)
        finally:
            await stream.aclose()


class PacedEngine(EngineWrapper):
    """``delay`` seconds per token passed on, so that a long request outlives a short timeout or
    drain on any machine. Pacing each *output* is not enough: when its reader lags, vLLM's
    AsyncLLM merges a request's delta outputs (``RequestOutputCollector``), so the engine runs on at
    full speed and a paced reader sees a few large outputs (CI once answered all 500 tokens of a
    speculative request inside a 1 s timeout). At 0.01 s a 500-token request takes >= 5 s."""

    def __init__(self, engine, delay: float = 0.01):
        super().__init__(engine)
        self.delay = delay

    async def after_output(self, count: int, output) -> None:
        tokens = sum(len(completion.token_ids) for completion in output.outputs)
        await asyncio.sleep(self.delay * max(tokens, 1))


def unfinished_engine_requests(live: LiveEngine) -> int:
    """Requests the front end still tracks (an aborted one leaves at once)."""

    async def count():
        return live.engine.output_processor.get_num_unfinished_requests()

    return live.run(count())


def scrape(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total

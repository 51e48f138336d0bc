"""A bounded load test: 24 concurrent streaming clients for 20 s against a real server over a real
engine. Every request must complete (usage chunk, `data: [DONE]`), nothing may stay admitted or
running afterwards, and the server process's resident memory must stay flat (growth after warm-up
under MEMORY_BOUND_MIB, and the second half of the run adding less than a quarter of that)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import psutil
import pytest

from tests.integration.server_harness import API_KEY, MODEL, scrape, unfinished_engine_requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLIENTS = 24
WARMUP_S = 6.0
DURATION_S = 20.0
MEMORY_BOUND_MIB = 64  # a leak of one EngineRun or stream buffer per request would exceed this


async def one_stream(client: httpx.AsyncClient, rng: random.Random) -> int:
    """One streaming completion; returns its completion tokens, raises on anything wrong."""
    max_tokens = rng.randint(8, 48)
    body = {"model": MODEL, "prompt": rng.choice(["def main(", "import os\n", "class A:\n    ", "# sum a list\n"]),
            "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    usage, done = None, False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise AssertionError(f"status {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                done = True
            else:
                payload = json.loads(line[6:])
                assert "error" not in payload, payload
                usage = payload.get("usage") or usage
    assert done and usage is not None and usage["completion_tokens"] == max_tokens
    return usage["completion_tokens"]


async def load(base: str, seconds: float, seed: int, samples: list[int]) -> dict:
    stats = {"requests": 0, "tokens": 0, "errors": []}
    deadline = time.monotonic() + seconds
    process = psutil.Process()

    async def client_loop(index: int):
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
            while time.monotonic() < deadline:
                try:
                    tokens = await one_stream(client, rng)  # not `+= await`: that reads the total before awaiting
                    stats["tokens"] += tokens
                    stats["requests"] += 1
                except Exception as err:  # noqa: BLE001 - every failure is reported
                    stats["errors"].append(repr(err))

    async def sampler():
        while time.monotonic() < deadline:
            samples.append(process.memory_info().rss)
            await asyncio.sleep(1.0)

    await asyncio.gather(sampler(), *(client_loop(i) for i in range(CLIENTS)))
    return stats


def test_concurrent_streaming_clients(live):
    base, app = live.serve()
    warm_samples: list[int] = []
    warm = asyncio.run(load(base, WARMUP_S, 0, warm_samples))
    assert not warm["errors"], warm["errors"][:5]
    samples: list[int] = []
    started = time.monotonic()
    stats = asyncio.run(load(base, DURATION_S, 1, samples))
    elapsed = time.monotonic() - started
    growth_mib = (max(samples) - samples[0]) / 2**20
    half = len(samples) // 2
    late_growth_mib = (max(samples[half:]) - max(samples[:half])) / 2**20  # a leak keeps growing; warm-up does not
    print(f"\nload: {CLIENTS} clients, {elapsed:.1f} s: {stats['requests']} requests, {stats['tokens']} tokens "
          f"({stats['requests'] / elapsed:.1f} req/s, {stats['tokens'] / elapsed:.0f} tok/s), errors {len(stats['errors'])}, "
          f"RSS {samples[0] / 2**20:.0f} -> {samples[-1] / 2**20:.0f} MiB (max growth {growth_mib:.1f} MiB, "
          f"second half {late_growth_mib:+.1f} MiB); RSS MiB per second: {[round(x / 2**20) for x in samples]}")
    assert not stats["errors"], stats["errors"][:5]
    assert stats["requests"] >= CLIENTS
    assert growth_mib < MEMORY_BOUND_MIB
    assert late_growth_mib < MEMORY_BOUND_MIB / 4
    state = app.state.server
    assert state.admission.in_flight == 0 and not state.active_requests
    assert unfinished_engine_requests(live) == 0
    text = httpx.get(base + "/metrics").text
    assert scrape(text, "vllm_lk_requests_running") == 0 and scrape(text, "vllm_lk_requests_waiting") == 0
    assert scrape(text, "vllm_lk_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == (
        warm["requests"] + stats["requests"])

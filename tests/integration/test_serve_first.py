"""Serve first: without a built default drafter the target serves at once, the drafter is built
in the background (a real build: regeneration through vLLM, LK training, export, at a tiny size)
with its progress on /ready and /v1/models, then swapped in live, and the engine that served
without speculation is drained and shut down."""

from __future__ import annotations

import time

import httpx
import pytest

from server.drafter_build import DefaultDrafterBuild
from server.engine import build_engine
from tests.integration.server_harness import API_KEY, MODEL, LiveEngine, tiny_config
from training.toy.default_drafter import DefaultDrafterConfig, cached_default_drafter

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY_BUILD = DefaultDrafterConfig(drafter="mlp", num_heads=3, code_prompts=24, docstring_prompts=8, max_tokens=32,
                                  steps=20, batch_size=4)


def completion(base: str) -> dict:
    body = {"model": MODEL, "prompt": "def main(", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    response = httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_target_serves_at_once_and_the_built_drafter_is_swapped_in(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LK_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tiny_target, None)
    live = LiveEngine(config, start_engine=False)
    try:
        started = time.monotonic()
        build = DefaultDrafterBuild(tiny_target, TINY_BUILD, num_speculative_tokens=3)
        base, app = live.serve(config, engine=lambda: build_engine(config, live.spec), drafter_build=build)
        while httpx.get(base + "/ready").status_code != 200:
            assert time.monotonic() - started < 120, "the target did not start"
            time.sleep(0.2)
        first = completion(base)
        print(f"\nfirst answer {time.monotonic() - started:.1f} s after start, without speculation")
        assert first["usage"]["speculative"] is None
        seen = []
        while True:
            card = httpx.get(base + "/v1/models", headers=AUTH).json()["data"][0]
            if card["speculative"] is not None:
                break
            build_state = httpx.get(base + "/ready").json()["drafter_build"]
            assert build_state["state"] != "failed", build_state
            seen.append((build_state.get("stage"), build_state.get("fraction")))
            assert time.monotonic() - started < 600, f"the drafter was not swapped in: {build_state}"
            time.sleep(1.0)
        # in the order seen: the stage is None until the build first reports (None and str do not sort)
        print(f"drafter swapped in {time.monotonic() - started:.1f} s after start; progress seen: {list(dict.fromkeys(seen))}")
        assert {"data", "training"} & {stage for stage, _ in seen}
        fractions = [f for _, f in seen if f is not None]
        assert fractions == sorted(fractions)  # progress only goes forward
        assert card["speculative"]["drafter"] == str(cached_default_drafter(tiny_target, TINY_BUILD).resolve())
        assert card["speculative"]["swaps"] == 1 and card["drafter_build"]["state"] == "serving"
        assert completion(base)["usage"]["speculative"]["num_speculative_tokens"] == 3
        state = app.state.server
        deadline = time.monotonic() + 60
        while len(state.owned_engines) > 1:  # the engine without speculation drains, then shuts down
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        live.close()

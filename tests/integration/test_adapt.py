"""`vllm-lk adapt` against a real server: traffic captured by the server, an LK fine-tune of the
served MLP speculator on it, offline alpha on held-out captured records, and the swap into the
server; a refused round (too little traffic) and a round resumed after a crash."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.integration.server_harness import API_KEY, MODEL, LiveEngine, tiny_config
from training.adapt import AdaptConfig, Endpoint, adapt

pytestmark = pytest.mark.integration
ADMIN_KEY = "adapt-admin-key-5678"
# 40 distinct prompts: adapt splits train / held-out by prompt, so a few prompts would give a held-out set of one or two
PROMPTS = [template.format(i) for i in range(8) for template in
           ("def add_{}(a, b):\n", '"""Return item {}."""\n', "class Queue{}:\n    def ", "import sys  # {}\n\n", "for key{} in ")]


@pytest.fixture(scope="module")
def served(tiny_target, tiny_mlp, tmp_path_factory):
    capture = tmp_path_factory.mktemp("adapt-capture")
    config = tiny_config(tiny_target, tiny_mlp, method="mlp_speculator", admin_key=ADMIN_KEY, capture_dir=capture)
    live = LiveEngine(config)
    base, app = live.serve(config)

    async def traffic():
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
            async def one(i):
                rng = random.Random(i)
                body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": 32, "temperature": 1.0,
                        "ignore_eos": True, "seed": i}
                (await client.post("/v1/completions", json=body)).raise_for_status()
            for start in range(0, 64, 8):
                await asyncio.gather(*(one(i) for i in range(start, start + 8)))

    asyncio.run(traffic())
    state = app.state.server
    while state.capture.written < 64:
        asyncio.run(asyncio.sleep(0.05))
    yield base, app, capture
    live.close()


def config(capture, tiny_target, **overrides) -> AdaptConfig:
    values = dict(capture=capture, target=tiny_target, steps=30, batch_size=4, seq_len=64, lr=3e-3,
                  min_records=16, margin=0.0, heldout_share=0.2)
    values.update(overrides)
    return AdaptConfig(**values)


def test_too_little_traffic_is_refused_with_the_reason(served, tiny_target, tmp_path):
    base, app, capture = served
    [record] = adapt(config(capture, tiny_target, min_records=10_000), tmp_path / "work", Endpoint(base, ADMIN_KEY))
    assert not record["swapped"] and "too little captured traffic" in record["refused"]
    assert app.state.server.swaps == 0


def test_a_round_fine_tunes_on_served_traffic_and_swaps_and_resumes_after_a_crash(served, tiny_target, tiny_mlp, tmp_path):
    base, app, capture = served
    work = tmp_path / "work"

    class Crashing(Endpoint):
        def swap(self, path):
            raise RuntimeError("killed before the swap")

    with pytest.raises(RuntimeError, match="killed"):
        adapt(config(capture, tiny_target), work, Crashing(base, ADMIN_KEY))
    assert (work / "round-1" / "run" / "drafter" / "config.json").is_file() and not (work / "round-1" / "record.json").exists()
    [record] = adapt(config(capture, tiny_target), work, Endpoint(base, ADMIN_KEY))  # resumes round 1
    print(f"\nadapt: tau {record['before']['tau']:.3f} -> {record['after']['tau']:.3f}, data {record['data']}, "
          f"{record['seconds']} s")
    assert record["current"] == str(tiny_mlp.resolve()) and record["data"]["records"] == 64
    assert record["after"]["tau"] > record["before"]["tau"]  # 30 LK steps on the traffic beat the untrained stages
    assert record["swapped"] and record["swap"]["path"] == record["new"]
    card = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]
    assert card["speculative"]["drafter"] == record["new"] and card["speculative"]["swaps"] == 1
    assert (work / "rounds.jsonl").read_text().count("\n") == 1

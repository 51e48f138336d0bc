"""Swapping the served drafter live (POST /admin/drafter) on a real server over real engines.

A = the tiny draft model, B = the same architecture with other weights (so B swaps in place),
C = B with a K the engine was not built for (so C needs a new engine). What must hold: the admin
key guards the routes; a broken directory is a 400 naming the problem while A keeps serving;
16 streaming clients see no failure during an in-place swap nor during a new-engine swap; the
greedy output and speculative record after an in-place swap to B equal those of an engine built
with B; and the tokens emitted while swaps happen keep the target's law (chi-square).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.engine import build_engine
from tests.integration.server_harness import API_KEY, MODEL, LiveEngine, scrape, tiny_config
from tests.integration.test_server_load import one_stream
from tests.unit.test_sampling import chi_square_p_value
from vllm_lk.checkpoint import FORMAT

pytestmark = pytest.mark.integration
ADMIN_KEY = "admin-key-9876543210"
CLIENTS = 16


def write_variant(src: Path, dst: Path, seed: int, k: int | None = None) -> Path:
    """``src`` with every weight moved by seeded noise (same config and shapes), and optionally
    another trained K in its LK metadata."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(seed)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(str(file))
        moved = {name: (t + 0.2 * t.std() * torch.randn(t.shape, generator=generator)).contiguous()
                 if t.is_floating_point() and t.numel() > 1 else t for name, t in tensors.items()}
        save_file(moved, str(file), metadata={"format": "pt"})
    if k is not None:
        (dst / "lk_metadata.json").write_text(json.dumps({"format": FORMAT, "num_speculative_tokens": k, "vllm_method": "draft_model"}))
    return dst


@pytest.fixture(scope="module")
def drafters(tiny_draft, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap-drafters")
    b = write_variant(tiny_draft, root / "b", seed=1)
    c = write_variant(tiny_draft, root / "c", seed=2, k=2)
    truncated = shutil.copytree(b, root / "truncated")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    bad_config = shutil.copytree(b, root / "bad-config")
    (bad_config / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    no_config = shutil.copytree(b, root / "no-config")
    (no_config / "config.json").unlink()
    return {"a": tiny_draft, "b": b, "c": c, "truncated": truncated, "bad-config": bad_config,
            "no-config": no_config, "missing": root / "missing"}


@pytest.fixture(scope="module")
def live(tiny_target, tiny_draft):
    engine = LiveEngine(tiny_config(tiny_target, tiny_draft, admin_key=ADMIN_KEY))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(live):
    base, app = live.serve()
    return base, app


def admin(base: str, key: str | None = ADMIN_KEY, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/admin/drafter", json=body, headers=headers, timeout=300)


def served(base: str) -> dict:
    card = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]
    return card["speculative"]


def settle(base: str, timeout_s: float = 120) -> None:
    """Wait until a swap beside has drained and shut down the old engine (GET /admin/drafter)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(base + "/admin/drafter", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["swap"]["state"] != "idle":
        assert time.monotonic() < deadline, "the old engine did not drain"
        time.sleep(0.1)


def greedy(base: str) -> dict:
    body = {"model": MODEL, "prompt": "def main(", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    response = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    return {"text": payload["choices"][0]["text"], "speculative": payload["usage"]["speculative"]}


async def under_load(base: str, action, settle_s: float = 1.0) -> tuple[dict, object]:
    """Run ``action()`` (in a thread) while CLIENTS streaming clients send requests without pause;
    returns the clients' record (with the requests that were in flight when it completed) and the
    action's result."""
    stats = {"requests": 0, "errors": [], "spanning": 0}
    window = {"end": None}
    stop = asyncio.Event()

    async def client_loop(index: int):
        rng = random.Random(index)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    await one_stream(client, rng)
                    stats["requests"] += 1
                    if window["end"] and began < window["end"] < time.monotonic():
                        stats["spanning"] += 1  # in flight when the swap completed
                except Exception as err:  # noqa: BLE001 - every failure is reported
                    stats["errors"].append(repr(err))

    async def drive():
        await asyncio.sleep(settle_s)
        result = await asyncio.to_thread(action)
        window["end"] = time.monotonic()
        await asyncio.sleep(settle_s)
        stop.set()
        return result

    results = await asyncio.gather(drive(), *(client_loop(i) for i in range(CLIENTS)))
    return stats, results[0]


def swap_under_load(base: str, how: str, **body) -> dict:
    """POST /admin/drafter under load: it must succeed the way ``how`` says, with no client
    failing and some requests in flight across it; returns the swap's record."""
    stats, response = asyncio.run(under_load(base, lambda: admin(base, **body)))
    assert response.status_code == 200, response.text
    record = response.json()["swap"]
    print(f"\n{how} swap: {stats['requests']} requests ({stats['spanning']} spanning it), {record['seconds']} s")
    assert record["how"] == how and not stats["errors"], stats["errors"][:5]
    assert stats["spanning"] > 0
    return record


def test_admin_routes_need_the_admin_key(live, server, tiny_target, tiny_draft):
    base, _ = server
    assert admin(base, key=None, path="x").status_code == 401
    wrong = admin(base, key=API_KEY, path="x")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert httpx.get(base + "/admin/drafter", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    plain, _ = live.serve(tiny_config(tiny_target, tiny_draft))  # no admin key: no admin routes
    assert admin(plain, path="x").status_code == 404


@pytest.mark.parametrize("name,problem", [
    ("truncated", "truncated"), ("bad-config", "not valid JSON"), ("no-config", "no config.json"),
    ("missing", "no such directory")])
def test_a_broken_drafter_is_refused_and_the_served_one_keeps_serving(server, drafters, name, problem):
    base, _ = server
    before = served(base)
    response = admin(base, path=str(drafters[name]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert problem in error["message"] and error["param"] == "path", error
    assert served(base) == before
    assert greedy(base)["text"]


def test_in_place_and_new_engine_swaps_under_load_fail_nothing_and_agree(server, drafters):
    base, app = server
    a_greedy = greedy(base)
    swap_under_load(base, "in_place", path=str(drafters["b"]))
    card = served(base)
    assert card["drafter"] == str(drafters["b"].resolve()) and card["swaps"] == 1
    in_place = greedy(base)
    assert in_place["speculative"] != a_greedy["speculative"]  # B drafts otherwise than A

    # the same drafter B, now in an engine built with it: the target's greedy text and B's drafts again
    swap_under_load(base, "beside", path=str(drafters["b"]), mode="new_engine")
    fresh = greedy(base)
    assert fresh == in_place and fresh["text"] == a_greedy["text"]
    state = app.state.server
    settle(base)
    assert state.in_flight_on(state.engine) == 0 and not state.active_requests
    metrics = httpx.get(base + "/metrics").text
    assert scrape(metrics, "vllm_lk_drafter_swaps_total") == 2
    assert scrape(metrics, "vllm_lk_info", {"drafter_id": card["identity"], "swaps": "2"}) == 1


def test_a_drafter_with_another_k_gets_a_new_engine(server, drafters):
    base, app = server
    response = admin(base, path=str(drafters["c"]), mode="in_place")
    assert response.status_code == 400 and "another K (3 -> 2)" in response.json()["error"]["message"]
    response = admin(base, path=str(drafters["c"]))
    assert response.status_code == 200, response.text
    assert response.json()["swap"]["how"] == "beside"
    settle(base)
    assert greedy(base)["speculative"]["num_speculative_tokens"] == 2
    assert served(base)["num_speculative_tokens"] == 2


def test_emitted_tokens_keep_the_targets_law_across_in_place_swaps(live, server, drafters, tiny_target):
    """Token 2 (the first one a verification step emits) over 3072 draws while the drafter is
    swapped in place twice: its marginal must be sum_a p(a) p(. | a). Threshold p > 1e-6: a
    correct server fails once in a million runs; a step that verified drafts with the q of other
    weights than drew them would bias the law (chi-square growing with the draws). The draws go
    to the serving engine directly (token ids, no detokenization), the swaps through HTTP."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    from tests.integration.test_exact_verification import next_token_probs

    base, app = server
    admin(base, path=str(drafters["a"]), mode="new_engine").raise_for_status()  # K = 3 again
    settle(base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    prompt = tokenizer("def ", add_special_tokens=False)["input_ids"]
    state = app.state.server

    async def one(request_id: str) -> list[int]:
        params = SamplingParams(n=16, max_tokens=2, temperature=1.0, ignore_eos=True)
        tokens: dict[int, list[int]] = {}
        async for output in state.engine.generate(tokens_input(prompt), params, request_id):
            for out in output.outputs:
                tokens[out.index] = list(out.token_ids)
        return [t[1] for t in tokens.values()]

    async def draws() -> list[int]:
        samples = []
        for round_ in range(12):
            for batch in await asyncio.gather(*(one(f"chi-{round_}-{i}") for i in range(16))):
                samples.extend(batch)
        return samples

    swapped = []

    async def swaps():
        for name in ("b", "a"):
            await asyncio.sleep(1.0)
            response = await asyncio.to_thread(admin, base, path=str(drafters[name]))
            swapped.append(response.status_code == 200 and response.json()["swap"]["how"] == "in_place")

    async def run():
        return (await asyncio.gather(draws(), swaps()))[0]

    samples = live.run(run(), timeout=600)
    assert swapped == [True, True] and len(samples) == 3072
    model = AutoModelForCausalLM.from_pretrained(tiny_target, torch_dtype=torch.float32).eval()
    p1 = next_token_probs(model, prompt, [[]], 1.0)[0]
    vocab = p1.shape[0]
    p2 = torch.cat([next_token_probs(model, prompt, [[a] for a in range(s, min(s + 128, vocab))], 1.0)
                    for s in range(0, vocab, 128)])
    observed = torch.bincount(torch.tensor(samples), minlength=vocab).double()
    assert chi_square_p_value(observed, (p1 @ p2) * len(samples)) > 1e-6


def test_restart_strategy_makes_requests_wait_not_fail(live, tiny_target, tiny_draft, drafters):
    """swap_strategy restart: the app stops its engine and starts one with the new drafter;
    requests arriving meanwhile wait for it."""
    config = tiny_config(tiny_target, tiny_draft, admin_key=ADMIN_KEY, swap_strategy="restart")
    base, app = live.serve(config, engine=lambda: build_engine(config, live.spec))
    deadline = time.monotonic() + 120
    while httpx.get(base + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app's engine did not start"
        time.sleep(0.5)
    stats, response = asyncio.run(under_load(base, lambda: admin(base, path=str(drafters["c"]))))
    assert response.status_code == 200, response.text
    print(f"restart swap: {stats['requests']} requests, {response.json()['swap']['seconds']} s")
    assert response.json()["swap"]["how"] == "restart" and not stats["errors"], stats["errors"][:5]
    assert greedy(base)["speculative"]["num_speculative_tokens"] == 2

"""The OpenAI-compatible API, through the official `openai` client, against a real uvicorn server
over a real vLLM engine (tiny target, tiny draft model, K = 3): every endpoint streaming and not,
speculative stats in usage and in every chunk, and the metrics that must agree with them."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from openai import OpenAI

from tests.integration.server_harness import API_KEY, MODEL, K, scrape

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def base(live):
    return live.serve()[0]


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def check_spec(spec: dict, completion_tokens: int, choices: int = 1) -> None:
    """Invariants of usage.speculative: counts add up, and every emitted token is a prefill token,
    an accepted draft or the one token each verification step adds (the last step may be cut)."""
    assert spec["num_speculative_tokens"] == K
    steps, accepted = spec["verification_steps"], spec["accepted_tokens"]
    assert spec["drafted_tokens"] == sum(spec["drafted_per_position"])
    assert accepted == sum(spec["accepted_per_position"])
    assert all(0 <= a <= d <= steps for a, d in zip(spec["accepted_per_position"], spec["drafted_per_position"]))
    assert spec["accepted_per_position"] == sorted(spec["accepted_per_position"], reverse=True)
    if steps:
        assert spec["acceptance_length"] == pytest.approx(1 + accepted / steps)
        assert spec["drafts_per_step"] == pytest.approx(spec["drafted_tokens"] / steps)
    assert steps + accepted + choices >= completion_tokens > accepted  # max_tokens may cut the last step


def test_models_list_and_get(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.model_extra["speculative"]["method"] == "draft_model"
    assert card.model_extra["speculative"]["num_speculative_tokens"] == K
    assert card.model_extra["max_model_len"] == 512


def test_completion_usage_carries_speculative_stats(client):
    out = client.completions.create(model=MODEL, prompt="def main(", max_tokens=24, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 24 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24
    spec = out.usage.model_extra["speculative"]
    check_spec(spec, 24)
    assert spec["verification_steps"] > 0


def test_seed_makes_sampling_reproducible_and_n_gives_choices(client):
    kwargs = dict(model=MODEL, prompt="import os\n", max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert first.choices[0].text == again.choices[0].text
    multi = client.completions.create(**{**kwargs, "n": 3, "seed": None, "extra_body": {"top_k": 20}})
    assert sorted(c.index for c in multi.choices) == [0, 1, 2]
    check_spec(multi.usage.model_extra["speculative"], multi.usage.completion_tokens, choices=3)


def test_greedy_is_deterministic_and_stop_strings_stop(client):
    kwargs = dict(model=MODEL, prompt="class Foo:\n    def", max_tokens=40, temperature=0)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b and a
    stop = a[len(a) // 2: len(a) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and a.startswith(cut.text)


def test_several_prompts_token_ids_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=["def f(", "import "], max_tokens=5, n=2, temperature=1)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    ids = client.completions.create(model=MODEL, prompt=[276, 74, 406], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3
    echoed = client.completions.create(model=MODEL, prompt="def main(", max_tokens=4, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith("def main(")


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=1, logprobs=3, seed=1)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)  # the sampled token may be outside the top 3
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0


def test_streaming_completion_reports_acceptance_live(client):
    stream = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=1.0, seed=3,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    running = [c.model_extra["speculative"]["verification_steps"] for c in text_chunks]
    assert running == sorted(running) and running[-1] > running[0]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 40
    assert usage.model_extra["speculative"] == text_chunks[-1].model_extra["speculative"]
    check_spec(usage.model_extra["speculative"], 40)


def test_stream_wire_format(base):
    """Raw SSE: `data: ` events, one JSON each, `data: [DONE]` last; continuous usage on request."""
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert all(p["usage"] is not None for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 8


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum a list."}],
        max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens > 8  # the template adds role markers
    check_spec(out.usage.model_extra["speculative"], out.usage.completion_tokens)


def test_chat_streaming_with_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_completion_tokens=10,
        temperature=1, seed=5, logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].logprobs]
    assert content and all(len(e.top_logprobs) == 2 for c in content for e in c.choices[0].logprobs.content)
    assert chunks[-1].usage.completion_tokens == sum(len(c.choices[0].logprobs.content) for c in content)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])


def test_usage_and_metrics_agree_with_engine_counters(base, client):
    """Summed per-request usage == our vllm_lk_spec_* counters == vLLM's vllm:spec_decode_* counters
    (over a batch of finished requests, measured as differences)."""
    before = httpx.get(base + "/metrics").text
    totals = {"steps": 0, "drafted": 0, "accepted": 0, "per_pos": [0] * K}
    for seed in range(4):
        out = client.completions.create(model=MODEL, prompt=f"def f{seed}(", max_tokens=20, temperature=1, seed=seed, n=2)
        spec = out.usage.model_extra["speculative"]
        totals["steps"] += spec["verification_steps"]
        totals["drafted"] += spec["drafted_tokens"]
        totals["accepted"] += spec["accepted_tokens"]
        totals["per_pos"] = [a + b for a, b in zip(totals["per_pos"], spec["accepted_per_position"])]
    after = httpx.get(base + "/metrics").text

    def diff(name, labels=None):
        return scrape(after, name, labels) - scrape(before, name, labels)

    assert diff("vllm:spec_decode_num_drafts_total") == totals["steps"]
    assert diff("vllm:spec_decode_num_draft_tokens_total") == totals["drafted"]
    assert diff("vllm:spec_decode_num_accepted_tokens_total") == totals["accepted"]
    assert diff("vllm_lk_spec_verification_steps_total") == totals["steps"]
    for pos in range(K):
        assert diff("vllm:spec_decode_num_accepted_tokens_per_pos_total", {"position": str(pos)}) == totals["per_pos"][pos]
        assert diff("vllm_lk_spec_accepted_tokens_total", {"position": str(pos)}) == totals["per_pos"][pos]
    assert sum(diff("vllm_lk_spec_drafted_tokens_total", {"position": str(p)}) for p in range(K)) == totals["drafted"]
    assert diff("vllm_lk_request_acceptance_length_count") == 4
    assert diff("vllm_lk_time_to_first_token_seconds_count") == 4
    assert diff("vllm_lk_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 4
    # the engine's own drafting record: every verified draft was made in some engine step (the
    # drafter also drafts for a request in its last step, whose drafts are never verified)
    assert diff("vllm_lk_spec_engine_steps_total") > 0
    assert diff("vllm_lk_spec_drafts_per_step_sum") >= totals["drafted"]
    with_k = diff("vllm_lk_spec_drafts_per_step_count") - diff("vllm_lk_spec_drafts_per_step_bucket", {"le": f"{K - 1}.0"})
    assert with_k >= totals["steps"]  # fixed K: each verification step verified K drafts made in one step
    assert "vllm_lk_spec_estimated_speedup" not in after  # adaptive mode only
    assert 'speculation="fixed"' in after


def test_metrics_exposition_names_are_documented(base):
    text = httpx.get(base + "/metrics").text
    names = {n for n in re.findall(r"^# HELP (vllm_lk_\w+)", text, re.M) if not n.endswith("_created")}
    readme = open("docs/server.md").read()
    missing = sorted(n for n in names if f"`{n}" not in readme)
    assert not missing, f"undocumented metrics: {missing}"
    for name in ("vllm_lk_info", "vllm_lk_requests_running", "vllm_lk_requests_waiting", "vllm_lk_window_acceptance_length",
                 "vllm_lk_request_acceptance_length", "vllm_lk_time_per_output_token_seconds"):
        assert name in names
    assert 'vllm_lk_info{' in text and 'method="draft_model"' in text


def test_dashboard_is_self_contained_and_has_data(base, client):
    client.completions.create(model=MODEL, prompt="def g(", max_tokens=10, temperature=1)
    page = httpx.get(base + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?https?:""", page.text) and "<svg" in page.text
    data = httpx.get(base + "/dashboard/data").json()
    assert data["info"]["num_speculative_tokens"] == K and data["info"]["method"] == "draft_model"
    points = data["series"]["points"]
    assert points and sum(p["steps"] for p in points) > 0
    assert data["window"]["acceptance_length"] >= 1


def test_health_ready_openapi(base):
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json()["status"] == "ready"
    spec = httpx.get(base + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics"} <= set(spec["paths"])


def test_version_tokenize_detokenize_as_vllm_serves_them(base, client):
    import vllm

    from vllm_lk import __version__

    assert httpx.get(base + "/version").json() == {"version": vllm.__version__, "vllm_lk": __version__}
    out = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "def main(", "return_token_strs": True},
                     headers=AUTH).json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) > 0 and out["max_model_len"] == 512
    # the same count the completions endpoint uses for the same prompt
    done = client.completions.create(model=MODEL, prompt="def main(", max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == out["count"]
    assert httpx.post(base + "/detokenize", json={"tokens": out["tokens"]}, headers=AUTH).json() == {"prompt": "def main("}
    messages = [{"role": "user", "content": "Sum a list."}]
    chat = httpx.post(base + "/tokenize", json={"model": MODEL, "messages": messages}, headers=AUTH).json()
    answered = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert answered.usage.prompt_tokens == chat["count"]
    bare = httpx.post(base + "/tokenize", json={"messages": messages, "add_generation_prompt": False}, headers=AUTH).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    assert httpx.post(base + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_vllm_fields_are_honoured(base, client):
    """stop_token_ids, add_generation_prompt / continue_final_message and chat_template_kwargs reach
    the engine and change the result; no-op values of fields this server cannot honour pass."""
    first = client.completions.create(model=MODEL, prompt="def main(", max_tokens=1, temperature=0)
    token = httpx.post(base + "/tokenize", json={"prompt": first.choices[0].text, "add_special_tokens": False},
                       headers=AUTH).json()["tokens"]
    assert len(token) == 1
    stopped = client.completions.create(model=MODEL, prompt="def main(", max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": token})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage.completion_tokens == 1  # the stop token is generated, not shown
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, wor"}]
    continued = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    opened = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert continued.usage.prompt_tokens < opened.usage.prompt_tokens  # no <|end|> and no new assistant turn
    noop = client.chat.completions.create(
        model=MODEL, messages=messages[:1], max_tokens=2, temperature=0, logit_bias={}, store=False,
        tool_choice="none", service_tier="auto", user="u1", extra_body={"chat_template_kwargs": {"unused": 1}})
    assert noop.choices[0].finish_reason in ("length", "stop")


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _runs(points: list[dict], gap: float) -> int:
    """Stretches of points without an idle gap between them (what the page must draw apart)."""
    times = [p["t"] for p in points if p["acceptance_length"] is not None]
    return sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > gap)


def test_dashboard_in_a_real_browser(base, client, tmp_path):
    """/dashboard rendered by headless Chromium after real traffic: the tiles show what
    /dashboard/data holds, an idle stretch is drawn as a gap (two line segments, not one line
    across it), there is one line per draft position, and the predicted tau says which K (and
    temperature) it is for. `make deps-system` installs Debian's chromium; without it this skips."""
    import subprocess

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium (make deps-system installs it)")
    import time

    for seed in range(2):
        client.completions.create(model=MODEL, prompt="def f(", max_tokens=16, temperature=1, seed=seed)
    time.sleep(2.5)  # > 1.5 buckets of 1 s: an idle stretch
    client.completions.create(model=MODEL, prompt="import os", max_tokens=16, temperature=1, seed=9)
    before = httpx.get(base + "/dashboard/data").json()
    shot = tmp_path / "dashboard.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=4000",
             "--window-size=1000,900"]
    dom = subprocess.run([browser, *flags, "--dump-dom", base + "/dashboard"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    subprocess.run([browser, *flags, f"--screenshot={shot}", base + "/dashboard"], capture_output=True, timeout=120)
    after = httpx.get(base + "/dashboard/data").json()
    html = dom.stdout

    def tile(name: str) -> str:
        return re.search(rf'id="{name}"[^>]*>([^<]*)<', html).group(1)

    shown = {f"{d['window']['acceptance_length']:.3f}" for d in (before, after)}
    assert tile("t-len") in shown, (tile("t-len"), shown)
    assert tile("t-steps") in {str(d["window"]["verification_steps"]) for d in (before, after)}
    assert f"K = {K}" in tile("t-tau-label") and tile("status") == ""  # the status line shows fetch errors
    length_svg = re.search(r'<svg id="len".*?</svg>', html, re.S).group(0)
    segments = sum(d.count("M") for d in re.findall(r'<path d="([^"]*)"', length_svg))
    gap = 1.5 * before["series"]["bucket_seconds"]
    assert segments in {_runs(d["series"]["points"], gap) for d in (before, after)} and segments >= 2, segments
    position_svg = re.search(r'<svg id="pos".*?</svg>', html, re.S).group(0)
    assert position_svg.count("<path") == K
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

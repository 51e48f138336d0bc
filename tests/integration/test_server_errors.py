"""Every failure is OpenAI-shaped, limits hold, and requests that end early free the engine:
bad input (400), keys (401), unknown model/route (404), a full admission queue (429 +
Retry-After), not ready / engine failed (503), timeouts, a failure mid-stream (SSE error event),
client disconnects (engine request aborted) and shutdown (drain, then abort)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.server_harness import (
    API_KEY,
    MODEL,
    EngineWrapper,
    PacedEngine,
    scrape,
    tiny_config,
    unfinished_engine_requests,
)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": MODEL, "prompt": "def main(", "max_tokens": 400, "ignore_eos": True, "temperature": 1}


@pytest.fixture(scope="module")
def served(live):
    return live.serve()


@pytest.fixture(scope="module")
def base(served):
    return served[0]


def assert_error(response: httpx.Response, status: int, error_type: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if error_type:
        assert error["type"] == error_type
    if param:
        assert error["param"] == param
    return error


def wait_until(predicate, timeout: float = 20.0, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


BAD_BODIES = [
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a"] * 20}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 100000]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(2, 502)) + [3] * 100}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 8}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, "max_completion_tokens"),
    # strict: unknown fields, and OpenAI / vLLM fields this server cannot honour, name themselves
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "store": True}, "store"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "service_tier": "flex"}, "service_tier"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 0.1}, "min_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "add_bos": True}, "add_bos"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "prompt"),
    ("/detokenize", {"model": MODEL, "tokens": [100000]}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_BODIES, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in enumerate(BAD_BODIES)])
def test_bad_fields_are_400(base, path, body, param):
    error = assert_error(httpx.post(base + path, json=body, headers=AUTH), 400, "invalid_request_error", param)
    if error["code"] == "unsupported_parameter" or "unknown field" in error["message"]:
        assert param.split(".")[-1] in error["message"], error  # the message says which field, and why


def test_bad_json_and_non_object_bodies_are_400(base):
    headers = {**AUTH, "Content-Type": "application/json"}
    error = assert_error(httpx.post(base + "/v1/completions", content=b'{"model": ', headers=headers), 400)
    assert "JSON" in error["message"]
    assert_error(httpx.post(base + "/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_error(httpx.post(base + "/v1/chat/completions", content=b"", headers=headers), 400)


def test_keys(base):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(base + "/v1/completions", json=body), 401, "authentication_error")
    wrong = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401) and wrong.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    for path in ("/health", "/ready", "/metrics", "/dashboard", "/dashboard/data"):
        assert httpx.get(base + path).status_code == 200, path


def test_unknown_model_route_and_method(base):
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert_error(httpx.get(base + "/v1/models/gpt-4", headers=AUTH), 404, "not_found_error", "model")
    assert_error(httpx.get(base + "/v1/nothing", headers=AUTH), 404, "not_found_error")
    assert_error(httpx.get(base + "/v1/completions", headers=AUTH), 405)


def test_full_admission_queue_is_429_with_retry_after(live):
    base, app = live.serve(tiny_config(live.config.target, live.config.drafter, max_queue=1, retry_after_s=3))
    first_chunk = threading.Event()
    release = threading.Event()

    def hold():
        with httpx.stream("POST", base + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH, timeout=60) as r:
            for _ in r.iter_lines():
                first_chunk.set()
                if release.wait(0):
                    break

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert first_chunk.wait(60)
        refused = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, headers=AUTH)
        assert_error(refused, 429, "rate_limit_error")
        assert refused.headers["retry-after"] == "3"
        with pytest.raises(openai.RateLimitError):
            OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0).completions.create(model=MODEL, prompt="x", max_tokens=1)
    finally:
        release.set()
        holder.join(60)
    assert wait_until(lambda: app.state.server.admission.in_flight == 0)
    assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, headers=AUTH).status_code == 200


def test_not_ready_then_failed_engine_is_503(live):
    release = threading.Event()

    def never_starts():
        release.wait(120)
        raise RuntimeError("engine start failed (test)")

    base, app = live.serve(tiny_config(live.config.target, live.config.drafter), engine=never_starts)
    assert httpx.get(base + "/health").status_code == 200  # alive while loading
    assert_error(httpx.get(base + "/ready"), 503, "service_unavailable")
    error = assert_error(httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=AUTH), 503)
    assert error["code"] == "not_ready"
    release.set()
    assert wait_until(lambda: httpx.get(base + "/health").status_code == 503)
    assert assert_error(httpx.get(base + "/ready"), 503)["code"] == "engine_dead"


class FailingEngine(EngineWrapper):
    """The real engine, except that generation raises after ``after`` outputs: a ValueError, which
    is a bug of ours or the engine's, not the client's (only vLLM's request validation is a 400)."""

    def __init__(self, engine, after: int):
        super().__init__(engine)
        self.after = after

    async def after_output(self, count: int, output) -> None:
        if count >= self.after:
            raise ValueError("injected engine failure")


def test_failure_mid_stream_is_an_sse_error_event(live):
    base, app = live.serve(engine=FailingEngine(live.engine, after=3))
    with httpx.stream("POST", base + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["type"] == "internal_error" and "ValueError" in error["message"] and "cmpl-" in error["message"]
    assert sum(1 for e in events if '"choices"' in e) >= 2
    plain = httpx.post(base + "/v1/completions", json=LONG, headers=AUTH, timeout=60)
    error = assert_error(plain, 500, "internal_error")
    assert plain.headers["x-request-id"] in error["message"] and plain.headers["x-request-id"].startswith("cmpl-")
    assert wait_until(lambda: unfinished_engine_requests(live) == 0)
    assert app.state.server.admission.in_flight == 0


def test_request_timeout_aborts(live):
    base, app = live.serve(tiny_config(live.config.target, live.config.drafter, request_timeout_s=1.0),
                           engine=PacedEngine(live.engine))
    body = {**LONG, "max_tokens": 500, "prompt": "x"}
    assert_error(httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=60), 504, "timeout_error")
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert json.loads(events[-2][6:])["error"]["code"] == "timeout"
    assert wait_until(lambda: unfinished_engine_requests(live) == 0)


def _engine_idle(base: str) -> bool:
    text = httpx.get(base + "/metrics").text
    return (scrape(text, "vllm:num_requests_running") == 0 and scrape(text, "vllm:num_requests_waiting") == 0
            and scrape(text, "vllm_lk_requests_running") == 0 and scrape(text, "vllm_lk_requests_waiting") == 0)


def test_disconnect_mid_stream_aborts_the_engine_request(live, served):
    base, app = served
    with httpx.stream("POST", base + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH, timeout=60) as r:
        for index, _ in enumerate(r.iter_lines()):
            if index >= 3:
                break  # leaving the block closes the connection
    assert wait_until(lambda: unfinished_engine_requests(live) == 0)
    assert wait_until(lambda: app.state.server.admission.in_flight == 0)
    # the engine core dropped it too: one more request runs, and then nothing is left running
    httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert wait_until(lambda: _engine_idle(base))


def test_disconnect_while_waiting_for_a_whole_response_aborts(live):
    """The client hangs up while its (non-streaming) request is running in the engine. A raw
    socket closed once the engine holds the request, not a client timeout racing generation
    (on a quiet machine 400 tokens finished inside a 1 s timeout), and paced outputs, so the
    request is still running when the server notices, on any machine."""
    base, app = live.serve(engine=PacedEngine(live.engine))
    body = json.dumps({**LONG, "n": 4, "max_tokens": 500}).encode()
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        assert wait_until(lambda: unfinished_engine_requests(live) > 0, poll=0.005)
    assert wait_until(lambda: unfinished_engine_requests(live) == 0)
    assert wait_until(lambda: app.state.server.admission.in_flight == 0)
    text = httpx.get(base + "/metrics").text
    assert scrape(text, "vllm_lk_requests_total", {"endpoint": "/v1/completions", "status": "499"}) >= 1


def _stream_in_thread(base: str, body: dict, started: threading.Event, events: list) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()
        except httpx.HTTPError as err:
            events.append(f"error: {err!r}")
        started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_shutdown_drains_in_flight_streams(live):
    base, app = live.serve(tiny_config(live.config.target, live.config.drafter, drain_timeout_s=60))
    started, events = threading.Event(), []
    thread = _stream_in_thread(base, {**LONG, "max_tokens": 60}, started, events)
    assert started.wait(60)
    live.stop(len(live.servers) - 1)  # graceful: returns once the stream has finished
    thread.join(60)
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in finals if c["choices"]][-1] == "length"
    assert not app.state.server.ready


def test_shutdown_aborts_what_outlives_the_drain_timeout(live):
    base, app = live.serve(tiny_config(live.config.target, live.config.drafter, drain_timeout_s=0.5),
                           engine=PacedEngine(live.engine))
    started, events = threading.Event(), []
    thread = _stream_in_thread(base, {**LONG, "max_tokens": 500}, started, events)
    assert started.wait(60)
    live.stop(len(live.servers) - 1)
    thread.join(60)
    assert not any('"finish_reason":"length"' in e for e in events)
    assert wait_until(lambda: unfinished_engine_requests(live) == 0)

"""`vllm-lk serve` as a user runs it: a subprocess with flags, a YAML config, a key file and vLLM
engine arguments after `--`; ready only once the engine is, the plugin in every vLLM process, and
SIGTERM drains an in-flight stream before the process exits."""

import json
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration
KEY = "cli-key-42"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_target, tiny_draft, venv_bin, clean_env, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    (work / "key").write_text(KEY + "\n")
    (work / "serve.yaml").write_text(
        "served_model_name: tiny\nmax_queue: 8\ndrain_timeout_s: 60\nengine_args:\n  gpu_memory_utilization: 0.1\n")
    port = free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(venv_bin / "vllm-lk"), "serve", "--config", str(work / "serve.yaml"), "--target", str(tiny_target),
         "--drafter", str(tiny_draft), "--method", "draft_model", "--num-speculative-tokens", "3",
         "--port", str(port), "--api-key-file", str(work / "key"), "--", "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env,
    )
    base = f"http://127.0.0.1:{port}"
    ready_codes = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + log_path.read_text()[-4000:])
        try:
            code = httpx.get(base + "/ready", timeout=2).status_code
            ready_codes.append((httpx.get(base + "/health", timeout=2).status_code, code))
            if code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server not ready within 300 s:\n" + log_path.read_text()[-4000:])
    yield {"base": base, "log": log_path, "proc": proc, "ready_codes": ready_codes}
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_ready_only_once_the_engine_is(server):
    codes = server["ready_codes"]
    assert (200, 503) in codes, "the port should answer (alive, not ready) while the engine starts"
    assert codes[-1] == (200, 200)


def test_config_flags_and_engine_args_are_applied(client, server):
    card = client.models.retrieve("tiny")
    assert card.model_extra["max_model_len"] == 512  # from `-- --max-model-len 512`
    assert card.model_extra["speculative"]["num_speculative_tokens"] == 3
    assert httpx.get(server["base"] + "/v1/models").status_code == 401  # key from --api-key-file


def test_completion_and_chat(client):
    out = client.completions.create(model="tiny", prompt="def main(", max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == 12 and out.choices[0].text
    assert out.usage.model_extra["speculative"]["verification_steps"] > 0
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Return the sum of a list."}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 8


def test_plugin_active_in_server_processes(server, client):
    pids = set(re.findall(r"vllm_lk \S+ active \(pid (\d+)\)", server["log"].read_text()))
    assert len(pids) >= 3  # API server, engine core, worker


def test_sigterm_drains_then_exits(server):
    """Last in this module: it stops the server."""
    events, started = [], threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "import ", "max_tokens": 80, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", server["base"] + "/v1/completions", json=body, headers=headers, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    server["proc"].send_signal(signal.SIGTERM)
    thread.join(120)
    # uvicorn re-raises the signal once it has shut down gracefully: exit status -SIGTERM
    assert server["proc"].wait(120) in (0, -signal.SIGTERM)
    assert events[-1] == "data: [DONE]"
    reasons = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e[6:])["choices"]]
    assert reasons[-1] == "length"

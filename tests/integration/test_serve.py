"""`vllm-lk serve` starts a real OpenAI-compatible server that the official client can use."""

import re
import socket
import subprocess
import time

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_target, venv_bin, clean_env, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(venv_bin / "vllm-lk"), "serve", "--target", str(tiny_target), "--port", str(port),
         "--served-model-name", "tiny", "--", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + log_path.read_text()[-4000:])
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server not healthy within 300 s:\n" + log_path.read_text()[-4000:])
    yield base, log_path
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused")


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion(client):
    out = client.completions.create(model="tiny", prompt="def main(", max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == 12
    assert isinstance(out.choices[0].text, str) and out.choices[0].text


def test_streaming_completion(client):
    stream = client.completions.create(model="tiny", prompt="import ", max_tokens=8, temperature=1.0, seed=3, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len("".join(pieces)) > 0 and len(pieces) >= 2


def test_chat_uses_the_tokenizer_template(client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Return the sum of a list."}], max_tokens=8, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    # prompt = "<|user|>\n" + content + "<|end|>\n<|assistant|>\n": more tokens than the content alone
    assert out.usage.prompt_tokens > 8


def test_plugin_active_in_server_processes(server, client):
    _, log_path = server
    pids = set(re.findall(r"vllm_lk \S+ active \(pid (\d+)\)", log_path.read_text()))
    assert len(pids) >= 3  # API server, engine core, worker

"""`vllm-lk generate --endpoint`: regeneration through a running server, ours and vLLM's own
api_server, writing the lines the trainer reads, resumable."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest

from server.launch import vllm_command
from tests.integration.server_harness import API_KEY
from training.data import read_examples
from training.generate import GenerateConfig
from training.generate_endpoint import generate_via_endpoint

pytestmark = pytest.mark.integration
KEYS = ["id", "prompt", "completion", "prompt_token_ids", "completion_token_ids", "finish_reason"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoint") / "prompts.jsonl"
    lines = [{"id": f"p{i}", "prompt": text} for i, text in enumerate(
        ["def main(", "import os\n", "class Stack:\n", "# sum\n", "for i in ", "x = "])]
    lines += [{"id": "m0", "messages": [{"role": "user", "content": "write a loop"}]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def regenerate(tiny_target, prompts, out, endpoint, api_key=None):
    config = GenerateConfig(target=tiny_target, prompts=str(prompts), max_tokens=12, temperature=0.0)
    return generate_via_endpoint(config, out, endpoint, api_key, concurrency=3)


@pytest.fixture(scope="module")
def ours(live, tiny_target, prompts, tmp_path_factory):
    base, _ = live.serve()
    out = tmp_path_factory.mktemp("ours") / "regen.jsonl"
    summary = regenerate(tiny_target, prompts, out, base, API_KEY)
    return base, out, summary


def test_through_our_server_the_lines_are_the_trainers_and_resume(ours, tiny_target, prompts):
    from transformers import AutoTokenizer

    base, out, summary = ours
    assert summary["written"] == 7 and summary["skipped"] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    for line in lines:
        keys = list(line)
        assert keys == (KEYS if "prompt" in line else [k if k != "prompt" else "messages" for k in KEYS])
        assert len(line["completion_token_ids"]) == 12 or line["finish_reason"] == "stop"
        assert tokenizer.decode(line["completion_token_ids"]) == line["completion"]
        if "prompt" in line:
            assert line["prompt_token_ids"] == tokenizer(line["prompt"])["input_ids"]
    assert len(read_examples(out, tokenizer.vocab_size)) == 7
    kept = out.read_text().splitlines()[:4]
    out.write_text("\n".join(kept) + "\n")
    again = regenerate(tiny_target, prompts, out, base, API_KEY)
    assert again["skipped"] == 4 and again["written"] == 3
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == sorted(line["id"] for line in lines)
    with pytest.raises(Exception, match="401"):
        regenerate(tiny_target, prompts, out.with_name("nokey.jsonl"), base, "wrong-key")


def test_through_vllms_own_server_the_greedy_lines_are_the_same(ours, tiny_target, prompts, tmp_path, clean_env):
    _, our_out, _ = ours
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = vllm_command(tiny_target, "127.0.0.1", port, "tiny", ["--max-model-len", "512",
                                                                     "--gpu-memory-utilization", "0.1"], on_gpu=False)
    log = (tmp_path / "vllm.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM's server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        out = tmp_path / "regen.jsonl"
        assert regenerate(tiny_target, prompts, out, f"http://127.0.0.1:{port}")["written"] == 7
    finally:
        process.terminate()
        process.wait(60)
    theirs = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    mine = {json.loads(line)["id"]: json.loads(line) for line in our_out.read_text().splitlines()}
    assert theirs == mine  # T = 0: the target's greedy text, whichever server (ours speculates)

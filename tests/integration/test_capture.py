"""--capture on a real server: every finished choice is one line in the format `vllm-lk train`
reads, with the tokens the client received and the per-step acceptance the server reported."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI

from server.capture import capture_files
from tests.integration.server_harness import API_KEY, MODEL, scrape, tiny_config
from training.data import read_examples

pytestmark = pytest.mark.integration


def test_served_requests_are_captured_as_training_data(live, tiny_target, tiny_draft, tmp_path):
    directory = tmp_path / "capture"
    base, app = live.serve(tiny_config(tiny_target, tiny_draft, capture_dir=directory))
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY)
    text = client.completions.create(model=MODEL, prompt="def main(", max_tokens=12, n=2, temperature=1.0, seed=3)
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    stream = client.completions.create(model=MODEL, prompt="import ", max_tokens=10, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    deadline = time.monotonic() + 10
    state = app.state.server
    while state.capture.written < 5:
        assert time.monotonic() < deadline, state.capture.written
        time.sleep(0.05)
    files = capture_files(directory)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    by_completion = {r["completion"]: r for r in records}
    for choice in text.choices:
        record = by_completion[choice.text]
        assert record["prompt"] == "def main(" and record["sampling"]["temperature"] == 1.0
        assert record["sampling"]["seed"] == 3 and record["finish_reason"] == choice.finish_reason
    assert ids.choices[0].text in by_completion and by_completion[ids.choices[0].text]["prompt_token_ids"] == [5, 6, 7, 8]
    assert by_completion[ids.choices[0].text]["prompt"]  # decoded from the token ids
    assert chat.choices[0].message.content in by_completion and streamed in by_completion
    served = ids.usage.model_extra["speculative"]
    steps = by_completion[ids.choices[0].text]["speculative"]
    assert sum(steps["per_step_drafted"]) == served["drafted_tokens"]
    assert sum(steps["per_step_accepted"]) == served["accepted_tokens"]
    assert len({r["drafter_id"] for r in records}) == 1 and records[0]["drafter_id"] == state.drafter_identity
    examples = [e for f in files for e in read_examples(f, state.vocab_size)]  # what the trainer reads
    assert len(examples) == len(records) == 5
    assert scrape(httpx.get(base + "/metrics").text, "vllm_lk_capture_records_total") == 5

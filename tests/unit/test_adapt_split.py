"""`vllm-lk adapt`'s data split: by prompt, stable across rounds, deduplicated by id."""

from __future__ import annotations

import json

from training.adapt import AdaptConfig, snapshot


def write_capture(directory, records) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "capture-000001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"id": "half-writ')


def test_answers_to_one_prompt_stay_on_one_side_and_ids_are_deduplicated(tmp_path):
    records = [{"id": f"req-{i}", "prompt": f"prompt {i % 40}", "prompt_token_ids": [i % 40, 7], "completion": str(i)}
               for i in range(400)]
    records.append(dict(records[0], completion="the same id captured twice"))
    capture = tmp_path / "capture"
    write_capture(capture, records)
    counts = snapshot(AdaptConfig(capture=capture, heldout_share=0.3), tmp_path / "round-1")
    assert counts["records"] == 400
    sides = {}
    for side in ("train", "heldout"):
        for line in (tmp_path / "round-1" / f"{side}.jsonl").read_text().splitlines():
            record = json.loads(line)
            sides.setdefault(record["prompt"], set()).add(side)
    assert all(len(s) == 1 for s in sides.values())  # no prompt on both sides
    held = sum(s == {"heldout"} for s in sides.values())
    assert 2 <= held <= 25  # 40 prompts at share 0.3: 12 expected; outside [2, 25] has probability < 1e-4
    assert counts["heldout"] == 10 * held
    # a later round (more traffic) keeps every earlier record on its side
    write_capture(capture, records + [{"id": "new", "prompt": "prompt 3", "prompt_token_ids": [3, 7]}])
    again = snapshot(AdaptConfig(capture=capture, heldout_share=0.3), tmp_path / "round-2")
    assert again["records"] == 401
    before = set((tmp_path / "round-1" / "heldout.jsonl").read_text().splitlines())
    assert before <= set((tmp_path / "round-2" / "heldout.jsonl").read_text().splitlines())

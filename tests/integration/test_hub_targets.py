"""`vllm-lk train --target ORG/NAME` as a user runs it: the tiny target published into an offline
Hugging Face cache the test builds, found there, loaded by transformers from the snapshot, trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hf_cache import add_to_hf_cache

pytestmark = pytest.mark.integration


def test_train_on_a_target_given_by_id(tiny_target, tiny_train_data, tmp_path, clean_env):
    cache = tmp_path / "hub"
    snapshot = add_to_hf_cache(cache, "lk-tests/tiny-target", tiny_target, refs=("main", "v1"))
    env = {**clean_env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "server.cli", "train", "--target", "lk-tests/tiny-target@v1", "--data", str(tiny_train_data),
           "--out", str(run), "--drafter", "draft-model", "--steps", "2", "--batch-size", "4", "--seq-len", "64",
           "--warmup-steps", "1", "--eval-sequences", "2", "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["target"] == str(snapshot.resolve())
    assert (run / "drafter" / "lk_metadata.json").is_file()

    missing = subprocess.run([*cmd[:5], "lk-tests/not-there", *cmd[6:]], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert f"target 'lk-tests/not-there' is neither a local directory nor in the Hugging Face cache at {cache}" in missing.stderr

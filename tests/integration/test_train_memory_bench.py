"""benchmarks/train_memory.py runs end to end (at its tiny shapes: the same code paths as the
Llama-3.1-8B-shaped run, in seconds) and writes the rows and fits the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_memory_writes_rows_and_fits(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_memory.py"), "--tiny", "--drafters", "eagle3",
           "--seq-lens", "32", "64", "--small-vocab", "--full-vocab-target", "--steps", "1", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    versions = {("new", "lk-hybrid"), ("new", "kl"), ("baseline", "lk-hybrid"), ("full-vocab-target", "lk-hybrid"), ("full-vocab-target", "kl")}
    assert {(r["version"], r["loss"]) for r in rows} == versions
    for row in rows:
        assert {"drafter", "seq_len", "peak_mib", "tokens_per_s", "version"} <= row.keys()
        assert row["peak_mib"] > row["step_mib"] >= 0 and row["tokens_per_s"] > 0
    assert {(f["version"], f["loss"]) for f in result["fits"]} == versions
    assert "| eagle3 | baseline |" in out.with_suffix(".md").read_text()

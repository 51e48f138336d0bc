"""server.capture's writer: file modes, the size cap, sampling, and that a full queue drops
records instead of blocking the caller."""

from __future__ import annotations

import json
import stat
import threading
import time

from server.capture import Capture, capture_files


def record(i: int, size: int = 200) -> dict:
    return {"id": f"r{i}", "prompt": "p", "completion": "x" * size, "prompt_token_ids": [1], "completion_token_ids": [2]}


def test_files_are_private_and_the_directory_stays_under_its_cap(tmp_path):
    capture = Capture(tmp_path / "cap", max_mib=0.01)  # 10 KiB: files of 2.5 KiB
    capture.offer([record(i) for i in range(200)])
    capture.close()
    files = capture_files(tmp_path / "cap")
    assert stat.S_IMODE((tmp_path / "cap").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert sum(f.stat().st_size for f in files) <= 0.01 * 2**20
    assert capture.written == 200 and capture.deleted_files > 0 and capture.dropped == 0
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert lines[-1]["id"] == "r199" and [r["id"] for r in lines] == sorted((r["id"] for r in lines), key=lambda i: int(i[1:]))


def test_file_names_sort_in_creation_order_when_the_clock_steps_back(tmp_path, monkeypatch):
    """Readers take the files oldest first by name. Names once came from two clock readings, and
    a second that ticked between them named a newer file before an older one (CI saw the newest
    records deleted by the trim). Here the wall clock runs backwards, one second a file."""
    import server.capture as capture_module

    clock = iter(range(2 * 10**18, 0, -(10**9)))
    monkeypatch.setattr(capture_module.time, "time_ns", lambda: next(clock))
    capture = Capture(tmp_path / "cap", max_mib=8)  # files of 2 MiB: one 1 MiB record each, no trim
    for i in range(4):
        capture._write(json.dumps(record(i, size=2**20)) + "\n")
    capture.close()
    names = [f.name for f in capture_files(tmp_path / "cap")]
    assert len(names) == 4
    assert [json.loads((tmp_path / "cap" / n).read_text())["id"] for n in names] == ["r0", "r1", "r2", "r3"]


def test_a_full_queue_drops_and_never_blocks(tmp_path):
    release = threading.Event()

    class Stalled(Capture):
        def _write(self, line):  # a disk that does not answer
            release.wait(10)
            super()._write(line)

    capture = Stalled(tmp_path / "cap", queue_records=1)
    started = time.monotonic()
    capture.offer([record(i) for i in range(5)])
    assert time.monotonic() - started < 0.5
    assert capture.dropped >= 3  # one may be in the writer's hands, one queued
    release.set()
    capture.close()
    assert capture.written + capture.dropped == 5


def test_the_rate_samples_requests(tmp_path):
    capture = Capture(tmp_path / "cap", rate=0.25, seed=0)
    share = sum(capture.sampled() for _ in range(4000)) / 4000
    capture.close()
    assert abs(share - 0.25) < 0.04  # 6 standard errors: fails a correct sampler ~1e-9 of the time

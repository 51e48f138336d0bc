"""A rolling record of recent speculative activity, in fixed time buckets.

Counters answer "how much since start"; an operator watching a deployment asks "how well is it
speculating right now". The window keeps the last few minutes as buckets of a few seconds (bounded
memory: horizon / bucket entries), feeds the ``vllm_lk_window_*`` gauges at scrape time and the
``/dashboard`` plot, and needs no background task: buckets are created and expired on use.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from server.spec_stats import SpecStats


@dataclass
class Bucket:
    start: float
    spec: SpecStats
    generated_tokens: int = 0
    finished_requests: int = 0
    acceptance_length_sum: float = 0.0  # over finished requests with at least one step
    acceptance_length_count: int = 0


class SpecWindow:
    """Time-bucketed speculative stats over the last ``horizon_s`` seconds."""

    def __init__(self, num_positions: int, bucket_s: float = 5.0, horizon_s: float = 900.0, clock=time.time):
        self.num_positions = num_positions
        self.bucket_s = bucket_s
        self.horizon_s = horizon_s
        self._clock = clock
        self._buckets: deque[Bucket] = deque()
        self._lock = threading.Lock()  # scrapes may come from another thread than the event loop

    def _current(self) -> Bucket:
        now = self._clock()
        start = math.floor(now / self.bucket_s) * self.bucket_s
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(Bucket(start, SpecStats(self.num_positions)))
        self._expire(now)
        return self._buckets[-1]

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0].start + self.bucket_s < now - self.horizon_s:
            self._buckets.popleft()

    def add(self, tokens: int, delta: SpecStats | None = None) -> None:
        """Record one engine output: its new tokens and verification steps."""
        with self._lock:
            bucket = self._current()
            bucket.generated_tokens += tokens
            if delta is not None:
                bucket.spec.merge(delta)

    def add_finished(self, acceptance_length: float | None) -> None:
        with self._lock:
            bucket = self._current()
            bucket.finished_requests += 1
            if acceptance_length is not None:
                bucket.acceptance_length_sum += acceptance_length
                bucket.acceptance_length_count += 1

    def totals(self, seconds: float) -> tuple[SpecStats, int, float]:
        """Stats, generated tokens and the covered span over the last ``seconds``."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            total = SpecStats(self.num_positions)
            tokens = 0
            for bucket in self._buckets:
                if bucket.start + self.bucket_s > now - seconds:
                    total.merge(bucket.spec)
                    tokens += bucket.generated_tokens
            return total, tokens, seconds

    def series(self) -> dict:
        """The JSON behind /dashboard: one entry per non-empty bucket, oldest first."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            points = [
                {
                    "t": bucket.start,
                    "steps": bucket.spec.steps,
                    "acceptance_length": bucket.spec.acceptance_length,
                    "acceptance_rate_per_position": bucket.spec.acceptance_rates(),
                    "drafted_per_position": list(bucket.spec.drafted),
                    "accepted_per_position": list(bucket.spec.accepted),
                    "generated_tokens": bucket.generated_tokens,
                    "tokens_per_second": bucket.generated_tokens / self.bucket_s,
                    "finished_requests": bucket.finished_requests,
                    "request_acceptance_length_mean": (
                        bucket.acceptance_length_sum / bucket.acceptance_length_count
                        if bucket.acceptance_length_count else None
                    ),
                }
                for bucket in self._buckets
            ]
        return {
            "now": now, "bucket_seconds": self.bucket_s, "horizon_seconds": self.horizon_s,
            "num_speculative_tokens": self.num_positions, "points": points,
        }

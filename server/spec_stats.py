"""Speculative-decoding statistics of one request, and how they add up.

vLLM's per-request record (``RequestSpecDecodeMetrics`` at the "detailed" level) lists, per
verification step, how many tokens were drafted and how many of them were accepted; the record is
cumulative and grows while the request runs. Position i (0-based) was drafted in a step when that
step drafted more than i tokens, and accepted when more than i were accepted — the same rule vLLM
uses for its ``vllm:spec_decode_num_accepted_tokens_per_pos`` counter, so sums over requests agree
with the engine's counters exactly.

Acceptance length = 1 + accepted / verification steps: the tokens a step yields on average (the
accepted drafts plus the one token the target always contributes).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counts over a set of verification steps (one request, one choice, or a time window)."""

    num_positions: int
    steps: int = 0
    drafted: list[int] = field(default_factory=list)  # [num_positions] tokens drafted at position i
    accepted: list[int] = field(default_factory=list)  # [num_positions] drafts accepted at position i

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * self.num_positions
        self.accepted = self.accepted or [0] * self.num_positions

    def add_steps(self, drafted: list[int], accepted: list[int]) -> None:
        """Record steps given as per-step drafted / accepted counts."""
        from vllm_lk.request_metrics import position_counts

        by_position = position_counts(drafted, accepted, self.num_positions)
        self.steps += len(drafted)
        for i, (d, a) in enumerate(zip(*by_position)):
            self.drafted[i] += d
            self.accepted[i] += a

    def merge(self, other: SpecStats) -> None:
        """Add another set of steps (e.g. the other choices of an n > 1 request)."""
        self.steps += other.steps
        for i in range(min(self.num_positions, other.num_positions)):
            self.drafted[i] += other.drafted[i]
            self.accepted[i] += other.accepted[i]

    @property
    def drafted_tokens(self) -> int:
        return sum(self.drafted)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted)

    @property
    def acceptance_length(self) -> float | None:
        """1 + accepted / steps; None before the first verification step."""
        return 1.0 + self.accepted_tokens / self.steps if self.steps else None

    def acceptance_rates(self) -> list[float | None]:
        """Per position: accepted / drafted (None where nothing was drafted)."""
        return [a / d if d else None for a, d in zip(self.accepted, self.drafted)]

    def to_usage(self) -> dict:
        """The ``usage.speculative`` object of a response."""
        return {
            "num_speculative_tokens": self.num_positions,
            "verification_steps": self.steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_length": self.acceptance_length,
            "drafts_per_step": self.drafted_tokens / self.steps if self.steps else None,
            "drafted_per_position": list(self.drafted),
            "accepted_per_position": list(self.accepted),
            "acceptance_rate_per_position": self.acceptance_rates(),
        }


class ChoiceTracker:
    """Follows one sequence's cumulative vLLM record and hands out only what is new, so live
    counters can be advanced while the request is still streaming."""

    def __init__(self, num_positions: int):
        self.stats = SpecStats(num_positions)
        self._seen_steps = 0

    def update(self, record) -> SpecStats | None:
        """Take the latest cumulative record (``RequestSpecDecodeMetrics`` or None); return the
        steps it adds since the previous record, or None if it adds none."""
        if record is None:
            return None
        drafted = record.per_step_drafted[self._seen_steps:]
        accepted = record.per_step_accepted[self._seen_steps:]
        if not drafted:
            return None
        self._seen_steps += len(drafted)
        delta = SpecStats(self.stats.num_positions)
        delta.add_steps(drafted, accepted)
        self.stats.merge(delta)
        return delta


def combine(stats: list[SpecStats], num_positions: int) -> SpecStats:
    """The sum of several choices' stats."""
    total = SpecStats(num_positions)
    for item in stats:
        total.merge(item)
    return total

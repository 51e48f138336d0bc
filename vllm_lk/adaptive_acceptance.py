"""The acceptance side of adaptive speculation (no vLLM imports): live per-position and
per-confidence acceptance of drafts, with a per-request factor; vllm_lk.adaptive plans with it."""

from __future__ import annotations

import numpy as np

NUM_BUCKETS = 10


def buckets(confidence: np.ndarray) -> np.ndarray:
    """Bucket index of each confidence in [0, 1] (NaN, an unknown confidence, -> the middle)."""
    conf = np.asarray(confidence, dtype=np.float64) * NUM_BUCKETS
    unknown = conf != conf  # NaN (cheaper than nan_to_num on the few values a step has)
    if unknown.any():
        conf = np.where(unknown, NUM_BUCKETS / 2, conf)
    return np.minimum(np.maximum(conf, 0).astype(np.int64), NUM_BUCKETS - 1)


class AcceptanceModel:
    """Live per-position acceptance, calibrated on the draft's confidence.

    Greedy (T = 0) and sampled requests are counted apart: a greedy draft survives when it is the
    target's argmax, a sampled one with probability sum_v min(p_v, q_v); the same confidence
    means different things for the two. Arrays are indexed [mode, ...] with mode 1 = greedy."""

    def __init__(self, num_positions: int, prior_strength: float = 4.0, request_strength: float = 8.0,
                 decay: float = 0.999, initial_rate: float = 0.6):
        self.num_positions = num_positions
        self.prior_strength = prior_strength
        self.request_strength = request_strength
        self.decay = decay
        self.initial_rate = initial_rate
        self.tried = np.zeros((2, NUM_BUCKETS))  # drafts verified (reached), by confidence bucket
        self.accepted = np.zeros((2, NUM_BUCKETS))
        self.pos_tried = np.zeros((2, num_positions))  # the same by position (confidence unknown)
        self.pos_accepted = np.zeros((2, num_positions))
        self.requests: dict[str, list[float]] = {}  # req_id -> [accepted, predicted]

    def overall_rate(self) -> np.ndarray:  # [2]
        tried, accepted = self.pos_tried.sum(axis=1), self.pos_accepted.sum(axis=1)
        return (accepted + self.prior_strength * self.initial_rate) / (tried + self.prior_strength)

    def position_rates(self) -> np.ndarray:  # [2, K]
        prior = self.prior_strength * self.overall_rate()[:, None]
        return (self.pos_accepted + prior) / (self.pos_tried + self.prior_strength)

    def bucket_rates(self) -> np.ndarray:  # [2, NUM_BUCKETS]
        prior = self.prior_strength * self.overall_rate()[:, None]
        return (self.accepted + prior) / (self.tried + self.prior_strength)

    def request_factor(self, req_id: str) -> float:
        """How much more (or less) of its drafts this request has had accepted than the model
        predicted. It scales the request's survival P(drafts 1..j accepted), the quantity the plan
        sums and ``predicted`` counts (until 2026-12-04 it scaled each conditional rate, so its
        effect compounded with depth). Still optimistic at 8 requests (2026-12-04, T = 0, toy
        target): the plan expected 3.5-4.2 tokens a request-step at k = 5 where fixed K = 5 gave
        3.48, and 3.53 with the factors off; docs/speed.md."""
        accepted, predicted = self.requests.get(req_id, (0.0, 0.0))
        w = self.request_strength
        return (accepted + w) / (predicted + w)

    def observe(self, req_id: str, confidence: np.ndarray, num_accepted: int, greedy: bool = False) -> None:
        """One verification: the request's drafts had these confidences ([k]); ``num_accepted``
        of them were accepted (drafts past the first rejection were never tried)."""
        conf = np.asarray(confidence, dtype=np.float64)[None, :]
        self.observe_batch([req_id], conf, np.array([conf.shape[1]]), np.array([num_accepted]), np.array([greedy]))

    def observe_batch(self, req_ids: list[str], confidence: np.ndarray, counts: np.ndarray,
                      num_accepted: np.ndarray, greedy: np.ndarray) -> None:
        """A step's verifications at once: [B, W] confidences (row b's first counts[b] are its
        drafts'), [B] drafts verified, [B] accepted, [B] greedy flags."""
        conf = np.asarray(confidence, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        accepted = np.minimum(np.asarray(num_accepted, dtype=np.int64), counts)
        tried = np.minimum(accepted + 1, counts)  # [B]
        slots = np.arange(conf.shape[1])[None, :]
        reached = slots < tried[:, None]  # [B, W]
        if not reached.any():
            return
        hits = slots < accepted[:, None]  # [B, W], within reached
        mode = np.broadcast_to(np.asarray(greedy, dtype=bool).astype(np.int64)[:, None], conf.shape)
        positions = np.broadcast_to(np.minimum(slots, self.num_positions - 1), conf.shape)
        known_all = conf == conf  # a draft whose confidence was not read (NaN) has no bucket
        m, pos, h = mode[reached], positions[reached], hits[reached].astype(np.float64)
        by_pos = m * self.num_positions + pos  # flat [2 * n] indices
        # predicted before this step's counts: by confidence where known, else by position
        rates = self.position_rates()[mode, positions]  # [B, W]
        if known_all.any():
            b = buckets(conf)
            rates = np.where(known_all, self.bucket_rates()[mode, b], rates)
            by_bucket, known = m * NUM_BUCKETS + b[reached], known_all[reached].astype(np.float64)
            self.tried += np.bincount(by_bucket, weights=known, minlength=2 * NUM_BUCKETS).reshape(2, NUM_BUCKETS)
            self.accepted += np.bincount(by_bucket, weights=h * known, minlength=2 * NUM_BUCKETS).reshape(2, NUM_BUCKETS)
        self.pos_tried += np.bincount(by_pos, minlength=2 * self.num_positions).reshape(2, self.num_positions)
        self.pos_accepted += np.bincount(by_pos, weights=h, minlength=2 * self.num_positions).reshape(2, self.num_positions)
        # a request's factor scales its survival P(drafts 1..j accepted), the quantity the plan
        # sums: predicted = E[accepted] = sum over its drafted slots of the model's survival
        drafted = slots < counts[:, None]  # [B, W]
        got, predicted = (hits & reached).sum(axis=1), np.where(drafted, np.cumprod(rates, axis=1), 0.0).sum(axis=1)
        for row in np.flatnonzero(tried):
            entry = self.requests.setdefault(req_ids[row], [0.0, 0.0])
            entry[0] += float(got[row])
            entry[1] += float(predicted[row])

    def step_decay(self, steps: int = 1) -> None:
        factor = self.decay**steps
        for counts in (self.tried, self.accepted, self.pos_tried, self.pos_accepted):
            counts *= factor

    def forget(self, live: set[str]) -> None:
        for req_id in [r for r in self.requests if r not in live]:
            del self.requests[req_id]

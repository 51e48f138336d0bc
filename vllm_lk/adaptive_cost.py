"""The cost side of adaptive speculation (no vLLM imports): seconds of an engine step, measured
per cap k ("arm") and modelled linearly where an arm is not yet seen; vllm_lk.adaptive plans
with them."""

from __future__ import annotations

import math

import numpy as np

FEATURES = ("step", "per_request", "per_draft_pass", "per_drafted_token")


class CostModel:
    """Seconds of one engine step ~ theta . (1, requests, draft passes, drafted tokens).

    Exponentially weighted least squares (weight ``decay`` per observation) with a ridge of
    strength ``ridge`` toward ``prior`` (the start-up fit). The ridge is a tenth of the data's
    weight: the start-up steps run cold (each new query length is a new GEMM shape for oneDNN),
    and at ridge 1 their fit held half the weight forever (an EAGLE-3 engine's model put a K = 4
    step at 13 ms against 9.6 ms measured). Observations are held in a list and folded in (one
    matrix product, one 4 x 4 solve) when ``theta`` is next read: in an engine a numpy call costs
    tens of microseconds cache-cold, and the plan reads theta only every few steps."""

    def __init__(self, decay: float = 0.995, ridge: float = 0.1):
        self.decay = decay
        self.ridge = ridge
        self.xtx = np.zeros((4, 4))
        self.xty = np.zeros(4)
        self.count = 0  # observations, held ones included
        self._theta = np.zeros(4)
        self._pending: list[tuple[float, float, float, float, float]] = []  # (1, requests, passes, drafted, seconds)
        self.prior: np.ndarray | None = None
        self.frozen = False  # pinned constants (set_speculation's "cost"): observations ignored

    @staticmethod
    def features(requests: int, passes: int, drafted: int) -> np.ndarray:
        return np.array([1.0, float(requests), float(passes), float(drafted)])

    def observe(self, requests: int, passes: int, drafted: int, seconds: float) -> None:
        if self.frozen:  # pinned constants: the count stays, so no start-up fit replaces them
            return
        self._pending.append((1.0, float(requests), float(passes), float(drafted), float(seconds)))
        self.count += 1
        if len(self._pending) >= 64:  # bounded where theta is not read (every arm measured)
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        rows = np.array(self._pending)  # [n, 5]
        self._pending = []
        x, y = rows[:, :4], rows[:, 4]
        weights = self.decay ** np.arange(len(rows) - 1, -1, -1.0)  # the newest observation weighs 1
        scale = self.decay ** len(rows)
        self.xtx = scale * self.xtx + (x.T * weights) @ x
        self.xty = scale * self.xty + (x.T * weights) @ y
        self._solve()

    @property
    def theta(self) -> np.ndarray:
        """[4] the fitted constants (seconds), every observation so far folded in."""
        self._fold()
        return self._theta

    @theta.setter
    def theta(self, value: np.ndarray) -> None:
        self._pending = []
        self._theta = np.asarray(value, dtype=np.float64)

    def _solve(self) -> None:
        scale = np.sqrt(np.maximum(np.diag(self.xtx), 1e-12))  # ridge in standardized units
        prior = self.prior if self.prior is not None else np.zeros(4)
        reg = self.ridge * np.diag(scale**2) * (1e-3 if self.prior is None else 1.0)
        try:
            self._theta = np.linalg.solve(self.xtx + reg, self.xty + reg @ prior)
        except np.linalg.LinAlgError:
            pass

    def freeze_prior(self) -> None:
        """The start-up fit becomes the prior that later fits are pulled toward."""
        self._fold()
        self._solve()
        self.prior = self._theta.copy()

    def predict(self, requests: int, passes: int, drafted: int) -> float:
        theta = self.theta
        return float(theta[0] + theta[1] * requests + theta[2] * passes + theta[3] * drafted)

    def constants(self) -> dict[str, float]:
        return dict(zip(FEATURES, map(float, self.theta)))


class ArmSeconds:
    """Measured seconds of a step by its cap k ("arm"), per batch size and sampling mode
    (all-greedy steps run the argmax verifier and no sampling, so they cost less than sampled
    ones and are kept apart). Only steps that drafted exactly k for every request count, and an
    arm's first step is left out (it runs cold: new GEMM shapes for oneDNN, caches).

    Two estimates are kept, and ``mean(..., paired=...)`` reads either:

    - **paired** (the default): log seconds = level + offset[k]. The level follows the planned
      steps (weight ``level_weight`` each), so it tracks the machine's drift where the policy
      runs; an arm's offset is the median of its last ``window`` *explored* steps, each taken
      relative to the level at that moment. An arm the plan does not choose is therefore
      compared with the chosen one as it runs now, not as it ran when the arm was last seen: a
      shared machine that slows every step by 30 % moves every arm by 30 %, and a cold start-up
      measurement is flushed after ``window`` explorations. The median keeps one preempted step
      from condemning an arm.
    - **absolute** (before 2026-12-04): an exponentially weighted mean of each arm's own steps
      (weight ``decay`` per observation of that arm). Unchosen arms are re-measured only when
      explored and kept stale means: an MLP engine planned k = 4 on every step with its k = 5 arm
      at 8.30 ms against 6.45 ms measured for fixed K = 5."""

    def __init__(self, max_k: int, decay: float = 0.98, min_weight: float = 2.5, level_weight: float = 0.1,
                 window: int = 5, min_samples: int = 2):
        self.max_k = max_k
        self.decay, self.min_weight = decay, min_weight
        self.level_weight, self.window, self.min_samples = level_weight, window, min_samples
        # plain lists, not numpy: this runs every engine step, where a numpy call costs ~10x a list's
        self.sums: dict[tuple[int, bool], list[float]] = {}  # (batch, greedy) -> [K+1] weighted seconds
        self.weights: dict[tuple[int, bool], list[float]] = {}  # (batch, greedy) -> [K+1] weights
        self.seen: dict[tuple[int, bool], list[bool]] = {}  # (batch, greedy) -> [K+1] whether the arm ran once
        self.level: dict[tuple[int, bool], float] = {}  # (batch, greedy) -> log seconds of the planned arm's offset 0
        self.samples: dict[tuple[int, bool], list[list[float]]] = {}  # (batch, greedy) -> per arm, last log(s) - level
        self.offsets: dict[tuple[int, bool], list[float | None]] = {}  # (batch, greedy) -> per arm, median of samples

    def observe(self, batch: int, k: int, seconds: float, greedy: bool = False, explore: bool = False) -> None:
        """One step of this batch size and mode that drafted k per request (``explore``: the
        policy chose k to measure it, not as its plan)."""
        key = (batch, bool(greedy))
        seen = self.seen.setdefault(key, [False] * (self.max_k + 1))
        if not seen[k]:
            seen[k] = True
            return
        sums = self.sums.setdefault(key, [0.0] * (self.max_k + 1))
        weights = self.weights.setdefault(key, [0.0] * (self.max_k + 1))
        sums[k] = self.decay * sums[k] + seconds
        weights[k] = self.decay * weights[k] + 1.0
        x = math.log(max(seconds, 1e-9))
        level = self.level.setdefault(key, x)
        samples = self.samples.setdefault(key, [[] for _ in range(self.max_k + 1)])[k]
        offsets = self.offsets.setdefault(key, [None] * (self.max_k + 1))
        if explore or offsets[k] is None:  # a paired measurement of this arm against the level
            samples.append(x - level)
            del samples[: -self.window]
            if len(samples) >= self.min_samples:
                offsets[k] = _median(samples)
        else:  # a planned step: the level follows it
            self.level[key] = level + self.level_weight * (x - level - offsets[k])

    def mean(self, batch: int, k: int, greedy: bool = False, paired: bool = True) -> float | None:
        """The arm's seconds now (None until measured enough)."""
        key = (batch, bool(greedy))
        if paired:
            offsets = self.offsets.get(key)
            offset = None if offsets is None else offsets[k]
            return None if offset is None else math.exp(self.level[key] + offset)
        weights = self.weights.get(key)
        return None if weights is None or weights[k] < self.min_weight else self.sums[key][k] / weights[k]

    def table(self, paired: bool = True) -> dict[str, list[float | None]]:
        """Every measured (batch, mode): its arms' seconds (None: not yet measured), keyed
        ``"BATCH:greedy"`` / ``"BATCH:sampled"``."""
        return {f"{batch}:{'greedy' if greedy else 'sampled'}": [self.mean(batch, k, greedy, paired) for k in range(self.max_k + 1)]
                for batch, greedy in sorted(self.seen)}


def _median(values: list[float]) -> float:
    """The median of a few floats (numpy's costs ~10 us a call, this ~1)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def batch_bucket(batch: int) -> int:
    """The cost model a batch of this size uses: 1, 2, 4, 8, ... (sizes 5-8 share bucket 8). A
    step's cost is not linear in the batch size (at 1 request a drafted token rides on a forward
    that reads the weights anyway; at 8 the verified tokens start to cost compute), so each
    bucket fits its own model."""
    return 1 << max(batch - 1, 0).bit_length()


def passes_for(kind: str, k: int) -> int:
    """Draft forward passes a drafter runs to draft k tokens per request.

    EAGLE / draft model run one pass even at k = 0 (their KV cache must follow the target's);
    MEDUSA drafts every head in one pass; the MLP speculator runs one stage per token."""
    if kind == "parallel":
        return int(k > 0)
    if kind == "kv":
        return max(k, 1)
    return k

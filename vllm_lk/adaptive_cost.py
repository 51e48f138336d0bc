"""The cost side of adaptive speculation (no vLLM imports): seconds of an engine step, measured
per cap k ("arm") and modelled linearly where an arm is not yet seen; vllm_lk.adaptive plans
with them."""

from __future__ import annotations

import numpy as np

FEATURES = ("step", "per_request", "per_draft_pass", "per_drafted_token")


class CostModel:
    """Seconds of one engine step ~ theta . (1, requests, draft passes, drafted tokens).

    Exponentially weighted least squares (weight ``decay`` per observation) with a ridge of
    strength ``ridge`` toward ``prior`` (the start-up fit), solved on every update (4 x 4). The
    ridge is a tenth of the data's weight: the start-up steps run cold (each new query length is a
    new GEMM shape for oneDNN), and at ridge 1 their fit held half the weight forever (an
    EAGLE-3 engine's model put a K = 4 step at 13 ms against 9.6 ms measured)."""

    def __init__(self, decay: float = 0.995, ridge: float = 0.1):
        self.decay = decay
        self.ridge = ridge
        self.xtx = np.zeros((4, 4))
        self.xty = np.zeros(4)
        self.count = 0
        self.theta = np.zeros(4)
        self.prior: np.ndarray | None = None
        self.frozen = False  # pinned constants (set_speculation's "cost"): observations ignored

    @staticmethod
    def features(requests: int, passes: int, drafted: int) -> np.ndarray:
        return np.array([1.0, float(requests), float(passes), float(drafted)])

    def observe(self, requests: int, passes: int, drafted: int, seconds: float) -> None:
        if self.frozen:  # pinned constants: the count stays, so no start-up fit replaces them
            return
        x = self.features(requests, passes, drafted)
        self.xtx = self.decay * self.xtx + np.outer(x, x)
        self.xty = self.decay * self.xty + x * seconds
        self.count += 1
        if self.count <= 64 or self.count % 8 == 0:  # later fits move slowly: solved every 8th step
            self._solve()

    def _solve(self) -> None:
        scale = np.sqrt(np.maximum(np.diag(self.xtx), 1e-12))  # ridge in standardized units
        prior = self.prior if self.prior is not None else np.zeros(4)
        reg = self.ridge * np.diag(scale**2) * (1e-3 if self.prior is None else 1.0)
        try:
            self.theta = np.linalg.solve(self.xtx + reg, self.xty + reg @ prior)
        except np.linalg.LinAlgError:
            pass

    def freeze_prior(self) -> None:
        """The start-up fit becomes the prior that later fits are pulled toward."""
        self._solve()
        self.prior = self.theta.copy()

    def predict(self, requests: int, passes: int, drafted: int) -> float:
        return float(self.features(requests, passes, drafted) @ self.theta)

    def constants(self) -> dict[str, float]:
        return dict(zip(FEATURES, map(float, self.theta)))


class ArmSeconds:
    """Measured seconds of a step by its cap k, per batch size and sampling mode (all-greedy
    steps run the argmax verifier and no sampling, so they cost less than sampled ones and are
    kept apart): an exponentially weighted mean over the steps that drafted exactly k for every
    request (weight ``decay`` per observation of that arm). Where an arm has been seen, the plan
    uses its mean rather than the linear model's extrapolation: the linear model is only as good
    as its four features, these means are what such a step cost."""

    def __init__(self, max_k: int, decay: float = 0.98, min_weight: float = 2.5):
        self.decay = decay
        self.min_weight = min_weight
        self.sums: dict[tuple[int, bool], np.ndarray] = {}  # (batch, greedy) -> [K+1] weighted seconds
        self.weights: dict[tuple[int, bool], np.ndarray] = {}  # (batch, greedy) -> [K+1] weights
        self.seen: dict[tuple[int, bool], np.ndarray] = {}  # (batch, greedy) -> [K+1] whether the arm ran once (its first step is not counted)
        self.max_k = max_k

    def observe(self, batch: int, k: int, seconds: float, greedy: bool = False) -> None:
        """One step of this batch size and mode that drafted k per request. An arm's first step
        is left out: it runs cold (new GEMM shapes for oneDNN, caches)."""
        key = (batch, bool(greedy))
        seen = self.seen.setdefault(key, np.zeros(self.max_k + 1, dtype=bool))
        if not seen[k]:
            seen[k] = True
            return
        sums = self.sums.setdefault(key, np.zeros(self.max_k + 1))
        weights = self.weights.setdefault(key, np.zeros(self.max_k + 1))
        sums[k] = self.decay * sums[k] + seconds
        weights[k] = self.decay * weights[k] + 1.0

    def mean(self, batch: int, k: int, greedy: bool = False) -> float | None:
        """The arm's mean seconds, or None until it has weight ``min_weight``."""
        key = (batch, bool(greedy))
        weights = self.weights.get(key)
        if weights is None or weights[k] < self.min_weight:
            return None
        return float(self.sums[key][k] / weights[k])

    def table(self) -> dict[str, list[float | None]]:
        """Every measured (batch, mode): its arms' mean seconds (None: not yet measured), keyed
        ``"BATCH:greedy"`` / ``"BATCH:sampled"``."""
        return {f"{batch}:{'greedy' if greedy else 'sampled'}": [self.mean(batch, k, greedy) for k in range(self.max_k + 1)]
                for batch, greedy in sorted(self.weights)}


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

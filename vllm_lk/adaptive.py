"""Adaptive speculation: how many tokens to draft and verify at each step (no vLLM imports).

Each step the engine may draft up to K tokens per request. Drafting and verifying cost time; a
draft only pays when it is likely to survive. This module decides, from three live estimates:

- **acceptance**: P(draft i accepted | drafts before it accepted) as a function of the draft's own
  confidence at that position, ``c = max_v q_i(v)`` (bucketed counts shared by all requests: the
  global prior), times a per-request factor (its own accepted / predicted, shrunk toward 1);
- **cost**: seconds of one engine step at each cap k, measured (an exponentially weighted mean
  over the steps of this batch size that drafted exactly k per request); where an arm has not
  been seen, a linear function of (1, requests, draft forward passes, drafted tokens), fitted by
  exponentially weighted least squares over the steps served, with a light ridge toward the
  start-up fit (the first steps cycle K through 0..K to measure it);
- **rate**: the plan that maximises expected tokens per second for the batch.

At the start of a step :meth:`Policy.plan` picks the cap k* (0 = do not speculate this step) and
the draft loop stops after k* passes. With ``trim`` (off by default) two more rules read each
pass's confidence: :meth:`Policy.add_pass` stops the draft loop once another pass would cost more
than it is expected to return, and :meth:`Policy.lengths` gives each request its number of drafts
to verify (those whose survival probability still pays for their verification).

Exactness: the decision to verify draft i of a request uses only draft-side information that does
not depend on draft i's sampled value — confidences ``max q_j`` for j <= i (each a function of the
drafts before j), earlier steps' outcomes and measured times — never the target's probabilities
and never the sampled token x_i itself. Conditioning the verification of x_i on x_i would change
its law away from q_i (tests/unit/test_adaptive.py enumerates both rules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vllm_lk.adaptive_acceptance import NUM_BUCKETS, AcceptanceModel, buckets  # noqa: F401 (re-exported)
from vllm_lk.adaptive_cost import FEATURES, ArmSeconds, CostModel, batch_bucket, passes_for  # noqa: F401 (re-exported)


@dataclass
class Plan:
    """The decision for one step: cap k (0: no drafts), and the rate it is expected to reach."""

    k: int
    rate: float  # expected tokens / s of this plan
    baseline_rate: float  # expected tokens / s without speculation
    explore: bool = False
    random_lengths: bool = False  # exploring: each request verifies a random prefix (drafted tokens vary apart from passes)
    greedy: bool = False  # every request at temperature 0: the step is timed and costed apart from sampled ones


SETTINGS = ("warmup_steps", "explore_every", "trim", "explore_all", "measured_arms", "paired_arms", "refresh_every",
            "request_factors", "switch_margin")  # Policy fields set at runtime


@dataclass
class Policy:
    """Chooses drafts per step; one per model runner (engine core process)."""

    max_k: int
    kind: str = "sequential"  # "kv" (EAGLE, draft model), "parallel" (MEDUSA), "sequential" (MLP)
    warmup_steps: int = 24  # per batch bucket, the start-up measurement: K cycles through 0..max_k (random lengths with trim)
    explore_every: int = 16  # afterwards one step in this many explores (random lengths only with trim)
    trim: bool = False  # per-step early stop and per-request lengths from confidence (False: the cap k* only)
    explore_all: bool = False  # exploration cycles K through 0..max_k; False: k* - 1 and k* + 1 in turn, every 4th the cycle
    measured_arms: bool = True  # plan with each cap's measured step seconds where seen (False: the linear model only)
    paired_arms: bool = True  # arms' seconds relative to the planned arm as it runs now (False: each arm's own EW mean)
    refresh_every: int = 8  # a batch's plan is recomputed every this many steps (verifications are folded in then)
    request_factors: bool = True  # scale each request's survival by its own accepted / predicted (False: the global model)
    # a plan leaves the cap it last chose for this batch size and mode only for an expected rate
    # this much higher (0: plain argmax). Arm seconds are medians of a few noisy steps; an argmax
    # over near-ties follows whichever arm was last measured low (2026-12-07, MLP, T = 0, one
    # request: k = 4 on 5-38 % of steps in three in-process cells, where fixed K = 5 ran 0-21 % faster than K = 4)
    switch_margin: float = 0.03
    arms: ArmSeconds = field(init=False)  # measured seconds of a step by its cap, per batch size
    costs: dict[tuple[int, bool], CostModel] = field(default_factory=dict)  # (batch bucket, all greedy) -> its cost model
    pinned: np.ndarray | None = None  # cost constants set by the operator (no online fit)
    steps: int = 0  # cost observations so far
    plans: int = 0
    explorations: int = 0
    skipped: int = 0  # steps planned with k = 0
    chosen: np.ndarray = field(init=False)  # [K+1] steps planned (not exploring) at each cap k
    estimated_speedup: float | None = None  # EW mean of measured tokens/s over the cost model's no-draft rate
    speedup_weight: float = 0.02  # its weight per step (about the last 50 steps)
    last_plan: Plan | None = None
    planned_k: int | None = None  # the last cap chosen by the plan (not exploring): exploration's centre
    greedy: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # this step's [B] flags
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))  # exploration only

    def __post_init__(self) -> None:
        self._acceptance = AcceptanceModel(self.max_k)
        self._pending: list[tuple] = []  # verifications not yet folded into the acceptance model
        self._decays = 0  # steps whose decay of the acceptance counts is not yet applied
        self._held: tuple | None = None  # (batch key, plan number, Plan) of the last computed plan
        self.arms = ArmSeconds(self.max_k)
        self.chosen = np.zeros(self.max_k + 1, dtype=np.int64)
        self._cost: CostModel | None = None
        self._incumbent: dict[tuple[int, bool], int] = {}  # (batch, all greedy) -> the cap its last plan chose

    def cost_for(self, batch: int, greedy: bool = False) -> CostModel:
        """The cost model of a batch of this size (its bucket) and mode: an all-greedy step runs
        the argmax verifier and no sampling, so it is modelled apart from a sampled one (a model
        shared by both mixed T = 0 and T = 1 steps and, with arms measured at different times,
        compared a T = 0 arm with a T = 1 one)."""
        key = (batch_bucket(batch), bool(greedy))
        model = self.costs.get(key)
        if model is None:
            model = self.costs[key] = CostModel()
            if self.pinned is not None:
                model.theta, model.frozen = self.pinned.copy(), True
        return model

    @property
    def cost(self) -> CostModel:
        """The cost model of this step's batch (of a single request before the first plan)."""
        return self._cost if self._cost is not None else self.cost_for(1)

    def cost_constants(self) -> dict[str, dict[str, float]]:
        """Each cost model's current constants (seconds), keyed ``"BUCKET:greedy"`` or
        ``"BUCKET:sampled"``."""
        return {f"{bucket}:{'greedy' if greedy else 'sampled'}": model.constants()
                for (bucket, greedy), model in sorted(self.costs.items())}

    def pin_cost(self, theta) -> None:
        """Fixed cost constants (seconds: step, per request, per draft pass, per drafted token)
        for every batch size; observations no longer change them."""
        self.pinned = np.asarray(theta, dtype=np.float64)
        for model in self.costs.values():
            model.theta, model.frozen = self.pinned.copy(), True

    # -- the plan at the start of a step ------------------------------------------------------
    def plan(self, req_ids: list[str], greedy: np.ndarray | None = None) -> Plan:
        """This step's cap k* for the batch (``greedy``: [B] temperature-0 flags)."""
        batch = len(req_ids)
        self.plans += 1
        self.greedy = np.zeros(batch, dtype=bool) if greedy is None else np.asarray(greedy, dtype=bool)
        self._start_step(req_ids)
        greedy_step = bool(batch and self.greedy.all())
        self._cost = self.cost_for(batch, greedy_step)
        warming = not self._cost.frozen and self._cost.count < self.warmup_steps
        if warming:  # the start-up measurement: every K in turn
            self.explorations += 1
            plan = Plan(self.explorations % (self.max_k + 1), math.nan, math.nan, explore=True, random_lengths=self.trim,
                        greedy=greedy_step)
        elif self.plans % self.explore_every == 0:  # afterwards a neighbour of the last choice
            self.explorations += 1
            k = self._explored_k()
            # the cap alone (trim off) explores whole arms, whose measured seconds the plan reads;
            # with trim random lengths let the linear model tell draft passes from drafted tokens
            plan = Plan(k, math.nan, math.nan, explore=True, random_lengths=self.trim, greedy=greedy_step)
        else:
            key = (tuple(req_ids), greedy_step)
            held = self._held
            if held is not None and held[0] == key and self.plans - held[1] < self.refresh_every:
                plan = held[2]  # the same batch planned less than refresh_every steps ago
            else:
                plan = self._compute_plan(req_ids, greedy_step)
                self._held = (key, self.plans, plan)
            self.chosen[plan.k] += 1
            self.planned_k = plan.k
        self.skipped += plan.k == 0
        self.last_plan = plan
        return plan

    def _compute_plan(self, req_ids: list[str], greedy_step: bool) -> Plan:
        """The cap maximising expected tokens per second, from the acceptance model (every held
        verification folded in) and the arms' seconds."""
        self.flush()
        self._refresh_rates(req_ids)
        batch = len(req_ids)
        survival = np.minimum(1.0, np.cumprod(self._position_rates[self._mode, :], axis=1) * self._factors[:, None])  # [B, K]
        expected = batch + np.concatenate([[0.0], np.cumsum(survival.sum(axis=0))])  # [K+1]
        seconds = np.array([self.arm_seconds(batch, k, greedy_step) for k in range(self.max_k + 1)])
        rates = expected / seconds
        k = int(np.argmax(rates))
        incumbent = self._incumbent.get((batch, greedy_step))
        if incumbent is not None and rates[k] < rates[incumbent] * (1 + self.switch_margin):
            k = incumbent  # not clearly better: stay
        self._incumbent[(batch, greedy_step)] = k
        return Plan(k, float(rates[k]), float(batch / seconds[0]), greedy=greedy_step)

    def _explored_k(self) -> int:
        """The cap an exploring step measures: with ``explore_all`` every K in turn, as in warm-up;
        otherwise the last plan's neighbours k* - 1 and k* + 1 in turn (the arms the plan would
        move to, kept fresh), and every 4th exploration the next K of the cycle (far arms)."""
        cycle = self.explorations % (self.max_k + 1)
        if self.explore_all or self.explorations % 4 == 0:
            return cycle
        last = self.planned_k if self.planned_k is not None else self.max_k
        step = 1 if self.explorations % 2 else -1
        if not 0 <= last + step <= self.max_k:
            step = -step
        return int(np.clip(last + step, 0, self.max_k))

    def _refresh_rates(self, req_ids: list[str]) -> None:
        """The acceptance estimates a plan (and, with trim, its passes) read for this batch."""
        self._factors = (np.array([self._acceptance.request_factor(r) for r in req_ids]) if self.request_factors
                         else np.ones(len(req_ids)))
        self._mode = self.greedy.astype(np.int64)
        self._bucket_rates = self._acceptance.bucket_rates()
        self._position_rates = self._acceptance.position_rates()

    def _start_step(self, req_ids: list[str]) -> None:
        """A step's drafting record, emptied."""
        self._survival: list[np.ndarray | None] = []  # per pass: [B] P(drafts 1..j all accepted); None: not read
        self._raw: list[np.ndarray | None] = []  # the same before the request factors
        self._confidence: list[np.ndarray] = []  # per pass: [B]
        self._unknown = np.full(len(req_ids), np.nan)  # a pass's confidences when not read

    def step_seconds(self, batch: int, k: int, drafted: int, greedy: bool = False) -> float:
        """The linear model's seconds of a step (k passes' worth of drafting, ``drafted`` tokens)."""
        return max(self.cost_for(batch, greedy).predict(batch, passes_for(self.kind, k), drafted), 1e-9)

    def arm_seconds(self, batch: int, k: int, greedy: bool = False) -> float:
        """Seconds of a step at cap k with every request drafting k: measured (pinned constants:
        the model's)."""
        measured = (None if self.pinned is not None or not self.measured_arms
                    else self.arms.mean(batch, k, greedy, self.paired_arms))
        return measured if measured is not None else self.step_seconds(batch, k, batch * k, greedy)

    # -- while drafting -----------------------------------------------------------------------
    def needs_confidence(self) -> bool:
        """Whether this step's passes must report their confidences: only the trimming rules read
        them (an exploring step's lengths are random; the cap alone counts passes), and reading
        one costs a softmax and a device-to-host copy per pass."""
        return self.trim and self.last_plan is not None and not self.last_plan.explore

    def add_pass(self, confidence: np.ndarray | None, decide: bool = True) -> bool:
        """After draft pass j: its [B] confidences (None: not read, see needs_confidence);
        whether pass j + 1 pays (``decide=False``: record only, for heads computed in one pass)."""
        if confidence is None:  # nothing to estimate from: the pass is counted (survival unknown)
            self._survival.append(None)
            self._raw.append(None)
            self._confidence.append(self._unknown)
        else:
            conf = np.asarray(confidence, dtype=np.float64)
            rate = self._bucket_rates[self._mode, buckets(conf)]
            previous = self._raw[-1] if self._raw and self._raw[-1] is not None else 1.0
            self._raw.append(previous * rate)
            self._survival.append(np.minimum(1.0, self._raw[-1] * self._factors))
            self._confidence.append(conf)
        if not decide:
            return True
        plan, j = self.last_plan, len(self._survival)
        if plan is None or j >= plan.k:
            return False
        if plan.explore or not self.trim:
            return True
        next_rate = self._position_rates[self._mode, j]
        gain = np.minimum(1.0, self._raw[-1] * next_rate * self._factors)  # expected survivors of pass j + 1
        per_token, per_pass = self.cost.theta[3], self.cost.theta[2]
        active = gain >= plan.rate * per_token
        if not active.any():
            return False
        return float(gain[active].sum()) >= plan.rate * (per_pass + per_token * int(active.sum()))

    def lengths(self) -> np.ndarray:
        """[B] drafts to verify per request: the prefix of its drafts whose survival probability
        still pays for its verification (this step's passes)."""
        plan, width = self.last_plan, len(self._survival)
        batch = len(self._unknown)
        if plan is None or width == 0:
            return np.full(batch, width, dtype=np.int64)
        if plan.random_lengths:  # draft-side randomness: drafted tokens vary apart from passes
            return self.rng.integers(0, width + 1, size=batch)
        if not self.trim:
            return np.full(batch, width, dtype=np.int64)
        if any(s is None for s in self._survival):  # confidences not read (an exploring step): every draft
            return np.full(batch, width, dtype=np.int64)
        survival = np.stack(self._survival, axis=1)  # [B, k], non-increasing
        pays = survival >= plan.rate * max(self.cost.theta[3], 0.0)
        return np.cumprod(pays, axis=1).sum(axis=1).astype(np.int64)

    def passes(self) -> int:
        """Draft passes recorded this step."""
        return len(self._survival)

    def confidence_read(self) -> bool:
        """Whether any pass of this step recorded its confidences."""
        return any(s is not None for s in self._survival)

    def confidences(self) -> np.ndarray:
        """[B, passes] this step's recorded confidences."""
        return np.stack(self._confidence, axis=1) if self._confidence else np.zeros((len(self._unknown), 0))

    def lengths_for(self, req_ids: list[str], confidence: np.ndarray) -> np.ndarray:
        """lengths() for [B, k] confidences given at once (the step's passes replayed)."""
        self.flush()
        self._refresh_rates(req_ids)
        self._start_step(req_ids)
        for column in confidence.T:
            self.add_pass(column, decide=False)
        return self.lengths()

    # -- after a step -------------------------------------------------------------------------
    def observe_step(self, requests: int, passes: int, drafted: int, seconds: float, tokens: int | None = None,
                     k: int | None = None, greedy: bool = False, explore: bool = False) -> None:
        """One steady step: its batch, draft passes, drafted tokens, measured seconds and the
        tokens it emitted (for the live speedup estimate); ``k``: the cap, when every request
        drafted exactly k (the step then counts for that arm's measured seconds); ``greedy``:
        the step's plan was all-greedy; ``explore``: its cap was chosen to measure that arm."""
        model = self.cost_for(requests, greedy)
        model.observe(requests, passes, drafted, seconds)
        if k is not None and drafted == requests * k and passes == passes_for(self.kind, k):
            self.arms.observe(requests, k, seconds, greedy, explore)
        self.steps += 1
        self._decays += 1
        if model.count == self.warmup_steps and not model.frozen:
            model.freeze_prior()
        none_seconds = self.arm_seconds(requests, 0, greedy)
        if tokens and seconds > 0 and none_seconds > 0 and (model.frozen or model.count >= self.warmup_steps):
            ratio = (tokens / seconds) / (requests / none_seconds)
            previous = self.estimated_speedup
            self.estimated_speedup = ratio if previous is None else previous + self.speedup_weight * (ratio - previous)

    def observe_verification(self, req_id: str, confidence: np.ndarray, num_accepted: int, greedy: bool = False) -> None:
        conf = np.asarray(confidence, dtype=np.float64)[None, :]
        self.observe_verifications([req_id], conf, np.array([conf.shape[1]]), np.array([num_accepted]), np.array([greedy]))

    def observe_verifications(self, req_ids: list[str], confidence: np.ndarray, counts: np.ndarray,
                              num_accepted: np.ndarray, greedy: np.ndarray) -> None:
        """A step's verifications ([B, W] confidences, [B] drafts verified, accepted, greedy): held
        and folded into the acceptance model when the next plan is computed (one numpy pass for
        several steps; a plan only reads the model every ``refresh_every`` steps)."""
        self._pending.append((list(req_ids), np.asarray(confidence, dtype=np.float64), np.asarray(counts),
                              np.asarray(num_accepted), np.asarray(greedy, dtype=bool)))
        if len(self._pending) >= 4 * max(self.refresh_every, 1):  # bounded when plans stop (a fixed-K switch)
            self.flush()

    def flush(self) -> None:
        """Fold the held verifications into the acceptance model."""
        pending, self._pending = self._pending, []
        if self._decays:  # each step's decay, applied at once before the held steps' counts
            self._acceptance.step_decay(self._decays)
            self._decays = 0
        if len(pending) == 1:
            self._acceptance.observe_batch(*pending[0])
        elif pending:
            width = max(item[1].shape[1] for item in pending)
            conf = np.full((sum(len(item[0]) for item in pending), width), np.nan)
            row = 0
            for item in pending:
                conf[row : row + len(item[0]), : item[1].shape[1]] = item[1]
                row += len(item[0])
            self._acceptance.observe_batch([r for item in pending for r in item[0]], conf,
                                           *(np.concatenate([item[i] for item in pending]) for i in (2, 3, 4)))

    def forget_requests(self, live: list[str]) -> None:
        """Drop the per-request factors of requests no longer in the batch, once they pile up
        (held verifications keep theirs until folded in)."""
        if len(self._acceptance.requests) > 4 * max(len(live), 1) + 64:
            self.flush()
            self._acceptance.forget(set(live))

    @property
    def acceptance(self) -> AcceptanceModel:
        """The acceptance model with every verification so far folded in."""
        self.flush()
        return self._acceptance

    @acceptance.setter
    def acceptance(self, model: AcceptanceModel) -> None:  # a fresh model (new drafter weights): held outcomes dropped
        self._pending, self._held, self._acceptance = [], None, model

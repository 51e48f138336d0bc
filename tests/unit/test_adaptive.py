"""vllm_lk.adaptive: the stopping rule keeps speculative sampling exact, and its estimates learn.

Exactness by enumeration (float64, 1e-9): one speculative step where the number of drafts to
verify is chosen by the live policy from the drafts' confidences (max_v q_i(v), a function of
the drafts before i), then target sampling to K+1 tokens, gives exactly the target's joint law.
A rule that looks at the sampled draft itself (verify x_i only if q_i(x_i) is high) does not:
the enumeration must tell the two apart, or it proves nothing.
"""

import numpy as np
import pytest
import torch

from tests.unit.test_sampling import TRANSFORMS, PrefixModel, completer, target_joint, transformed
from vllm_lk import adaptive, sampling


@pytest.fixture(autouse=True)
def float64_by_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def adaptive_step_distribution(target, draft, vocab, k_max, transform, keep):
    """P(first K+1 tokens) when draft i (drawn from q_i) is verified only if
    ``keep(drafts_before_i, confidences_1..i, x_i)``; otherwise it is discarded and the step
    ends with a token from p (the target's sample at that position)."""
    out = {}
    complete = completer(out, target, transform, k_max + 1)

    def step(prefix, prob, confidences):
        p = transformed(target, prefix, transform)
        if len(prefix) == k_max:
            complete(prefix, prob)
            return
        q = transformed(draft, prefix, transform)
        conf = confidences + [float(q.max())]
        residual = sampling.residual_probs(p, q)
        for x in range(vocab):
            mass = prob * float(q[x])
            if mass == 0.0:
                continue
            if not keep(prefix, conf, x):  # drafted, not verified: the step's token comes from p
                complete(prefix, mass)
                continue
            accept = min(1.0, float(p[x]) / float(q[x]))
            step(prefix + [x], mass * accept, conf)
            for v in range(vocab):
                complete(prefix + [v], mass * (1 - accept) * float(residual[v]))

    step([], 1.0, [])
    return out


def trained_policy(k_max: int, rate: float) -> adaptive.Policy:
    """A policy whose acceptance estimate rises steeply with confidence (as drafts' do)."""
    policy = adaptive.Policy(max_k=k_max, trim=True)
    rng = np.random.default_rng(0)
    for _ in range(400):
        conf = rng.uniform(0, 1, size=k_max)
        accepted = 0
        while accepted < k_max and rng.uniform() < conf[accepted] ** 2:
            accepted += 1
        policy.observe_verification("warm", conf, accepted)
    for k in range(40):
        policy.observe_step(1, k % (k_max + 1), k % (k_max + 1), 0.004 + 0.001 * (k % (k_max + 1)))
    policy.last_plan = adaptive.Plan(k=k_max, rate=rate, baseline_rate=rate)
    policy.greedy = np.zeros(1, dtype=bool)
    return policy


@pytest.mark.parametrize("transform", TRANSFORMS[:5])
@pytest.mark.parametrize("vocab,k_max", [(4, 2), (3, 3)])
def test_policy_lengths_keep_the_output_exact(vocab, k_max, transform):
    target = PrefixModel(vocab, seed=11, spread=1.5)
    draft = PrefixModel(vocab, seed=12, spread=2.0)
    policy = trained_policy(k_max, rate=1.0)
    # set the rate so that the first draft at the root just pays: later drafts then pay or not
    # depending on the confidences that earlier drafts lead to
    root = float(transformed(draft, [], transform).max())
    first = min(1.0, float(policy.acceptance.bucket_rates()[0, adaptive.buckets(np.array([root]))[0]]))
    assert policy.lengths_for(["r"], np.array([[root]]))[0] == 1  # the replay gives the same survival
    policy.last_plan.rate = 0.95 * first / policy.cost.theta[3]
    decisions = []

    def keep(prefix, confidences, x):
        length = int(policy.lengths_for(["r"], np.array([confidences]))[0])
        decisions.append(length >= len(confidences))
        return decisions[-1]

    got = adaptive_step_distribution(target, draft, vocab, k_max, transform, keep)
    want = target_joint(target, vocab, k_max + 1, transform)
    assert any(decisions) and not all(decisions), "the rule must both keep and drop drafts here"
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) < 1e-9


def test_a_rule_that_reads_the_sampled_draft_is_not_exact():
    vocab, k_max, transform = 4, 2, (1.0, None, None)
    target = PrefixModel(vocab, seed=11, spread=1.5)
    draft = PrefixModel(vocab, seed=12, spread=2.0)

    def keep_if_likely(prefix, confidences, x):
        return float(transformed(draft, prefix, transform)[x]) > 0.3

    got = adaptive_step_distribution(target, draft, vocab, k_max, transform, keep_if_likely)
    want = target_joint(target, vocab, k_max + 1, transform)
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) > 1e-3


def test_acceptance_model_learns_confidence_and_request_factors():
    model = adaptive.AcceptanceModel(num_positions=3)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        conf = rng.uniform(0, 1, size=3)
        accepted = 0
        while accepted < 3 and rng.uniform() < conf[accepted]:
            accepted += 1
        model.observe("easy" if rng.uniform() < 0.5 else "other", conf, accepted)
    rates = model.bucket_rates()[0]
    # P(accept | confidence c) = c here: each bucket's rate is near its centre
    centres = (np.arange(adaptive.NUM_BUCKETS) + 0.5) / adaptive.NUM_BUCKETS
    assert np.abs(rates - centres).max() < 0.08
    assert abs(model.request_factor("easy") - 1.0) < 0.1  # calibrated: no per-request correction
    model.observe("lucky", np.array([0.05, 0.05, 0.05]), 3)
    assert model.request_factor("lucky") > 1.2
    model.forget({"easy"})
    assert set(model.requests) == {"easy"}


def test_a_batch_of_verifications_counts_as_the_same_verifications_one_by_one():
    """observe_batch (the engine's path) == observe per request, in the bucket and position
    counts and each request's accepted count (rows of different widths, greedy and sampled, a
    row with nothing verified). Its predicted count uses the rates from before the step, where
    one by one each request sees the ones before it counted: equal within 2 %."""
    rng = np.random.default_rng(2)
    one, batch = adaptive.AcceptanceModel(num_positions=4), adaptive.AcceptanceModel(num_positions=4)
    for _step in range(50):
        req_ids = [f"r{i}" for i in range(5)]
        counts = rng.integers(0, 5, size=5)
        accepted = np.array([rng.integers(0, c + 1) for c in counts])
        greedy = rng.uniform(size=5) < 0.4
        conf = np.where(np.arange(4)[None, :] < counts[:, None], rng.uniform(size=(5, 4)), np.nan)
        for row in range(5):
            if counts[row]:
                one.observe(req_ids[row], conf[row, : counts[row]], int(accepted[row]), bool(greedy[row]))
        batch.observe_batch(req_ids, conf, counts, accepted, greedy)
    for name in ("tried", "accepted", "pos_tried", "pos_accepted"):
        np.testing.assert_allclose(getattr(batch, name), getattr(one, name), atol=1e-12)
    assert batch.requests.keys() == one.requests.keys()
    for req_id in one.requests:
        assert batch.requests[req_id][0] == one.requests[req_id][0]
        assert batch.requests[req_id][1] == pytest.approx(one.requests[req_id][1], rel=0.02)


def test_cost_model_recovers_the_step_cost():
    cost = adaptive.CostModel()
    rng = np.random.default_rng(2)
    theta = np.array([0.004, 0.0002, 0.0011, 0.0003])
    for _ in range(300):
        batch = int(rng.integers(1, 9))
        passes = int(rng.integers(0, 6))
        drafted = batch * passes - int(rng.integers(0, batch)) * (passes > 0)
        seconds = float(cost.features(batch, passes, drafted) @ theta) * rng.uniform(0.97, 1.03)
        cost.observe(batch, passes, drafted, seconds)
    assert np.allclose(cost.theta, theta, rtol=0.15, atol=5e-5)


@pytest.mark.parametrize("rate_per_pass,expect_k", [(0.0004, 3), (0.02, 0)])
def test_plan_speculates_only_when_it_pays(rate_per_pass, expect_k):
    policy = adaptive.Policy(max_k=3, warmup_steps=8, explore_every=10**9)
    for i in range(200):
        k = i % 4
        policy.observe_step(1, k, k, 0.004 + rate_per_pass * k)
        conf = np.full(max(k, 1), 0.9)
        policy.observe_verification("r", conf, int(0.8 * len(conf)))
    for _ in range(100):
        policy.observe_verification("r", np.full(3, 0.9), 3)
    plan = policy.plan(["r"])
    assert plan.k == expect_k
    assert plan.baseline_rate == pytest.approx(250, rel=0.05)


def test_each_batch_size_bucket_has_its_own_cost_model():
    """One request: a drafted token costs little (the forward reads the weights anyway); eight:
    verified tokens cost compute. One linear model over both would get one of them wrong."""
    policy = adaptive.Policy(max_k=3, kind="sequential", warmup_steps=8, explore_every=10**9)
    for i in range(300):
        k = i % 4
        policy.observe_step(1, k, k, 0.004 + 0.0003 * k)  # ~8 % of a step per draft
        policy.observe_step(8, k, 8 * k, 0.008 + 0.02 * k)  # 2.5 steps a draft
        policy.observe_verification(f"r{i % 8}", np.full(3, 0.5), 1)
    assert adaptive.batch_bucket(1) == 1 and adaptive.batch_bucket(5) == adaptive.batch_bucket(8) == 8
    assert policy.plan(["r0"]).k > 0
    assert policy.plan([f"r{i}" for i in range(8)]).k == 0
    assert set(policy.costs) == {(1, False), (8, False)}


def test_pinned_costs_survive_observations():
    policy = adaptive.Policy(max_k=3, warmup_steps=0, explore_every=10**9)
    policy.pin_cost([0.004, 0.0, 0.01, 0.01])
    for _ in range(5):
        policy.plan(["r"])
        policy.observe_step(1, 1, 1, 0.001)
    assert list(policy.cost.theta) == [0.004, 0.0, 0.01, 0.01]
    assert policy.plan(["r"]).k == 0  # drafting costs 5 steps a token here


def test_explore_all_cycles_every_k_after_warm_up():
    """explore_all: exploration steps try K = 1, 2, 3, 0, ... in turn (k* +- 1 by default)."""
    policy = adaptive.Policy(max_k=3, explore_every=2, explore_all=True)
    policy.pin_cost([0.004, 0.0, 0.0001, 0.00001])
    explored = []
    for _ in range(16):
        plan = policy.plan(["a", "b"])
        if plan.explore:
            explored.append(plan.k)
    assert explored == [1, 2, 3, 0, 1, 2, 3, 0]


def test_the_cap_alone_reads_no_confidence_and_counts_positions_only():
    """The default (trim off) stops the draft loop at k* without reading a confidence (each read is
    a softmax and a device-to-host copy a pass); its verifications count by position, never into a
    confidence bucket."""
    policy = adaptive.Policy(max_k=4, warmup_steps=0, explore_every=10**9)
    policy.pin_cost([0.004, 0.0, 0.0001, 0.00001])
    plan = policy.plan(["a", "b"])
    assert not policy.needs_confidence() and plan.k == 4
    assert [policy.add_pass(None) for _ in range(plan.k)] == [True, True, True, False]
    assert list(policy.lengths()) == [4, 4]
    policy.observe_verifications(["a", "b"], np.full((2, 4), np.nan), np.array([4, 4]), np.array([1, 4]), np.array([False, False]))
    assert policy.acceptance.tried.sum() == 0 and policy.acceptance.accepted.sum() == 0
    assert list(policy.acceptance.pos_tried[0]) == [2, 2, 1, 1] and list(policy.acceptance.pos_accepted[0]) == [2, 1, 1, 1]
    policy.trim = True
    policy.plan(["a", "b"])
    assert policy.needs_confidence()


def test_measured_arm_seconds_decide_over_the_linear_model():
    """A step's cost is not linear in k (here k = 3 crosses into a slower GEMM): the plan reads
    each arm's measured seconds, not the four-feature fit through them."""
    policy = adaptive.Policy(max_k=3, warmup_steps=0, explore_every=10**9)
    seconds = {0: 0.004, 1: 0.005, 2: 0.006, 3: 0.020}
    for i in range(200):
        k = i % 4
        policy.observe_step(1, k, k, seconds[k], k=k)
    for _ in range(200):
        policy.observe_verifications(["r"], np.full((1, 3), np.nan), np.array([3]), np.array([3]), np.array([False]))
    rates = policy.acceptance.position_rates()[0]
    expected = 1 + np.concatenate([[0.0], np.cumsum(np.cumprod(rates))])  # tokens per step by k
    want = int(np.argmax(expected / np.array([seconds[k] for k in range(4)])))
    assert want == 2 and policy.plan(["r"]).k == want
    assert policy.arm_seconds(1, 3) == pytest.approx(0.020)
    assert policy.arms.mean(2, 1) is None  # another batch size: not measured, the model answers
    assert policy.arm_seconds(2, 1) == pytest.approx(policy.step_seconds(2, 1, 2))


def test_greedy_and_sampled_steps_are_costed_apart():
    """An all-greedy step runs the argmax verifier and no sampling: here its drafts cost a third
    of a sampled step's. Arms and models kept per mode give each its own k*; one table shared by
    both would compare an arm last measured at T = 0 with one last measured at T = 1."""
    policy = adaptive.Policy(max_k=4, warmup_steps=0, explore_every=10**9)
    cost = {True: 0.0004, False: 0.0030}  # seconds per drafted token
    for i in range(400):
        k, greedy = i % 5, bool(i // 5 % 2)
        policy.observe_step(1, k, k, 0.005 + cost[greedy] * k, k=k, greedy=greedy)
    for mode in (True, False):
        for i in range(100):  # 0..4 accepted in turn: P(accept | reached) 4/5, 3/4, 2/3, 1/2
            policy.observe_verifications(["r"], np.full((1, 4), np.nan), np.array([4]), np.array([i % 5]), np.array([mode]))
    assert policy.arm_seconds(1, 4, greedy=True) == pytest.approx(0.005 + 4 * cost[True])
    assert policy.arm_seconds(1, 4, greedy=False) == pytest.approx(0.005 + 4 * cost[False])
    greedy_plan, sampled_plan = policy.plan(["r"], np.array([True])), policy.plan(["r"], np.array([False]))
    assert greedy_plan.greedy and not sampled_plan.greedy
    assert (greedy_plan.k, sampled_plan.k) == (4, 1)  # 1, 1.8, 2.4, 2.8, 3.0 tokens a step by k
    assert set(policy.cost_constants()) == {"1:greedy", "1:sampled"}
    assert list(policy.chosen.nonzero()[0]) == sorted({greedy_plan.k, sampled_plan.k})
    assert set(policy.arms.table()) == {"1:greedy", "1:sampled"}


def test_only_uniform_steps_count_for_an_arm_and_exploration_keeps_them_whole():
    """An arm's seconds come from steps that drafted exactly k per request, its first (cold) step
    left out. The cap alone explores whole arms, every K in turn; with trim the start-up steps
    and explorations use random lengths (the linear model must tell passes from drafted tokens)."""
    policy = adaptive.Policy(max_k=3, warmup_steps=4, explore_every=2)
    policy.observe_step(2, 3, 4, 0.01, k=None)  # per-request lengths 1 and 3: no arm
    policy.observe_step(2, 3, 5, 0.01, k=3)  # drafted != requests * k: no arm
    assert not policy.arms.seen or not policy.arms.seen[(2, False)].any()
    policy.observe_step(2, 1, 2, 0.050, k=1)  # cold: left out
    for _ in range(3):
        policy.observe_step(2, 1, 2, 0.010, k=1)
    assert policy.arms.mean(2, 1) == pytest.approx(0.010)
    fresh = adaptive.Policy(max_k=3, warmup_steps=4, explore_every=2, explore_all=True)
    warm = [fresh.plan(["a", "b"]) for _ in range(4)]
    assert [p.k for p in warm] == [1, 2, 3, 0] and not any(p.random_lengths for p in warm)
    for _ in range(4):
        fresh.observe_step(2, 1, 2, 0.01)
    later = [fresh.plan(["a", "b"]) for _ in range(4)]
    assert [p.k for p in later if p.explore] == [1, 2] and not any(p.random_lengths for p in later)
    trimming = adaptive.Policy(max_k=3, warmup_steps=4, explore_every=2, trim=True)
    assert all(trimming.plan(["a"]).random_lengths for _ in range(4))


def _serve(policy, steps, seconds_of):
    """Plan / step / observe ``steps`` times at one request: ``seconds_of(step, k)`` is what a
    step at cap k costs then; every draft is accepted. Returns the plans."""
    plans = []
    for step in range(steps):
        plan = policy.plan(["r"])
        plans.append(plan)
        k = plan.k
        if k:
            policy.observe_verifications(["r"], np.full((1, policy.max_k), np.nan), np.array([k]), np.array([k]),
                                         np.array([False]))
        policy.observe_step(1, k, k, seconds_of(step, k), k=k, explore=plan.explore)
    return plans


def test_paired_arms_flush_a_slow_start_up_measurement():
    """The start-up steps of arm 3 ran 1.5x slow (cold shapes, a busy machine); afterwards k = 3
    is best (4 tokens in 6.4 ms against 3 in 5.6 ms for k = 2). Paired arms, re-measured as the
    plan's neighbour against the level the plan runs at now, move the plan to k = 3 within a few
    explorations; the pre-2026-12-04 policy (each arm's own EW mean, explored one step in 64
    cycling 0..K) keeps its start-up view of arm 3 and stays at k = 2."""
    def seconds_of(step, k):
        return (0.004 + 0.0008 * k) * (1.5 if step < 24 and k == 3 else 1.0)

    new = adaptive.Policy(max_k=3)
    old = adaptive.Policy(max_k=3, explore_every=64, explore_all=True, paired_arms=False)
    tail = [[p.k for p in _serve(policy, 400, seconds_of)[200:] if not p.explore] for policy in (new, old)]
    assert np.mean(np.array(tail[0]) == 3) > 0.95
    assert np.mean(np.array(tail[1]) == 3) < 0.5
    assert new.arm_seconds(1, 3) == pytest.approx(0.0064, rel=0.02)


def test_paired_arms_follow_a_machine_that_slows_down():
    """Every step becomes 1.3x slower after step 300 (another tenant): the arms the plan does not
    run follow the planned one, so their ratio to it stays what it was."""
    def seconds_of(step, k):
        return (0.004 + 0.0008 * k) * (1.3 if step >= 300 else 1.0)

    policy = adaptive.Policy(max_k=3)
    _serve(policy, 600, seconds_of)
    for k in range(4):
        assert policy.arm_seconds(1, k) == pytest.approx(1.3 * (0.004 + 0.0008 * k), rel=0.03), k


def test_one_preempted_exploration_does_not_condemn_an_arm():
    """An explored step that ran 5x slow (the process was preempted) moves its arm's estimate by
    nothing: the offset is the median of the arm's last explorations."""
    arms = adaptive.ArmSeconds(max_k=2)
    for k in (0, 1, 2):
        arms.observe(1, k, 1.0, explore=True)  # cold: left out
    for _ in range(4):
        for k in (0, 1, 2):
            arms.observe(1, k, 0.004 + 0.001 * k, explore=True)
    arms.observe(1, 1, 5 * 0.005, explore=True)
    assert arms.mean(1, 1) == pytest.approx(0.005)
    assert arms.mean(1, 1, paired=False) > 0.006  # the EW mean moves by a fifth of the outlier


def test_labelled_policies_learn_apart():
    """lk_set_speculation's "label": each label keeps its own policy across switches (a benchmark's
    variants must not read each other's arms); fixed K in between keeps the current one."""
    from types import SimpleNamespace

    from vllm_lk import speculation

    runner = SimpleNamespace(use_async_scheduling=False, num_spec_tokens=3,
                             speculative_config=SimpleNamespace(method="mlp_speculator"))
    speculation.install(runner)
    worker = SimpleNamespace(model_runner=runner)
    speculation.set_speculation(worker, "adaptive", None, {"label": "a", "explore_every": 7})
    first = runner._lk_policy
    speculation.set_speculation(worker, "fixed", 2)
    speculation.set_speculation(worker, "adaptive", None, {"label": "b"})
    second = runner._lk_policy
    assert second is not first and second.explore_every == 16
    speculation.set_speculation(worker, "adaptive", None, {"label": "a"})
    assert runner._lk_policy is first and first.explore_every == 7
    speculation.set_speculation(worker, "adaptive")
    assert runner._lk_policy is first


def test_held_cost_observations_fold_to_the_sequential_fit():
    """The cost model holds observations and folds them in when theta is read: the weighted sums
    equal one update per observation (decay applied in the same order)."""
    rng = np.random.default_rng(1)
    rows = [(int(b), int(k), int(b * k), float(s)) for b, k, s in zip(rng.integers(1, 9, 40), rng.integers(0, 6, 40),
                                                                     rng.uniform(0.003, 0.02, 40))]
    held, stepwise = adaptive.CostModel(), adaptive.CostModel()
    for row in rows:
        held.observe(*row)
        stepwise.observe(*row)
        stepwise.theta  # noqa: B018 - read: folds this observation alone
    np.testing.assert_allclose(held.theta, stepwise.theta, rtol=1e-9)
    np.testing.assert_allclose(held.xtx, stepwise.xtx, rtol=1e-12)
    np.testing.assert_allclose(held.xty, stepwise.xty, rtol=1e-12)


def test_a_plan_leaves_its_cap_only_for_a_clearly_better_one():
    """Near-ties between arms are noise: the plan keeps the cap it chose for this batch size and
    mode unless another is expected to be switch_margin faster (0: plain argmax, which flips)."""
    def plan_with(seconds_k3: float, margin: float, k_before: int) -> int:
        policy = adaptive.Policy(max_k=3, warmup_steps=0, explore_every=10**9, switch_margin=margin)
        policy._incumbent[(1, False)] = k_before
        for _ in range(200):
            policy.observe_verifications(["r"], np.full((1, 3), np.nan), np.array([3]), np.array([3]), np.array([False]))
        expected = 1 + np.concatenate([[0.0], np.cumsum(np.cumprod(policy.acceptance.position_rates()[0]))])
        seconds = {0: 1.0, 1: 1.0, 2: expected[2] / expected[3], 3: seconds_k3}  # k = 2 would tie k = 3 at 1.0
        for i in range(200):
            policy.observe_step(1, i % 4, i % 4, seconds[i % 4], k=i % 4)
        return policy.plan(["r"]).k

    assert plan_with(0.99, margin=0.03, k_before=2) == 2  # k = 3 is 1 % faster: within the margin, stay at 2
    assert plan_with(0.99, margin=0.0, k_before=2) == 3  # plain argmax moves
    assert plan_with(0.95, margin=0.03, k_before=2) == 3  # 5 % faster: move
    assert plan_with(1.01, margin=0.03, k_before=3) == 3  # k = 2 is 1 % faster: stay at 3

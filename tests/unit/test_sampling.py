"""vllm_lk.sampling against its slow reference, vLLM's own top-k/top-p, exact enumeration and
seeded chi-square tests. Formulas restated: P(accept x) = min(1, p(x)/q(x)); after a rejection
sample normalize(max(0, p - q)); bonus from p; per-position acceptance sum_v min(p_v, q_v)."""

import itertools

import pytest
import torch

from vllm_lk import reference, sampling


@pytest.fixture(autouse=True)
def float64_by_default():
    """Exact-enumeration tests compare at 1e-9: float64 inside this module's tests only (setting
    it at import leaked into every module collected after this one, e.g. session model builds)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_logits(gen, rows, vocab, spread=2.0):
    return torch.randn(rows, vocab, generator=gen) * spread


TRANSFORMS = [  # (temperature, top_k, top_p)
    (1.0, None, None),
    (0.7, None, None),
    (1.3, 3, None),
    (1.0, None, 0.8),
    (0.5, 4, 0.6),
    (2.0, 1, None),  # point mass
    (1.0, None, 0.05),  # nucleus of one token
]


@pytest.mark.parametrize("vocab", [5, 7, 64])
def test_sampling_probs_matches_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for _ in range(20):
        logits = random_logits(gen, 6, vocab)
        logits[0, 1] = logits[0, 2]  # a tie
        temperature = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.9, 3.0])
        top_k = torch.randint(0, vocab + 2, (6,), generator=gen)
        top_p = torch.rand(6, generator=gen).clamp_min(0.05)
        for k, p in ((None, None), (top_k, None), (None, top_p), (top_k, top_p)):
            fast = sampling.sampling_probs(logits, temperature, k, p)
            slow = reference.sampling_probs(logits, temperature, k, p)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
            torch.testing.assert_close(fast.sum(-1), torch.ones(6), rtol=0, atol=1e-12)


def test_sampling_transforms_accept_an_empty_batch():
    empty = torch.zeros(0, 7)
    for k, p in ((None, None), (torch.zeros(0, dtype=torch.long), None), (None, torch.zeros(0)), (torch.zeros(0, dtype=torch.long), torch.zeros(0))):
        assert sampling.sampling_probs(empty, torch.zeros(0), k, p).shape == (0, 7)


def test_sampling_probs_uses_vllms_top_k_top_p_rules():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(0)
    logits = random_logits(gen, 32, 50).float()
    temperature = torch.rand(32, generator=gen).float() + 0.3
    top_k = torch.randint(1, 51, (32,), generator=gen)
    top_p = torch.rand(32, generator=gen).float().clamp_min(0.05)
    ours = sampling.sampling_probs(logits, temperature, top_k, top_p)
    theirs = apply_top_k_top_p_pytorch(logits / temperature[:, None], top_k, top_p).softmax(-1)
    # float32 on both sides; same kept sets, so only rounding differs
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours > 0, theirs > 0)


def random_verify_inputs(gen, batch, k_max, vocab, with_q=True):
    """Flat vLLM layout: the drafts of all requests back to back in [N, V] tensors."""
    num_drafts = torch.randint(0, k_max + 1, (batch,), generator=gen)
    num_drafts[:3] = k_max
    rows = sampling.padded_rows(num_drafts, k_max)
    n = int(num_drafts.sum())
    target_logits = torch.randn(n, vocab, generator=gen) * 2
    target_logits[0] = float("-inf")  # a point mass
    target_logits[0, 1] = 0.0
    drafts = torch.randint(0, vocab, (batch, k_max), generator=gen)
    drafts[1, 0] = -1  # an invalid draft id is always rejected
    draft_probs = torch.softmax(torch.randn(n, vocab, generator=gen) * 2, -1) if with_q else None
    if with_q:  # q(x) = 0 for the drafted token: cannot have been drawn, rejected
        row = int(rows[2, 0])
        draft_probs[row] = 0.0
        draft_probs[row, (drafts[2, 0] + 1) % vocab] = 1.0
    greedy = torch.rand(batch, generator=gen) < 0.3
    uniforms = torch.rand(batch, k_max, generator=gen)
    residual_uniforms = torch.rand(batch, generator=gen, dtype=torch.float64)
    bonus = bonus_tokens(torch.softmax(torch.randn(batch, vocab, generator=gen), -1), greedy, gen)
    return drafts, num_drafts, draft_probs, target_logits, rows, bonus, greedy, uniforms, residual_uniforms


def bonus_tokens(p_bonus, greedy, gen):
    """What vLLM's sampler gives: a draw from p at the bonus position (argmax when greedy)."""
    drawn = torch.multinomial(p_bonus, 1, generator=gen)[:, 0]
    return torch.where(greedy, p_bonus.argmax(-1), drawn)


@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("k_max,vocab", [(1, 3), (3, 5), (4, 7), (5, 33)])
def test_verify_equals_the_plain_loop(with_q, k_max, vocab):
    gen = torch.Generator().manual_seed(k_max * 100 + vocab)
    for _ in range(30):
        inputs = random_verify_inputs(gen, 12, k_max, vocab, with_q)
        fast_out, fast_acc = sampling.verify(*inputs)
        slow_out, slow_acc = reference.verify(*inputs)
        assert torch.equal(fast_out, slow_out)
        assert torch.equal(fast_acc, slow_acc)
        # noise asked for once, with the rows whose residual sample is used: sampled rows that
        # rejected a draft (seeded requests draw from their generators only there)
        asked = []
        lazy = sampling.verify(*inputs[:-1], lambda needed: asked.append(needed) or inputs[-1])[0]
        num_drafts, greedy = inputs[1], inputs[6]
        assert torch.equal(lazy, fast_out) and len(asked) == 1
        assert torch.equal(asked[0], (fast_acc < num_drafts) & ~greedy)


@pytest.mark.parametrize("k_max,vocab", [(1, 3), (3, 5), (5, 33)])
def test_greedy_fast_path_equals_verify(k_max, vocab):
    gen = torch.Generator().manual_seed(k_max * 10 + vocab)
    for _ in range(30):
        drafts, num_drafts, _, logits, rows, _, _, uniforms, residual = random_verify_inputs(gen, 12, k_max, vocab, False)
        bonus = torch.randint(0, vocab, (12,), generator=gen)
        argmax = logits.argmax(-1)
        hits = torch.rand(12, k_max, generator=gen) < 0.7  # mostly the argmax, so long prefixes occur
        drafts = torch.where(hits & (drafts >= 0), argmax[rows], drafts)
        greedy = torch.ones(12, dtype=torch.bool)
        expected = sampling.verify(drafts, num_drafts, None, logits, rows, bonus, greedy, uniforms, residual)
        fast = sampling.verify_greedy(drafts, num_drafts, logits, rows, bonus)
        assert torch.equal(fast[0], expected[0]) and torch.equal(fast[1], expected[1])


def test_verify_acceptance_threshold_is_p_over_q():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    q = torch.tensor([[0.4, 0.4, 0.2]])
    rows = torch.tensor([[0]])
    bonus = torch.tensor([2])
    draft = torch.tensor([[0]])  # p/q = 0.5
    draw = torch.tensor([0.5], dtype=torch.float64)
    for u, expected in ((0.4999999, 1), (0.5000001, 0)):
        _, acc = sampling.verify(draft, torch.tensor([1]), q, logits, rows, bonus, torch.tensor([False]), torch.tensor([[u]]), draw)
        assert int(acc) == expected
    draft = torch.tensor([[1]])  # p/q = 1.25 >= 1: always accepted
    _, acc = sampling.verify(draft, torch.tensor([1]), q, logits, rows, bonus, torch.tensor([False]), torch.tensor([[0.9999999]]), draw)
    assert int(acc) == 1


def test_inverse_cdf_draw_boundaries_and_zero_mass():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999999, 1 - 2**-53], dtype=torch.float64)
    # cumulative 0, .25, .25, 1, 1: the first token whose running sum exceeds u; zero-mass tokens never
    assert sampling.sample_from_uniform(probs, u).tolist() == [1, 1, 3, 3, 3]
    assert sampling.sample_from_uniform(probs * 7, u).tolist() == [1, 1, 3, 3, 3]  # unnormalized rows


def test_inverse_cdf_draw_is_a_draw_from_the_row():
    """chi-square of 20000 draws against the row (false-failure rate 1e-4 per call)."""
    gen = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(33, generator=gen) * 2, -1)
    draws = sampling.sample_from_uniform(probs.expand(20000, 33), torch.rand(20000, generator=gen, dtype=torch.float64))
    assert chi_square_p_value(torch.bincount(draws, minlength=33).double(), 20000 * probs.double()) > 1e-4


def test_greedy_rows_follow_the_argmax_chain():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    bonus = torch.tensor([2])  # argmax at the bonus position
    args = (logits, torch.tensor([[0, 1]]), bonus, torch.tensor([True]), torch.zeros(1, 2), torch.full((1,), 0.5, dtype=torch.float64))
    out, acc = sampling.verify(torch.tensor([[1, 0]]), torch.tensor([2]), None, *args)
    assert out.tolist() == [[1, 0, 2]] and int(acc) == 2
    out, acc = sampling.verify(torch.tensor([[1, 2]]), torch.tensor([2]), None, *args)
    assert out.tolist() == [[1, 0, -1]] and int(acc) == 1


# ---------------------------------------------------------------------------------------------
# Exact enumeration: prefix-dependent p and q over a tiny vocabulary. One speculative step
# (K drafts from q, verification) followed by plain target sampling up to K+1 tokens must give
# exactly the target's joint distribution over K+1 tokens.


class PrefixModel:
    """Deterministic random logits for every prefix (a tiny 'language model')."""

    def __init__(self, vocab, seed, spread):
        self.vocab, self.seed, self.spread = vocab, seed, spread

    def logits(self, prefix):
        gen = torch.Generator().manual_seed(hash((self.seed,) + tuple(prefix)) % (2**31))
        return torch.randn(self.vocab, generator=gen) * self.spread


def transformed(model, prefix, transform):
    temperature, top_k, top_p = transform
    k = None if top_k is None else torch.tensor([top_k])
    p = None if top_p is None else torch.tensor([top_p])
    return sampling.sampling_probs(model.logits(prefix)[None], torch.tensor([temperature]), k, p)[0]


def completer(out, target, transform, length):
    """complete(prefix, prob): add prob x P_target(continuation) to ``out`` for every
    continuation of ``prefix`` to ``length`` tokens."""

    def complete(prefix, prob):
        if prob == 0.0:
            return
        if len(prefix) == length:
            out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + prob
            return
        p = transformed(target, prefix, transform)
        for v in range(len(p)):
            complete(prefix + [v], prob * float(p[v]))

    return complete


def exact_step_distribution(target, draft, vocab, k_max, transform):
    """P(first K+1 tokens) after one speculative step + target completion; and per-position
    acceptance P(draft k accepted | drafts < k accepted)."""
    out = {}
    accepted_mass = [0.0] * k_max
    reached_mass = [0.0] * k_max
    complete = completer(out, target, transform, k_max + 1)

    def step(prefix, prob):  # prefix = accepted drafts so far
        k = len(prefix)
        p = transformed(target, prefix, transform)
        if k == k_max:  # bonus token from p
            for v in range(vocab):
                complete(prefix + [v], prob * float(p[v]))
            return
        q = transformed(draft, prefix, transform)
        residual = sampling.residual_probs(p, q)
        reject_total = accept_total = 0.0
        for x in range(vocab):
            if float(q[x]) == 0.0:
                continue
            accept = min(1.0, float(p[x]) / float(q[x]))
            step(prefix + [x], prob * float(q[x]) * accept)
            accept_total += float(q[x]) * accept
            reject_total += float(q[x]) * (1 - accept)
        # the algorithm's acceptance at this prefix is sum_v min(p_v, q_v)
        assert abs(accept_total - float(sampling.acceptance_rate(p, q))) < 1e-12
        reached_mass[k] += prob
        accepted_mass[k] += prob * accept_total
        for v in range(vocab):
            complete(prefix + [v], prob * reject_total * float(residual[v]))

    step([], 1.0)
    return out, [a / r if r > 0 else None for a, r in zip(accepted_mass, reached_mass)]


def target_joint(target, vocab, length, transform):
    joint = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for i in range(length):
            prob *= float(transformed(target, list(seq[:i]), transform)[seq[i]])
        joint[seq] = prob
    return joint


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("vocab,k_max", [(4, 1), (5, 2), (4, 3)])
def test_exact_enumeration_output_equals_target(vocab, k_max, transform):
    target = PrefixModel(vocab, seed=1, spread=1.5)
    draft = PrefixModel(vocab, seed=2, spread=1.5)
    got, per_position = exact_step_distribution(target, draft, vocab, k_max, transform)
    want = target_joint(target, vocab, k_max + 1, transform)
    assert set(got) <= set(want)
    for seq, prob in want.items():
        assert abs(got.get(seq, 0.0) - prob) < 1e-9, seq
    # first position: acceptance = sum_v min(p_v, q_v) at the empty prefix
    alpha0 = float(sampling.acceptance_rate(transformed(target, [], transform), transformed(draft, [], transform)))
    assert abs(per_position[0] - alpha0) < 1e-12


def test_exact_enumeration_with_disjoint_supports_and_identity():
    vocab, k_max = 4, 2
    transform = (1.0, 2, None)  # top-2 of each: target and draft pick different tokens
    target = PrefixModel(vocab, seed=3, spread=3.0)
    draft = PrefixModel(vocab, seed=4, spread=3.0)
    got, _ = exact_step_distribution(target, draft, vocab, k_max, transform)
    want = target_joint(target, vocab, k_max + 1, transform)
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) < 1e-9
    # draft identical to target: every draft accepted at every position
    got, per_position = exact_step_distribution(target, target, vocab, k_max, (0.8, None, None))
    assert all(a is not None and abs(a - 1.0) < 1e-12 for a in per_position)


# ---------------------------------------------------------------------------------------------
# Seeded chi-square test of the vectorised verify() with real random draws, sequences drawn
# from prefix-dependent p and q. Threshold p-value 1e-4: a correct sampler fails with
# probability 1e-4 per seed (the seed is fixed, so the outcome is deterministic).


def chi_square_p_value(observed, expected):
    mask = expected >= 5
    other_obs = observed[~mask].sum()
    other_exp = expected[~mask].sum()
    obs = torch.cat([observed[mask], other_obs[None]]) if other_exp > 0 else observed[mask]
    exp = torch.cat([expected[mask], other_exp[None]]) if other_exp > 0 else expected[mask]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))


@pytest.mark.parametrize("transform,greedy_share", [((1.0, None, None), 0.0), ((0.7, 3, 0.9), 0.3)])
def test_chi_square_verify_samples_the_target(transform, greedy_share):
    vocab, k_max, n = 4, 3, 40000
    target = PrefixModel(vocab, seed=5, spread=1.5)
    draft = PrefixModel(vocab, seed=6, spread=1.5)
    prefixes = [list(s) for length in range(k_max + 2) for s in itertools.product(range(vocab), repeat=length)]
    index = {tuple(s): i for i, s in enumerate(prefixes)}
    P = torch.stack([transformed(target, s, transform) for s in prefixes])  # [num_prefixes, V]
    Q = torch.stack([transformed(draft, s, transform) for s in prefixes])
    gen = torch.Generator().manual_seed(1234)

    def code(seqs):  # [n, l] -> prefix index
        return torch.tensor([index[tuple(s)] for s in seqs.tolist()])

    drafts = torch.zeros(n, k_max, dtype=torch.long)
    for k in range(k_max):
        q_k = Q[code(drafts[:, :k])]
        drafts[:, k] = torch.multinomial(q_k, 1, generator=gen)[:, 0]
    target_probs = torch.stack([P[code(drafts[:, :k])] for k in range(k_max + 1)], 1)
    draft_probs = torch.stack([Q[code(drafts[:, :k])] for k in range(k_max)], 1)
    greedy = torch.rand(n, generator=gen) < greedy_share
    num_drafts = torch.full((n,), k_max)
    bonus = bonus_tokens(target_probs[:, k_max], greedy, gen)
    out, _ = sampling.verify(
        drafts, num_drafts, draft_probs.reshape(n * k_max, vocab), target_probs[:, :k_max].log().reshape(n * k_max, vocab),
        sampling.padded_rows(num_drafts, k_max), bonus, greedy,
        torch.rand(n, k_max, generator=gen), torch.rand(n, generator=gen, dtype=torch.float64),
    )
    sampled = ~greedy
    out = out[sampled]
    emitted = (out >= 0).sum(1)
    # complete each sequence to K+1 tokens by sampling the target
    for position in range(1, k_max + 1):
        need = emitted <= position
        if need.any():
            rows = need.nonzero()[:, 0]
            probs = P[code(out[rows, :position])]
            out[rows, position] = torch.multinomial(probs, 1, generator=gen)[:, 0]
            emitted[rows] = position + 1
    cells = (out * vocab ** torch.arange(k_max, -1, -1)).sum(1)
    observed = torch.bincount(cells, minlength=vocab ** (k_max + 1)).double()
    expected = torch.tensor(
        [float(torch.prod(torch.stack([P[index[s[:i]], s[i]] for i in range(k_max + 1)])))
         for s in itertools.product(range(vocab), repeat=k_max + 1)]
    ) * int(sampled.sum())
    assert chi_square_p_value(observed, expected) > 1e-4

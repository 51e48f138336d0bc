"""training.losses against the eager reference (values and gradients), plus the identities the
LK paper rests on. Tolerances: fp32 1e-5 (chunked vs whole-batch reductions differ in summation
order only); bf16 inputs 1e-2 relative (the math is fp32 on both sides, but bf16 rounding of the
returned gradient costs ~3 significant digits)."""


import pytest
import torch

from training import losses, losses_reference

KINDS = ["kl", "tv", "lk-hybrid", "lk-alpha"]


def inputs(n=37, vocab=101, seed=0, dtype=torch.float32, point_masses=True):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, vocab, generator=gen) * 2
    if point_masses:
        target[0] = -1e9
        target[0, 3] = 0.0  # a point mass
    draft = (target + torch.randn(n, vocab, generator=gen)).to(dtype)
    return draft.requires_grad_(True), target


def grads(fn, draft, target, **kw):
    draft = draft.detach().clone().requires_grad_(True)
    loss, alpha, kl = fn(draft, target, **kw)
    loss.backward()
    return loss.detach(), alpha, kl, draft.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_matches_reference_fp32(kind, temperature, chunk):
    draft, target = inputs()
    fast = grads(losses.draft_loss, draft, target, kind=kind, temperature=temperature, chunk_size=chunk)
    ref = grads(losses_reference.draft_loss, draft, target, kind=kind, temperature=temperature)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_bf16(kind):
    draft, target = inputs(dtype=torch.bfloat16)
    fast = grads(losses.draft_loss, draft, target, kind=kind, chunk_size=8)
    ref = grads(losses_reference.draft_loss, draft, target, kind=kind)
    assert fast[3].dtype == torch.bfloat16
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[3].float(), ref[3].float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_vocab_matches_reference(kind):
    draft, target = inputs(vocab=97)
    ids = torch.tensor(sorted(torch.randperm(97, generator=torch.Generator().manual_seed(1))[:40].tolist()))
    ids[0] = 3  # keep the point mass's token in the draft vocab
    ids = ids.sort().values
    fast = grads(losses.draft_loss, draft[:, :40], target, kind=kind, draft_ids=ids, chunk_size=7)
    ref = grads(losses_reference.draft_loss, draft[:, :40], target, kind=kind, draft_ids=ids)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_truncated_alpha_by_hand():
    # target p = (0.5, 0.3, 0.2) over 3 tokens; draft vocab = tokens {0, 2}, q = (0.6, 0.4)
    target = torch.tensor([[0.5, 0.3, 0.2]]).log()
    draft = torch.tensor([[0.6, 0.4]]).log()
    _, alpha, kl = losses.draft_loss(draft, target, "tv", draft_ids=torch.tensor([0, 2]))
    # alpha = min(0.5, 0.6) + min(0.2, 0.4) = 0.7: the 0.3 on token 1 counts as rejected
    assert float(alpha) == pytest.approx(0.7, abs=1e-6)
    p_tilde = torch.tensor([0.5, 0.2]) / 0.7  # KL uses p renormalised on the draft vocab
    assert float(kl) == pytest.approx(float((p_tilde * (p_tilde / torch.tensor([0.6, 0.4])).log()).sum()), abs=1e-6)


def test_neg_log_alpha_gradient_is_tv_gradient_over_alpha():
    draft, target = inputs(n=9)
    _, alpha, _, g_alpha = grads(losses.draft_loss, draft, target, kind="lk-alpha")
    _, _, _, g_tv = grads(losses.draft_loss, draft, target, kind="tv")
    torch.testing.assert_close(g_alpha, g_tv / alpha[:, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_token", [False, True])
def test_lambda_schedule(per_token):
    draft, target = inputs(n=11)
    eta = 3.0
    loss, alpha, kl = losses.draft_loss(draft, target, "lk-hybrid", eta=eta, lambda_per_token=per_token)
    lam = torch.exp(-eta * (alpha if per_token else alpha.mean().expand_as(alpha)))
    assert float(loss) == pytest.approx(float((lam * kl + (1 - lam) * (1 - alpha)).mean()), rel=1e-6)
    # lambda -> 1 (pure KL) as alpha -> 0, and the gradient does not flow through lambda:
    _, _, _, g_hybrid = grads(losses.draft_loss, draft, target, kind="lk-hybrid", eta=eta, lambda_per_token=per_token)
    _, _, _, g_kl = grads(losses.draft_loss, draft, target, kind="kl")
    _, _, _, g_tv = grads(losses.draft_loss, draft, target, kind="tv")
    torch.testing.assert_close(g_hybrid, lam[:, None] * g_kl + (1 - lam[:, None]) * g_tv, rtol=1e-5, atol=1e-7)


def test_identical_distributions_accept_everything():
    draft, target = inputs(point_masses=False)
    _, alpha, kl = losses.draft_loss(target.clone(), target, "kl")
    torch.testing.assert_close(alpha, torch.ones_like(alpha))
    assert float(kl.abs().max()) < 1e-5


def test_head_weights_and_multi_head_loss():
    assert losses.head_weights(3, 0.8) == pytest.approx([1 / 2.44, 0.8 / 2.44, 0.64 / 2.44])
    d1, t1 = inputs(seed=1)
    d2, t2 = inputs(seed=2)
    total, alphas = losses.multi_head_loss([d1, d2], [t1, t2], "kl", temperatures=(1.0, 0.5))
    w = losses.head_weights(2)
    expected = sum(
        w[k] * sum(losses.draft_loss(d, t, "kl", temperature=tt)[0] for tt in (1.0, 0.5)) / 2
        for k, (d, t) in enumerate([(d1, t1), (d2, t2)])
    )
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert len(alphas) == 2 and all(0 < a < 1 for a in alphas)


def test_empty_batch_and_bad_kind():
    loss, alpha, _ = losses.draft_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), "kl")
    assert float(loss) == 0.0 and alpha.numel() == 0
    with pytest.raises(ValueError, match="unknown loss"):
        losses.draft_loss(torch.zeros(2, 5), torch.zeros(2, 5), "mse")


@pytest.mark.parametrize("kind", ["kl", "tv", "lk-hybrid", "lk-alpha"])
@pytest.mark.parametrize("truncated", [False, True])
def test_target_rows_give_the_materialised_loss(kind, truncated):
    """Target logits computed chunk by chunk from hidden rows + lm_head (HeadRows) give the loss,
    alpha and draft gradient of the same logits passed whole (fp32, 1e-6; chunks of 7 rows so
    forward and backward both cross chunk boundaries)."""
    from training.drafters.base import HeadRows

    gen = torch.Generator().manual_seed(3)
    n, h, v = 23, 16, 37
    hidden, weight, bias = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen), torch.randn(v, generator=gen)
    draft_ids = torch.tensor(sorted(torch.randperm(v, generator=gen)[:19].tolist())) if truncated else None
    width = 19 if truncated else v
    results = []
    for target in (torch.nn.functional.linear(hidden, weight, bias), HeadRows(hidden, weight, bias)):
        draft = torch.randn(n, width, generator=torch.Generator().manual_seed(4)).requires_grad_()
        loss, alpha, kl = losses.draft_loss(draft, target, kind, temperature=0.8, draft_ids=draft_ids, chunk_size=7)
        loss.backward()
        results.append((loss.detach(), alpha, kl, draft.grad))
    for whole, rows in zip(*results):
        torch.testing.assert_close(rows, whole, atol=1e-6, rtol=1e-6)


def test_run_target_keeps_the_head_input_not_the_logits(tiny_target):
    from training.target import load_target, run_target

    model, _ = load_target(tiny_target)
    ids = torch.randint(5, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    lazy = run_target(model, ids, mask, (1,))
    whole = run_target(model, ids, mask, (1,), materialise_logits=True)
    assert lazy.logits is None and lazy.head_input.shape == (2, 11, model.config.hidden_size)
    torch.testing.assert_close(lazy.all_logits(), whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lazy.hidden_states[1], whole.hidden_states[1])


@pytest.mark.parametrize("kind", ["kl", "lk-hybrid", "lk-alpha"])
@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("target_rows", [False, True])
def test_draft_rows_give_the_materialised_loss_and_gradients(kind, truncated, target_rows):
    """Draft logits computed chunk by chunk from the head's input rows (HeadRows: hidden, weight,
    bias) give the loss, alpha and the gradients w.r.t. hidden, weight and bias that autograd
    gives through F.linear of the whole logits (fp32, 1e-5: only summation order differs; chunks
    of 7 rows so forward and backward cross chunk boundaries)."""
    from training.drafters.base import HeadRows

    gen = torch.Generator().manual_seed(5)
    n, h, v = 23, 16, 37
    width = 19 if truncated else v
    draft_ids = torch.tensor(sorted(torch.randperm(v, generator=gen)[:width].tolist())) if truncated else None
    t_hidden, t_weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    target = HeadRows(t_hidden, t_weight) if target_rows else t_hidden @ t_weight.T
    leaves = [torch.randn(n, h, generator=gen), torch.randn(width, h, generator=gen) * 0.5, torch.randn(width, generator=gen)]
    results = []
    for rows in (False, True):
        hidden, weight, bias = (t.clone().requires_grad_() for t in leaves)
        draft = HeadRows(hidden, weight, bias) if rows else torch.nn.functional.linear(hidden, weight, bias)
        loss, alpha, kl = losses.draft_loss(draft, target, kind, temperature=0.7, draft_ids=draft_ids, chunk_size=7)
        loss.backward()
        results.append((loss.detach(), alpha, kl, hidden.grad, weight.grad, bias.grad))
    for whole, rows in zip(*results):
        torch.testing.assert_close(rows, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "lk-hybrid", "lk-alpha"])
def test_target_restricted_to_the_draft_vocab_gives_the_full_vocab_loss(kind):
    """A truncated draft vocabulary: the target side as its draft-vocabulary columns plus the full
    vocabulary's logsumexp (restrict_to_draft_vocab, two heads sharing the target's lm_head, two
    temperatures, a target bias) gives the loss, per-head alpha and draft gradients of the full-V
    path (fp32, 1e-5: exp(z - lse) against a softmax, summation order only). The lse is also
    checked against the target's softmax outright: p on the draft ids sums to less than 1 here,
    the mass outside counting as rejected (on average here)."""
    from training.drafters.base import HeadRows

    gen = torch.Generator().manual_seed(7)
    n, h, v, width = 21, 16, 41, 17
    draft_ids = torch.tensor(sorted(torch.randperm(v, generator=gen)[:width].tolist()))
    t_weight, t_bias = torch.randn(v, h, generator=gen), torch.randn(v, generator=gen)
    targets = [HeadRows(torch.randn(n - k, h, generator=gen), t_weight, t_bias) for k in range(2)]
    leaves = [torch.randn(n - k, h, generator=gen) for k in range(2)] + [torch.randn(width, h, generator=gen) * 0.5]
    results = []
    for restrict in (False, True):
        *hidden, weight = (t.clone().requires_grad_() for t in leaves)
        drafts = [HeadRows(x, weight) for x in hidden]
        loss, alphas = losses.multi_head_loss(drafts, targets, kind, temperatures=(1.0, 0.6), draft_ids=draft_ids,
                                              restrict_target=restrict, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), torch.tensor(alphas), *(x.grad for x in hidden), weight.grad))
    for full, restricted in zip(*results):
        torch.testing.assert_close(restricted, full, atol=1e-5, rtol=1e-5)
    restricted, lse = losses.restrict_to_draft_vocab(targets[0], draft_ids, (0.6,))
    p = torch.softmax(targets[0].logits() / 0.6, dim=-1)[:, draft_ids]
    torch.testing.assert_close(torch.exp(restricted.logits() / 0.6 - lse[0, :, None]), p, atol=1e-6, rtol=1e-5)
    assert float(p.sum(-1).mean()) < 0.9


def test_heads_share_one_logsumexp_per_target_position():
    """select_rows hands each head's target rows a row_lse drawn from one per-position pass
    (TargetOutputs.position_lse, cached per temperature set): for every offset it equals head_lse
    of those rows computed on their own (fp32, 1e-6; chunking differs), and the pass runs once."""
    from training.drafters.base import HeadRows, TargetOutputs, select_rows

    gen = torch.Generator().manual_seed(8)
    b, t, h, v = 2, 11, 8, 29
    head = torch.nn.Linear(h, v)
    mask = torch.rand(b, t, generator=gen) < 0.7
    target = TargetOutputs(torch.zeros(b, t, dtype=torch.long), mask, (), head_input=torch.randn(b, t, h, generator=gen), lm_head=head)
    for offset in range(3):
        _, side = select_rows(torch.randn(b, t, 4, generator=gen), target, offset)
        alone = losses.head_lse(HeadRows(side.hidden, side.weight, side.bias), (1.0, 0.6))
        torch.testing.assert_close(side.row_lse((1.0, 0.6)), alone, atol=1e-6, rtol=1e-6)
    assert list(target._lse) == [(1.0, 0.6)]


def test_draft_rows_run_in_the_autocast_dtype_the_head_would():
    """HeadRows.of under bf16 autocast records bf16: the chunked logits then equal the head's own
    autocast output (what the materialised path trains on), and gradients reach the fp32 leaves
    in fp32."""
    from training.drafters.base import HeadRows

    gen = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(16, 37, bias=False)
    hidden = torch.randn(9, 16, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = HeadRows.of(hidden, head)
        direct = head(hidden)
    assert rows.dtype == torch.bfloat16 and direct.dtype == torch.bfloat16
    assert torch.equal(rows.logits(), direct.float())
    loss, _, _ = losses.draft_loss(rows, torch.randn(9, 37, generator=gen), "lk-hybrid")
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_a_drafter_with_no_trained_rows_gets_zero_gradients():
    from training.drafters.base import HeadRows

    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss, alpha, _ = losses.draft_loss(HeadRows(hidden, weight), torch.zeros(0, 5), "kl")
    loss.backward()
    assert float(loss) == 0.0 and alpha.numel() == 0 and torch.equal(weight.grad, torch.zeros(5, 4))

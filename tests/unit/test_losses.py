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
    """Target logits computed chunk by chunk from hidden rows + lm_head (TargetRows) give the loss,
    alpha and draft gradient of the same logits passed whole (fp32, 1e-6; chunks of 7 rows so
    forward and backward both cross chunk boundaries)."""
    from training.drafters.base import TargetRows

    gen = torch.Generator().manual_seed(3)
    n, h, v = 23, 16, 37
    hidden, weight, bias = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen), torch.randn(v, generator=gen)
    draft_ids = torch.tensor(sorted(torch.randperm(v, generator=gen)[:19].tolist())) if truncated else None
    width = 19 if truncated else v
    results = []
    for target in (torch.nn.functional.linear(hidden, weight, bias), TargetRows(hidden, weight, bias)):
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

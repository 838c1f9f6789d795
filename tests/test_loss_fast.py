"""The fused pair loss (``twist.loss._PairTerms``: analytic backward) against plain autograd.

``plain`` below is the loss as ordinary autograd computes it from METHOD.md sections 2 and 4
(one softmax and one log per view, entropies, both orders of every pair's cross term, the
diversity of each view's batch mean), with none of the fused path's algebra. The fused path
must give the same three terms and the same gradients for any weighting of them (so that the
sharpness, cross and batch-mean gradients are each checked, not only their sum in the loss),
in float64 to 1e-10 and in float32 to float32 rounding, for 2 to 8 views, one-hot-like logits
(p = 0 exactly, where only the eps inside the logs keeps things finite), bf16 input,
non-contiguous views and views without gradients.
"""

import pytest
import torch

from twist import TwistLoss

EPS = 1e-5


def plain(views, alpha=1.0, beta=1.0, tau=1.0, eps=EPS):
    """(loss, consistency, sharpness, diversity) by plain autograd, pair by pair."""
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    ps = [torch.softmax(v.to(dtype) / tau, dim=1) for v in views]
    ls = [torch.log(p + eps) for p in ps]
    pairs = [(0, 1)] + [(g, j) for j in range(2, len(views)) for g in (0, 1)]
    cons = sharp = div = 0.0
    for a, b in pairs:
        ent_a, ent_b = -(ps[a] * ls[a]).sum(1).mean(), -(ps[b] * ls[b]).sum(1).mean()
        cross_ab, cross_ba = (ps[a] * ls[b]).sum(1).mean(), (ps[b] * ls[a]).sum(1).mean()
        cons = cons + 0.5 * ((-ent_a - cross_ab) + (-ent_b - cross_ba))  # 0.5 (KL(a||b) + KL(b||a))
        sharp = sharp + 0.5 * (ent_a + ent_b)
        m_a, m_b = ps[a].mean(0), ps[b].mean(0)
        div = div + 0.5 * (-(m_a * torch.log(m_a + eps)).sum() - (m_b * torch.log(m_b + eps)).sum())
    n = len(pairs)
    cons, sharp, div = cons / n, sharp / n, div / n
    return cons + alpha * sharp - beta * div, cons, sharp, div


def _views(num_views, batch, classes, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
            for _ in range(num_views)]


def _compare(views, weights, alpha=1.0, beta=1.0, tau=1.0, atol=1e-10, rtol=1e-8):
    """Terms and gradients of sum_k weights[k] * term_k, fused against plain."""
    got = TwistLoss(alpha, beta, tau)(views)
    want = plain(views, alpha, beta, tau)
    got_terms = (got.loss, got.consistency, got.sharpness, got.diversity)
    for a, b in zip(got_terms, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    got_grads = torch.autograd.grad(sum(w * t for w, t in zip(weights, got_terms)), views)
    want_grads = torch.autograd.grad(sum(w * t for w, t in zip(weights, want)), views)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype == views[0].dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# the loss itself, and weightings that isolate the consistency, sharpness and diversity paths
WEIGHTS = [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0),
           (0.3, -1.7, 2.2, 0.9)]


@pytest.mark.parametrize("num_views", [2, 3, 8])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_float64_values_and_gradients(num_views, weights):
    views = _views(num_views, 6, 11, seed=num_views)
    _compare(views, weights, alpha=0.7, beta=1.3, tau=1.0)
    _compare(views, weights, alpha=1.0, beta=1.0, tau=0.4)


@pytest.mark.parametrize("num_views,batch,classes", [(2, 32, 10), (2, 16, 300), (6, 16, 300), (8, 9, 64)])
def test_float32_matches_plain_autograd(num_views, batch, classes):
    views = _views(num_views, batch, classes, dtype=torch.float32, seed=classes)
    _compare(views, WEIGHTS[-1], tau=0.5, atol=2e-5, rtol=1e-5)
    # and the float64 answer to float32 rounding: the fused path adds no error of its own
    exact = plain([v.detach().double() for v in views], tau=0.5)
    got = TwistLoss(tau=0.5)(views)
    for a, b in zip((got.loss, got.consistency, got.sharpness, got.diversity), exact):
        assert abs(a.item() - b.item()) <= 1e-6 * max(1.0, abs(b.item()))


@pytest.mark.parametrize("num_views", [2, 4])
def test_one_hot_like_logits(num_views):
    # rows with p = 0 exactly in most classes (logit gaps of 1e4: exp underflows to 0), rows
    # of near one-hot predictions (gap 60: p ~ 1e-26, far below eps), and ordinary rows
    views = _views(num_views, 8, 5, seed=11)
    with torch.no_grad():
        for k, v in enumerate(views):
            v[0] = torch.tensor([1e4, 0.0, 0.0, 0.0, 0.0])
            v[1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1e4]) if k % 2 else torch.tensor([-1e4, 0.0, 1e4, 0.0, 0.0])
            v[2] = torch.tensor([60.0, -60.0, 0.0, 0.0, 0.0])
            v[3] = 0.0  # uniform
    for weights in WEIGHTS:
        _compare(views, weights, tau=1.0)
    # all views one-hot and identical: the minimum, with gradients finite
    z = torch.full((5, 5), -1e4, dtype=torch.float64).fill_diagonal_(1e4)
    same = [z.clone().requires_grad_() for _ in range(num_views)]
    _compare(same, WEIGHTS[0])


def test_float32_one_hot_like_logits():
    views = _views(3, 8, 5, dtype=torch.float32, seed=5)
    with torch.no_grad():
        for v in views:
            v[0] = torch.tensor([1e4, 0.0, 0.0, 0.0, 0.0])
            v[1] = torch.tensor([60.0, -60.0, 0.0, 0.0, 0.0])
    _compare(views, WEIGHTS[-1], atol=2e-5, rtol=1e-5)


def test_gradcheck_every_term():
    views = _views(3, 4, 5, seed=2)
    loss = TwistLoss(alpha=0.6, beta=1.2, tau=0.7)

    def terms(*v):
        t = loss(list(v))
        return t.consistency, t.sharpness, t.diversity

    assert torch.autograd.gradcheck(terms, views, eps=1e-6, atol=1e-6)


def test_bf16_logits_promoted_to_float32():
    views = _views(3, 8, 16, dtype=torch.bfloat16, seed=4)
    got = TwistLoss()(views)
    assert got.loss.dtype == torch.float32
    want = plain(views)
    torch.testing.assert_close(got.loss, want[0], atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got.loss, views)
    want_grads = torch.autograd.grad(want[0], views)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b)


def test_noncontiguous_views_and_views_without_gradients():
    g = torch.Generator().manual_seed(9)
    leaves = [torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    views = [w.T for w in leaves]  # (6, 7), column-major
    assert not views[0].is_contiguous()
    views[3] = views[3].detach()  # a view that needs no gradient
    got = TwistLoss(tau=0.5)(views)
    want = plain(views, tau=0.5)
    torch.testing.assert_close(got.loss, want[0], atol=1e-10, rtol=1e-8)
    got_grads = torch.autograd.grad(got.loss, leaves[:3])
    want_grads = torch.autograd.grad(want[0], leaves[:3])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_backward_twice_with_retained_graph():
    # the backward must not modify what it saved: a second pass gives the same gradients
    views = _views(4, 5, 6, seed=3)
    loss = TwistLoss(tau=0.5)(views).loss
    first = torch.autograd.grad(loss, views, retain_graph=True)
    second = torch.autograd.grad(loss, views)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_grad_forward():
    views = [v.detach() for v in _views(3, 5, 6, seed=1)]
    with torch.no_grad():
        got = TwistLoss()(views)
    torch.testing.assert_close(got.loss, plain(views)[0], atol=1e-10, rtol=1e-8)

"""TwistLoss against METHOD.md section 2, computed independently: by hand, by a direct
transcription of the formulas, at its bounds, and through autograd's gradcheck."""

import math

import pytest
import torch

from twist import TwistLoss
from twist.loss import view_pairs

EPS = 1e-5


def _h(v):
    return -sum(x * math.log(x + EPS) for x in v)


def _kl(p, q):
    return sum(a * (math.log(a + EPS) - math.log(b + EPS)) for a, b in zip(p, q))


def test_hand_computed_two_views_two_samples():
    # logits chosen so the softmax is easy to write down: p = (0.5, 0.5), (0.75, 0.25), ...
    z1 = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[math.log(3), 0.0], [0.0, math.log(4)]], dtype=torch.float64)
    p1 = [(0.5, 0.5), (0.75, 0.25)]
    p2 = [(0.75, 0.25), (0.2, 0.8)]
    cons = 0.5 * (sum(_kl(a, b) for a, b in zip(p1, p2)) / 2 + sum(_kl(b, a) for a, b in zip(p1, p2)) / 2)
    sharp = 0.5 * (sum(_h(a) for a in p1) / 2 + sum(_h(b) for b in p2) / 2)
    m1 = [(p1[0][c] + p1[1][c]) / 2 for c in range(2)]
    m2 = [(p2[0][c] + p2[1][c]) / 2 for c in range(2)]
    div = 0.5 * (_h(m1) + _h(m2))
    alpha, beta = 0.7, 1.3
    t = TwistLoss(alpha=alpha, beta=beta)([z1, z2])
    assert t.consistency.item() == pytest.approx(cons, abs=1e-12)
    assert t.sharpness.item() == pytest.approx(sharp, abs=1e-12)
    assert t.diversity.item() == pytest.approx(div, abs=1e-12)
    assert t.loss.item() == pytest.approx(cons + alpha * sharp - beta * div, abs=1e-12)


def reference(views, alpha=1.0, beta=1.0, tau=1.0, eps=EPS):
    """METHOD.md sections 2 and 4 transcribed literally: one loop over the pairs."""
    ps = [torch.softmax(v / tau, dim=1) for v in views]

    def kl(p, q):
        return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(1).mean()

    def h(v):
        return -(v * torch.log(v + eps)).sum(-1)

    pairs = [(0, 1)] + [(g, j) for j in range(2, len(views)) for g in (0, 1)]
    c = s = d = 0.0
    for a, b in pairs:
        c = c + 0.5 * (kl(ps[a], ps[b]) + kl(ps[b], ps[a]))
        s = s + 0.5 * (h(ps[a]).mean() + h(ps[b]).mean())
        d = d + 0.5 * (h(ps[a].mean(0)) + h(ps[b].mean(0)))
    n = len(pairs)
    c, s, d = c / n, s / n, d / n
    return c + alpha * s - beta * d, c, s, d


@pytest.mark.parametrize("num_views", [2, 3, 4, 8, 14])
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 1.0, 1.0), (0.4, 1.0, 1.0), (1.0, 2.0, 0.3)])
def test_matches_reference_values_and_gradients(num_views, alpha, beta, tau):
    g = torch.Generator().manual_seed(num_views)
    views = [(3 * torch.randn(6, 7, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(num_views)]
    t = TwistLoss(alpha, beta, tau)(views)
    ref = reference(views, alpha, beta, tau)
    for got, want in zip((t.loss, t.consistency, t.sharpness, t.diversity), ref):
        assert got.item() == pytest.approx(want.item(), abs=1e-10)
    got_grads = torch.autograd.grad(t.loss, views)
    want_grads = torch.autograd.grad(ref[0], views)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("num_views", [2, 5])
def test_gradcheck_float64(num_views):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(num_views)]
    loss = TwistLoss(alpha=1.0, beta=1.0, tau=0.5)
    assert torch.autograd.gradcheck(lambda *v: loss(list(v)).loss, views, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_minimum_is_minus_beta_log_c(num_classes):
    # One-hot, agreeing, balanced predictions: every sample its own class, same in both views.
    z = torch.full((num_classes, num_classes), -60.0, dtype=torch.float64)
    z.fill_diagonal_(60.0)
    beta = 1.5
    t = TwistLoss(alpha=1.0, beta=beta)([z, z.clone(), z.clone()])
    # with eps inside the logs: sharpness = -log(1 + eps), diversity = -log(1/C + eps)
    exact = -math.log(1 + EPS) + beta * math.log(1 / num_classes + EPS)
    assert t.loss.item() == pytest.approx(exact, abs=1e-9)
    assert t.loss.item() == pytest.approx(-beta * math.log(num_classes), rel=1e-3)
    assert t.consistency.item() == pytest.approx(0.0, abs=1e-9)
    # and random logits never go below it
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        views = [10 * torch.randn(num_classes, num_classes, generator=g, dtype=torch.float64) for _ in range(2)]
        assert TwistLoss(beta=beta)(views).loss.item() >= -beta * math.log(num_classes) - 1e-3


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.4, 1.0), (2.0, 0.5)])
def test_uniform_prediction(alpha, beta):
    c = 16
    z = torch.zeros(8, c, dtype=torch.float64)
    t = TwistLoss(alpha=alpha, beta=beta)([z, z, z])
    # H_eps(uniform) = log(C) - C * (1/C) * log(1 + eps*C) ~ log C; compare with eps accounted for
    h = -math.log(1 / c + EPS)
    assert t.loss.item() == pytest.approx((alpha - beta) * h, abs=1e-12)
    assert t.loss.item() == pytest.approx((alpha - beta) * math.log(c), abs=1e-3)


def test_pairs_never_join_two_local_crops():
    assert view_pairs(2) == [(0, 1)]
    pairs = view_pairs(2 + 12)
    assert len(pairs) == 2 * 12 + 1
    assert all(min(a, b) < 2 for a, b in pairs)
    assert len(set(pairs)) == len(pairs)
    with pytest.raises(ValueError):
        view_pairs(1)


def test_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 32, generator=g) for _ in range(3)]
    ref = TwistLoss()(views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TwistLoss()([v.bfloat16() for v in views])
    assert got.loss.dtype == torch.float32
    # bf16 logits lose ~3 digits; the loss arithmetic itself must not add error on top
    exact = TwistLoss()([v.bfloat16().float() for v in views])
    assert got.loss.item() == pytest.approx(exact.loss.item(), abs=1e-6)
    assert got.loss.item() == pytest.approx(ref.loss.item(), abs=5e-2)


def test_positional_views_and_shape_errors():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert TwistLoss()(a, b).loss.item() == pytest.approx(TwistLoss()([a, b]).loss.item())
    with pytest.raises(ValueError):
        TwistLoss()([a, torch.randn(5, 3)])
    with pytest.raises(ValueError):
        TwistLoss()([torch.randn(4)])
    with pytest.raises(ValueError):
        TwistLoss(tau=0)


def test_teacher_variant_matches_formula():
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    t = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    out = TwistLoss(alpha=0.4)(s, teacher=t)
    ps = [torch.softmax(v, 1) for v in s]
    pt = [torch.softmax(v, 1) for v in t]
    kls = [(pt[i] * (torch.log(pt[i] + EPS) - torch.log(ps[j] + EPS))).sum(1).mean()
           for i in range(2) for j in range(4) if j != i]
    cons = torch.stack(kls).mean()
    sharp = torch.stack([-(p * torch.log(p + EPS)).sum(1).mean() for p in ps]).mean()
    div = torch.stack([-(p.mean(0) * torch.log(p.mean(0) + EPS)).sum() for p in ps]).mean()
    assert out.consistency.item() == pytest.approx(cons.item(), abs=1e-12)
    assert out.sharpness.item() == pytest.approx(sharp.item(), abs=1e-12)
    assert out.diversity.item() == pytest.approx(div.item(), abs=1e-12)
    assert out.loss.item() == pytest.approx((cons + 0.4 * sharp - div).item(), abs=1e-12)


def test_single_process_calls_nothing_distributed(monkeypatch):
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("torch.distributed called in a one-process run")

    monkeypatch.setattr(dist, "all_reduce", boom)
    monkeypatch.setattr(dist, "all_gather", boom)
    monkeypatch.setattr(dist, "get_world_size", boom)
    TwistLoss()([torch.randn(4, 3, requires_grad=True) for _ in range(3)]).loss.backward()

"""The TWIST loss (METHOD.md section 2), with multi-crop pairing (section 4) and the EMA
teacher variant (section 5).

For two views with logits z1, z2 (B x C) and p = softmax(z / tau)::

    consistency = 0.5 * (KL(p1 || p2) + KL(p2 || p1))       # agree across views
    sharpness   = 0.5 * (mean_i H(p1_i) + mean_i H(p2_i))     # be confident per sample
    diversity   = 0.5 * (H(mean_i p1_i) + H(mean_i p2_i))     # use all classes across the batch
    loss        = consistency + alpha * sharpness - beta * diversity

with eps inside every log. With local crops, the loss is averaged over every pair that holds a
global view: (g1, g2), (g1, l_j), (g2, l_j).

Example::

    >>> import torch
    >>> from twist import TwistLoss
    >>> criterion = TwistLoss()
    >>> z1, z2 = torch.randn(8, 10), torch.randn(8, 10)
    >>> terms = criterion([z1, z2])
    >>> terms.loss.shape
    torch.Size([])

How the work is organised: each view gets one softmax and one log; the pair terms are sums
of per-view quantities (entropies) plus cross terms sum_c p_a * log(p_b + eps), and the cross
terms of a global view with all local views collapse into one pass over the summed local
probabilities and logs. Consistency and sharpness are computed by :class:`_PairTerms`, an
autograd Function with the analytic gradient (derived in its docstring): a few fused passes
per view instead of autograd's chain through every product, log and sum, about 1.75x faster
forward + backward on the CPU (6 views of 256 x 4096). The diversity stays in ordinary
autograd on each view's batch mean, which _PairTerms also returns. The arithmetic runs in
float32 (or float64 when given float64) even under autocast, since entropies of bf16
probabilities are too coarse to train on.

Distributed runs: the batch mean inside the diversity term is over the global batch. It is
formed with an autograd-aware all-reduce (:func:`twist.distributed.all_reduce_mean`), so each
process's gradient equals that of the one-process loss on the concatenated batch (after DDP's
gradient averaging). Consistency and sharpness are per-sample means and need no
communication: DDP's averaging turns them into global means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from twist.distributed import all_reduce_mean, all_reduce_mean_nograd


@dataclass
class TwistTerms:
    """The loss and its three terms, each averaged over the view pairs (0-d tensors).

    ``loss`` carries gradients; the terms do too, for inspection and custom weighting.
    In a distributed run the consistency and sharpness here are this process's means; use
    :meth:`logged` for values averaged over processes.
    """

    loss: torch.Tensor
    consistency: torch.Tensor
    sharpness: torch.Tensor
    diversity: torch.Tensor
    head_losses: torch.Tensor | None = None
    """With several heads (model.num_heads > 1): every head's loss, detached; the other
    fields are those of the model's own head (head 0)."""

    def logged(self) -> dict[str, float]:
        """Plain floats for logging, averaged over processes (equal to the 1-process values)."""
        stacked = torch.stack([self.loss, self.consistency, self.sharpness, self.diversity]).detach()
        stacked = all_reduce_mean_nograd(stacked)
        loss, cons, sharp, div = stacked.tolist()
        return {"loss": loss, "consistency": cons, "sharpness": sharp, "diversity": div}


def view_pairs(num_views: int) -> list[tuple[int, int]]:
    """The pairs the loss is averaged over: (0, 1), then (0, j) and (1, j) for each local j.

    Local crops are never paired with each other: 2N + 1 pairs for N local crops.
    """
    if num_views < 2:
        raise ValueError(f"TWIST needs at least 2 views (two global crops), got {num_views}")
    pairs = [(0, 1)]
    for j in range(2, num_views):
        pairs += [(0, j), (1, j)]
    return pairs


def _view_counts(num_views: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """How many pairs each view is in: the globals 1 + N each, every local 2."""
    counts = torch.full((num_views,), 2.0, dtype=dtype, device=device)
    counts[:2] = num_views - 1
    return counts


class _PairTerms(torch.autograd.Function):
    r"""The pair terms of the loss (all but the diversity), with an analytic backward.

    Inputs ``alpha, tau, eps, z_1 .. z_V`` (each (B, C); z_1, z_2 the global views, the rest
    local); p_v = softmax(z_v / tau), l_v = log(p_v + eps), and ``x . y`` is the sum over all
    B x C entries of x * y. Outputs:

    * ``pair_loss``  F = (alpha - 1) S - w X = consistency + alpha * sharpness: the loss but
      its diversity term, as an output of its own so that the usual backward from ``loss``
      alone brings no gradient to S and X, and with alpha = 1 no sharpness term at all;
    * ``sharpness``  S = -(1 / B) * sum_v w_v (p_v . l_v): mean_i H_eps(p_v,i) of every view,
      weighted by w_v = c_v w, c_v the number of pairs view v is in (:func:`_view_counts`)
      and w = 1 / (2 * number of pairs);
    * ``cross``      X = (1 / B) * sum_v p_v . L_v, with L_v the sum of l_u over the partners u
      of view v: mean_i sum_c p_a log(p_b + eps) of every pair (a, b), in both orders. The
      consistency is -S - w X (per pair 0.5 (KL(a||b) + KL(b||a)) = 0.5 (-H_a - H_b -
      X(a, b) - X(b, a)));
    * ``mean_p``     (V, C): each view's mean probability over the local batch. The caller
      forms the diversity from it in ordinary autograd (through the differentiable
      all-reduce); its gradient comes back here and is passed on to the logits.

    A local view's partners are the two globals, L_v = Lg = l_1 + l_2 for every local; a
    global's are the other global and all locals, L_1 = l_2 + Lloc and L_2 = l_1 + Lloc with
    Lloc the sum over the locals; likewise P_v, Pg and Ploc for the p's. So
    X = (1 / B) * (Pg . Lg - p_1 . l_1 - p_2 . l_2 + Pg . Lloc + Ploc . Lg).

    Backward. p_v . l_v holds p_v twice, as itself and inside l_v = log(p_v + eps), whose
    derivative is 1 / (p_v + eps); in X, p_v meets its partners' l as the left factor and
    its partners' p through l_v (pairing is symmetric)::

        dS/dp_v        = -(w_v / B) * (l_v + p_v / (p_v + eps))
        dX/dp_v        =  (1 / B)   * (L_v + P_v / (p_v + eps))
        dmean_p_v/dp_v =  1 / B                                    (for every sample i)

    With g_F, g_S, g_X, g_m the incoming gradients of the four outputs, S and X receive
    c_S = (alpha - 1) g_F + g_S and c_X = -w g_F + g_X; with a_v = -c_S w_v / B, b = c_X / B
    and p / (p + eps) = 1 - eps / (p + eps)::

        G_v = dL/dp_v = b L_v + (b P_v - eps a_v) / (p_v + eps) + a_v l_v + g_m,v / B + a_v

    The softmax's Jacobian-vector product gives the logits' gradient, per sample::

        dL/dz_v = (1 / tau) * p_v * (G_v - sum_c p_v G_v)

    which maps a constant to zero (the p_v of a sample sum to 1): the last a_v drops. With
    c_S = 0 by construction (alpha = 1 and nothing differentiates S itself) the a_v terms are
    skipped. All locals share L_v, P_v and a_v, so their b L_v and b P_v - eps a_v are formed
    once; per view the backward is p_v + eps, one division added to b L_v, a_v l_v if any,
    g_m and the fused softmax backward. The forward is one streaming pass over the views,
    using each for everything it enters while still in cache. No (V, B, C) temporaries;
    saved: p_v, l_v and the sums over the globals and over the locals. Arithmetic in
    float32, or float64 when the logits are float64 (bf16/fp16 logits are promoted to
    float32 first, as x.to(float32)); the sums over B x C terms are torch's pairwise
    reductions (a BLAS dot product accumulates them in float32 and loses digits).
    """

    @staticmethod
    def forward(ctx, alpha: float, tau: float, eps: float, *views: torch.Tensor):
        num_views, batch = len(views), views[0].shape[0]
        dtype = torch.promote_types(views[0].dtype, torch.float32)
        w = 1.0 / (2 * len(view_pairs(num_views)))
        ones = torch.full((batch,), 1.0 / batch, dtype=dtype, device=views[0].device)
        probs, logs, self_terms, means = [], [], [], []
        p_loc = l_loc = None
        for v, x in enumerate(views):
            z = x.to(dtype)
            if tau != 1.0:
                z = z / tau
            p = torch.softmax(z, dim=-1)
            # log(p + eps), in z's memory when z is a temporary of ours
            logp = (torch.add(p, eps, out=z) if z is not x and z.is_contiguous() else p + eps).log_()
            # everything p and logp enter, while they are in cache
            if v == 0:
                scratch = torch.empty_like(p)
            self_terms.append(_dot(p, logp, scratch))
            means.append(ones @ p)
            if v == 1:  # the sums over the globals ...
                p_glob, l_glob = probs[0] + p, logs[0] + logp
            elif v == 2:  # ... and over the locals
                p_loc, l_loc = p, logp
            elif v == 3:
                p_loc, l_loc = p_loc + p, l_loc + logp
            elif v > 3:
                p_loc.add_(p)
                l_loc.add_(logp)
            probs.append(p)
            logs.append(logp)
        self_terms = torch.stack(self_terms)
        weights = w * _view_counts(num_views, dtype, self_terms.device)
        sharpness = -(weights * self_terms).sum() / batch
        cross = _dot(p_glob, l_glob, scratch) - self_terms[:2].sum()
        if p_loc is not None:
            cross = cross + _dot(p_glob, l_loc, scratch) + _dot(p_loc, l_glob, scratch)
        cross = cross / batch
        ctx.save_for_backward(*probs, *logs, p_glob, l_glob, p_loc, l_loc)
        ctx.alpha, ctx.tau, ctx.eps, ctx.w, ctx.weights = alpha, tau, eps, w, weights
        ctx.in_dtypes = [x.dtype for x in views]
        ctx.set_materialize_grads(False)  # outputs nobody differentiates get None, not zeros
        return (alpha - 1.0) * sharpness - w * cross, sharpness, cross, torch.stack(means)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_s, grad_x, grad_mean):
        n = len(ctx.in_dtypes)
        saved = ctx.saved_tensors
        probs, logs = saved[:n], saved[n:2 * n]
        p_glob, l_glob, p_loc, l_loc = saved[2 * n:]
        scale = 1.0 / (probs[0].shape[0] * ctx.tau)  # 1 / B, and the softmax's 1 / tau
        c_s = grad_s  # None: no sharpness term
        if grad_f is not None and ctx.alpha != 1.0:
            c_s = (ctx.alpha - 1.0) * grad_f + (0.0 if c_s is None else c_s)
        c_x = torch.zeros((), dtype=probs[0].dtype, device=probs[0].device)
        if grad_f is not None:
            c_x = c_x - ctx.w * grad_f
        if grad_x is not None:
            c_x = c_x + grad_x
        a = None if c_s is None else -c_s * ctx.weights * scale  # (V,)
        b = c_x * scale
        grad_mean = None if grad_mean is None else grad_mean * scale
        grads = [None] * n
        g = torch.empty_like(probs[0])
        for v in reversed(range(n)):  # the last views' tensors are the likeliest still in cache
            if v < 2 or v == n - 1:  # each global's b L_v and b P_v - eps a_v, then the locals'
                if v >= 2:
                    outside, numer = l_glob * b, p_glob * b
                elif p_loc is None:
                    outside, numer = logs[1 - v] * b, probs[1 - v] * b
                else:
                    if v == 1:  # b Lloc and b Ploc, for both globals
                        l_loc, p_loc = l_loc * b, p_loc * b
                    outside = torch.addcmul(l_loc, logs[1 - v], b)
                    numer = torch.addcmul(p_loc, probs[1 - v], b)
                if a is not None:
                    numer.sub_(ctx.eps * a[v])
            torch.add(probs[v], ctx.eps, out=g)
            torch.div(numer, g, out=g).add_(outside)
            if a is not None:
                g.addcmul_(logs[v], a[v])
            if grad_mean is not None:
                g.add_(grad_mean[v])
            # p * (g - sum_c p g): the softmax backward, as one fused kernel
            grads[v] = torch._softmax_backward_data(g, probs[v], -1, g.dtype).to(ctx.in_dtypes[v])
        return (None, None, None, *grads)


def _dot(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Sum over all entries of x * y by torch's pairwise summation, the product in ``scratch``."""
    return torch.mul(x, y, out=scratch).sum()


class TwistLoss(nn.Module):
    """TWIST loss over a list of view logits ``[g1, g2, l1, ..., lN]``, each (B, C).

    Args:
        alpha: weight of the sharpness term (1 for ResNet recipes, 0.4 for ViT + EMA).
        beta: weight of the diversity term (1 in all recipes).
        tau: softmax temperature; p = softmax(z / tau).
        eps: constant inside every log.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, tau: float = 1.0, eps: float = 1e-5):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.alpha, self.beta, self.tau, self.eps = float(alpha), float(beta), float(tau), float(eps)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, tau={self.tau}, eps={self.eps}"

    # -------------------------------------------------------------------- helpers
    def _probs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(z / tau) and log(p + eps), in float32 or wider."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        p = torch.softmax(z.to(dtype) / self.tau, dim=-1)
        return p, torch.log(p + self.eps)

    def _entropy(self, mean_p: torch.Tensor) -> torch.Tensor:
        """H_eps over the last dimension: -sum_c m log(m + eps) of each batch-mean distribution."""
        return -(mean_p * torch.log(mean_p + self.eps)).sum(dim=-1)

    def _diversity(self, p: torch.Tensor) -> torch.Tensor:
        """H_eps of the (global) batch-mean distribution of one view."""
        return self._entropy(all_reduce_mean(p.mean(dim=0)))

    @staticmethod
    def _check(views: Sequence[torch.Tensor], what: str) -> None:
        if len(views) < 1:
            raise ValueError(f"{what}: no views given")
        shape = views[0].shape
        if len(shape) != 2:
            raise ValueError(f"{what}: each view's logits must be (B, C), got {tuple(shape)}")
        for v in views:
            if v.shape != shape:
                raise ValueError(f"{what}: all views must have the same shape, got {tuple(shape)} and {tuple(v.shape)}")

    # -------------------------------------------------------------------- forward
    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, *more: torch.Tensor,
                teacher: Sequence[torch.Tensor] | None = None) -> TwistTerms:
        """Compute the loss.

        Args:
            views: list of logits ``[g1, g2, l1, ...]`` (or ``z1, z2, ...`` as positional
                arguments); the first two are the global views.
            teacher: optional EMA-teacher logits for the global views. Then the consistency
                is the mean of KL(teacher_i || student_j) over all i, j != i (METHOD.md
                section 5), and sharpness / diversity are averaged over all student views.
        """
        if isinstance(views, torch.Tensor):
            views = [views, *more]
        else:
            views = list(views) + list(more)
        self._check(views, "student views")
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            if teacher is not None:
                return self._with_teacher(views, list(teacher))
            return self._pairs(views)

    def _pairs(self, views: list[torch.Tensor]) -> TwistTerms:
        n = len(views)
        weight = 1.0 / (2 * len(view_pairs(n)))
        # The pair terms in one fused pass with an analytic backward (_PairTerms), plus each
        # view's local batch-mean probability, from which the diversity is formed here in
        # ordinary autograd, so that the all-reduce over processes keeps its own backward.
        pair_loss, sharpness, cross, mean_p = _PairTerms.apply(self.alpha, self.tau, self.eps, *views)
        mean_p = all_reduce_mean(mean_p)  # (V, C): each view's mean over the global batch
        div = self._entropy(mean_p)  # H_eps of each view's mean
        diversity = weight * (_view_counts(n, div.dtype, div.device) * div).sum()
        # Per pair: 0.5 * (KL(a||b) + KL(b||a)) = 0.5 * (-H_a - H_b - X(a,b) - X(b,a)).
        consistency = -sharpness - weight * cross
        loss = pair_loss - self.beta * diversity  # pair_loss = consistency + alpha * sharpness
        return TwistTerms(loss, consistency, sharpness, diversity)

    def _with_teacher(self, views: list[torch.Tensor], teacher: list[torch.Tensor]) -> TwistTerms:
        self._check(teacher, "teacher views")
        if teacher[0].shape != views[0].shape:
            raise ValueError("teacher and student logits must have the same shape")
        if len(teacher) > len(views):
            raise ValueError("more teacher views than student views")
        probs, logs = zip(*(self._probs(z) for z in views))
        ent = [-(p * lp).sum(dim=1).mean() for p, lp in zip(probs, logs)]
        sharpness = torch.stack(ent).mean()
        diversity = torch.stack([self._diversity(p) for p in probs]).mean()
        kls = []
        for i, t in enumerate(teacher):
            pt, lt = self._probs(t.detach())
            neg_ht = (pt * lt).sum(1)
            for j in range(len(views)):
                if j != i:
                    kls.append((neg_ht - (pt * logs[j]).sum(1)).mean())
        consistency = torch.stack(kls).mean()
        loss = consistency + self.alpha * sharpness - self.beta * diversity
        return TwistTerms(loss, consistency, sharpness, diversity)

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
probabilities and logs. The arithmetic runs in float32 (or float64 when given float64) even
under autocast, since entropies of bf16 probabilities are too coarse to train on.

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

    def _diversity(self, p: torch.Tensor) -> torch.Tensor:
        """H_eps of the (global) batch-mean distribution of one view."""
        mean_p = all_reduce_mean(p.mean(dim=0))
        return -(mean_p * torch.log(mean_p + self.eps)).sum()

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
        num_pairs = len(view_pairs(n))
        probs, logs = zip(*(self._probs(z) for z in views))
        ent = [-(p * lp).sum(dim=1).mean() for p, lp in zip(probs, logs)]  # mean_i H_eps(p_i)
        div = [self._diversity(p) for p in probs]
        # How many pairs each view is in: globals 1 + N, locals 2.
        count = [1 + (n - 2), 1 + (n - 2)] + [2] * (n - 2)
        weight = 1.0 / (2 * num_pairs)
        sharpness = weight * sum(c * h for c, h in zip(count, ent))
        diversity = weight * sum(c * d for c, d in zip(count, div))

        # Cross terms X(a, b) = mean_i sum_c p_a * log(p_b + eps), summed over both orders of
        # every pair. For a global view g and all locals at once:
        #   sum_j X(g, j) + X(j, g) = mean_i sum_c (p_g * sum_j logp_j + (sum_j p_j) * logp_g)
        cross = ((probs[0] * logs[1]).sum(1) + (probs[1] * logs[0]).sum(1)).mean()
        if n > 2:
            p_loc = torch.stack(probs[2:]).sum(0)
            l_loc = torch.stack(logs[2:]).sum(0)
            for g in (0, 1):
                cross = cross + ((probs[g] * l_loc).sum(1) + (p_loc * logs[g]).sum(1)).mean()
        # Per pair: 0.5 * (KL(a||b) + KL(b||a)) = 0.5 * (-H_a - H_b - X(a,b) - X(b,a)).
        consistency = -sharpness - weight * cross
        loss = consistency + self.alpha * sharpness - self.beta * diversity
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

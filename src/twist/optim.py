"""Optimisers and schedules (METHOD.md section 7).

- Parameter groups: weights with two or more dimensions get weight decay (and LARS
  adaptation); biases and other 1-D parameters (BatchNorm) get neither, as in the release.
- LARS exactly as the release (bytedance/TWIST ``lars.py``, class ``LARS_OPENSELF``): for each
  adapted weight the local rate is ``eta * ||w|| / (||g|| + wd * ||w||)`` (the norms of the
  gradient and of the weight, not of the decayed update), the update ``lr * local * (g + wd * w)``
  -- learning rate included -- goes into the heavy-ball buffer ``buf = m * buf + update``, and
  ``w -= buf``. Because the rate is folded into the buffer, a step remembers the rates of earlier
  steps (this matters while the rate changes, in the warm-up and the cosine). Excluded
  parameters (biases, BatchNorm) use local rate 1 and no decay (their group's weight decay is 0).
- Schedules are per optimiser step: linear warm-up from 0 then cosine to lr * min_lr_ratio;
  weight decay follows a cosine from weight_decay to weight_decay_end.

Example::

    >>> import torch
    >>> from twist.optim import LARS
    >>> w = torch.nn.Parameter(torch.ones(3, 3))
    >>> opt = LARS([{"params": [w]}], lr=0.1, weight_decay=0.0, momentum=0.9)
    >>> w.grad = torch.ones(3, 3); opt.step()
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from twist.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with the TWIST release's formula (``lars.py``).

    For a parameter ``w`` of a group with learning rate ``lr``, weight decay ``wd``, momentum
    ``m`` and trust coefficient ``eta``::

        local = eta * ||w|| / (||g|| + wd * ||w||)     (1 in a group with lars_exclude=True)
        buf   = m * buf + lr * local * (g + wd * w)    (buf starts at 0)
        w     = w - buf

    Why this form and not ``||g + wd * w||`` with the rate applied after the momentum: it is the
    optimiser the published ResNet numbers were trained with. The only departure is a guard:
    where ``||g|| + wd * ||w||`` is 0 (a zero gradient without decay), where the release would
    divide by zero, the local rate is 1 (the update is zero then unless wd > 0, so nothing moves).
    A zero weight with a non-zero gradient gets local rate 0, as in the release.

    Optimiser states saved by twist before this formula (key ``mu``: the momentum of the
    un-scaled updates) are converted on the next step to ``lr * mu``, their equivalent buffer.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 1e-3):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                update = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["lars_exclude"]:
                    update.mul_(lr)
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    denom = torch.linalg.vector_norm(g) + wd * w_norm
                    local = torch.where(denom > 0, group["eta"] * w_norm / denom.clamp_min(1e-38),
                                        torch.ones_like(denom))
                    update.mul_(local * lr)
                state = self.state[p]
                if "mu" in state:  # a state saved before the release formula: mu held un-scaled updates
                    state["momentum_buffer"] = state.pop("mu").mul_(lr)
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(update)
                p.sub_(buf)
        return loss


# ViT tokens and position embeddings are not weights to shrink (the release excludes them too).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases / 1-D params / ViT tokens (neither)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if excluded else decay).append(p)
    groups = [{"params": decay, "apply_wd": True}]
    if no_decay:
        groups.append({"params": no_decay, "apply_wd": False, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by cfg.name; ``lr`` is the already batch-scaled peak rate."""
    groups = param_groups(model)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser '{cfg.name}'")


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up from warmup_start to base, then cosine to final."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    rest = total_steps - warmup_steps
    t = np.arange(rest) / max(rest - 1, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, cos])


def set_step_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None) -> None:
    """Apply this step's learning rate and weight decay to every group (decay only where allowed)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if weight_decay is not None and group.get("apply_wd", True):
            group["weight_decay"] = weight_decay

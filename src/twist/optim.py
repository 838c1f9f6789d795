"""Optimisers and schedules (METHOD.md section 7).

- Parameter groups: weights with two or more dimensions get weight decay (and LARS
  adaptation); biases and other 1-D parameters (BatchNorm) get neither, as in the release.
- LARS, the release's variant: for each adapted weight, the update g + wd * w is rescaled by
  the trust ratio eta * ||w|| / ||g + wd * w|| (1 where either norm is 0), then heavy-ball
  momentum is applied. Excluded parameters follow plain momentum SGD.
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
    """Layer-wise adaptive rate scaling, as in the TWIST/SwAV/Barlow Twins releases.

    A group with ``lars_exclude=True`` (biases, BatchNorm) gets no weight decay and no
    trust-ratio scaling.
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not group["lars_exclude"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(d_p)
                    one = torch.ones_like(w_norm)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, one)
                    d_p = d_p.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d_p)
                p.add_(mu, alpha=-group["lr"])
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

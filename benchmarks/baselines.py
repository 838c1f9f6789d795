"""Baselines for ``benchmarks/quality.py``: other self-supervised objectives trained with the
same backbone, augmentation, optimiser, batch size and number of steps as a TWIST preset, plus
the training-free references (raw pixels, a randomly initialised backbone).

Everything reuses twist's pieces (``build_backbone``, ``TwistModel``, ``MultiCropAugment``,
``batch_loader``, ``build_optimizer``, ``cosine_schedule``, ``train_step``); only the head and
the loss differ per objective:

* ``iic``  -- IIC-style mutual-information clustering (Ji et al., 2019): the head of the TWIST
  preset (same C, same number of heads ``model.num_heads``, the lowest-loss head kept after
  every epoch as twist.train does -- IIC's own sub-heads; plus the over-clustering head when
  the preset has one, ``model.overcluster_classes``, as IIC's paper does) without the NBS, softmax outputs;
  loss = -I(y1; y2) of the symmetrised joint distribution of the two views' cluster
  assignments, averaged over the same view pairs as TWIST. Cluster ACC is the argmax of the
  kept head.
* ``simclr`` -- SimCLR's NT-Xent (Chen et al., 2020) on an MLP projection (D -> H -> 128, H the
  projector width: the TWIST heads' width but at least 1024),
  temperature 0.2, the views of a pair as positives and every other view of the batch as
  negatives. Cluster ACC comes from k-means on the backbone features.
* ``barlow`` -- Barlow Twins (Zbontar et al., 2021) on an MLP projector (D -> H -> H, BN+ReLU
  between), lambda = 1 / H (the off-diagonal weight scaled to the projector width), the loss
  divided by H so that its size does not depend on the width (the optimiser's learning rate
  then transfers from TWIST). Cluster ACC from k-means on the backbone features.

These are our own implementations of the published objectives, not the authors' code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twist.augment import MultiCropAugment
from twist.backbones import build_backbone
from twist.config import TwistConfig
from twist.data import ImageDataset, batch_loader
from twist.head import TwistHead
from twist.loss import view_pairs
from twist.model import TwistModel
from twist.optim import build_optimizer, cosine_schedule, set_step_values
from twist.runtime import seed_everything
from twist.stage import train_step

OBJECTIVES = ("iic", "simclr", "barlow")


@dataclass
class Terms:
    """What :func:`twist.train.train_step` needs from a criterion's result."""
    loss: torch.Tensor
    head_losses: torch.Tensor | None = None


# ---------------------------------------------------------------------- losses
class IICLoss(nn.Module):
    """Negative mutual information between the cluster assignments of paired views."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def pair(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        p1, p2 = z1.float().softmax(1), z2.float().softmax(1)
        joint = p1.T @ p2 / p1.shape[0]
        joint = ((joint + joint.T) / 2).clamp_min(self.eps)
        pi = joint.sum(1, keepdim=True)
        pj = joint.sum(0, keepdim=True)
        return -(joint * (joint.log() - pi.log() - pj.log())).sum()

    def forward(self, views, teacher=None) -> Terms:
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            pairs = view_pairs(len(views))
            return Terms(sum(self.pair(views[a], views[b]) for a, b in pairs) / len(pairs))


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross-entropy over a pair of views (2B - 2 negatives)."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.t = temperature

    def pair(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        n = z1.shape[0]
        sim = z @ z.T / self.t
        sim.fill_diagonal_(-math.inf)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)

    def forward(self, views, teacher=None) -> Terms:
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            pairs = view_pairs(len(views))
            return Terms(sum(self.pair(views[a], views[b]) for a, b in pairs) / len(pairs))


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins: cross-correlation of the standardised embeddings pushed to the identity."""

    def __init__(self, dim: int, lambd: float | None = None):
        super().__init__()
        self.dim = dim
        self.lambd = 1.0 / dim if lambd is None else lambd

    def pair(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = z1.float(), z2.float()
        n = z1.shape[0]
        z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-5)
        z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-5)
        c = z1.T @ z2 / n
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return (on + self.lambd * off) / self.dim

    def forward(self, views, teacher=None) -> Terms:
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            pairs = view_pairs(len(views))
            return Terms(sum(self.pair(views[a], views[b]) for a, b in pairs) / len(pairs))


# ---------------------------------------------------------------------- models
def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def default_projector_dim(cfg: TwistConfig) -> int:
    """SimCLR's and Barlow Twins' projector width unless given: the TWIST heads' width, but never
    below 1024, so that narrowing TWIST's heads (cheaper, and no worse for TWIST) never narrows a
    baseline's projector too. Both objectives are known to prefer wide projectors."""
    return max(cfg.model.hidden_dim, 1024)


def build_objective(kind: str, cfg: TwistConfig, channels: int,
                    projector_dim: int | None = None) -> tuple[TwistModel, nn.Module]:
    """The network (twist's backbone + an objective-specific head) and the criterion.

    IIC gets the TWIST preset's heads (same C, count and width, without the NBS); SimCLR and
    Barlow Twins get an MLP projector of width ``projector_dim`` (default
    :func:`default_projector_dim`)."""
    m = cfg.model
    backbone = build_backbone(m, channels)
    d = backbone.feature_dim
    w = projector_dim or default_projector_dim(cfg)
    if kind == "iic":  # as many heads as the TWIST preset (IIC's own sub-heads), lowest loss kept
        heads = [TwistHead(d, m.hidden_dim, m.num_classes, m.activation, nbs=False) for _ in range(m.num_heads)]
        # and, when the preset has one, the over-clustering head (IIC's own auxiliary head)
        aux = [TwistHead(d, m.hidden_dim, m.overcluster_classes, m.activation, nbs=False)] \
            if m.overcluster_classes else None
        return TwistModel(backbone, heads[0], heads[1:], aux), IICLoss()
    if kind == "simclr":
        return TwistModel(backbone, _mlp(d, w, 128, 2)), NTXentLoss(0.2)
    if kind == "barlow":
        return TwistModel(backbone, _mlp(d, w, w, 3)), BarlowTwinsLoss(w)
    raise ValueError(f"unknown objective {kind!r}; choose from {', '.join(OBJECTIVES)}")


def train_objective(kind: str, cfg: TwistConfig, dataset: ImageDataset, mean, std, *, device: torch.device,
                    precision: str, projector_dim: int | None = None,
                    log=print) -> tuple[TwistModel, dict[str, Any]]:
    """Train objective ``kind`` with the preset's optimiser, schedule, augmentation, batch size
    and epochs (the same number of optimiser steps as TWIST), in one process."""
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    projector_dim = projector_dim or default_projector_dim(cfg)
    model, criterion = build_objective(kind, cfg, dataset.channels, projector_dim)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    augment = MultiCropAugment(cfg.augment, dataset.channels, mean, std)
    bs, epochs = cfg.train.batch_size, cfg.train.epochs
    steps_per_epoch = len(dataset) // bs
    total = steps_per_epoch * epochs
    peak = cfg.optim.lr * bs / 256
    lr_s = cosine_schedule(peak, peak * cfg.optim.min_lr_ratio, total, round(cfg.optim.warmup_epochs * steps_per_epoch))
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd_s = cosine_schedule(cfg.optim.weight_decay, wd_end, total)
    optimizer = build_optimizer(model, cfg.optim, peak)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000)
    step, skipped = 0, 0
    losses: list[float] = []
    promoted: list[int] = []
    for epoch in range(epochs):
        model.train()
        loader = batch_loader(dataset, bs, shuffle=True, drop_last=True, seed=cfg.train.seed, epoch=epoch)
        run = 0.0
        head_sums = torch.zeros(len(model.trained_heads), dtype=torch.float64)
        for images, _ in loader:
            set_step_values(optimizer, float(lr_s[step]), float(wd_s[step]))
            views = [v.contiguous(memory_format=memory_format) for v in augment(images.to(device), gen)]
            terms, finite = train_step(model, criterion, optimizer, views, device=device, precision=precision,
                                       clip_grad=cfg.optim.clip_grad)
            skipped += int(not finite)
            run += float(terms.loss.detach()) if finite else 0.0
            if finite and terms.head_losses is not None:
                head_sums += terms.head_losses.double().cpu()
            step += 1
        losses.append(run / max(steps_per_epoch, 1))
        if len(model.heads) > 1:  # the lowest-loss classifier head becomes the model's head, as twist.train does
            promoted.append(model.promote_lowest(head_sums, optimizer))
        log(f"  {kind}: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}")
    model.eval()
    return model, {"steps": step, "skipped_steps": skipped,
                   "projector_dim": projector_dim if kind in ("simclr", "barlow") else None,
                   "final_loss": losses[-1] if losses else None,
                   "heads": len(model.heads), "promoted_heads": promoted, "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def calibrate_bn(model: nn.Module, dataset: ImageDataset, transform, device: torch.device, batches: int = 20,
                 batch_size: int = 256, seed: int = 0) -> None:
    """Running BatchNorm statistics of an untrained network from a few training batches
    (cumulative average), so that its eval-mode features are those of the random weights and
    not of BN's initial running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    loader = batch_loader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed, epoch=0)
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        model(transform(images.to(device)))
    model.eval()


def as_features(x: torch.Tensor) -> np.ndarray:
    """Flattened float32 numpy rows (raw pixels in [0, 1] when given uint8 images)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return x.reshape(len(x), -1).float().numpy()

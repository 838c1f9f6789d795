"""The TWIST projection head and its NBS (METHOD.md section 3).

    features -> Linear(D, H) -> BN -> act -> Linear(H, H) -> BN -> act -> Linear(H, C) -> NBS

NBS is a BatchNorm over the C logits with no affine parameters. It is what keeps TWIST from
collapsing: each class logit is standardised across the batch, so no class can dominate every
sample and no class can be silent. The head runs once on the features of all views together,
so the NBS statistics are those of every crop in the batch.

Module names mirror the authors' release (``projection_head.{0,4}`` Linear,
``projection_head.{1,5}`` BatchNorm, ``last_linear``, ``norm``) so that importing their
checkpoints is a prefix rename. Position 3 of ``projection_head`` holds no parameters in the
release; an ``Identity`` keeps the indices aligned.

``layers=2`` drops the hidden H x H layer (features -> Linear(D, H) -> BN -> act -> Linear(H, C)
-> NBS; ``projection_head.{0,1,2}`` only). Not the paper's head: it is for cheap candidate heads
on small backbones, where the H x H product costs more than the backbone (an H = 2048 head on
D = 128 features is about 16x cheaper with two layers than with three).

Example::

    >>> import torch
    >>> from twist.head import TwistHead
    >>> head = TwistHead(512, hidden_dim=1024, num_classes=10)
    >>> head(torch.randn(16, 512)).shape
    torch.Size([16, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class TwistHead(nn.Module):
    """Projection head ending in C logits, normalised by a non-affine BatchNorm (NBS).

    Args:
        in_dim: backbone feature dimension D.
        hidden_dim: hidden width H (4096 in the paper).
        num_classes: number of classes C of the softmax.
        activation: "relu" (ResNet recipes) or "gelu" (ViT recipes).
        nbs: apply the NBS; turning it off is only for ablations (training collapses).
        vit_init: trunc-normal(std 0.02) weights and zero biases, as the ViT recipes do.
        layers: 3 (the paper) or 2 (no hidden H x H layer; see the module docstring).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, num_classes: int = 1000,
                 activation: str = "relu", nbs: bool = True, vit_init: bool = False, layers: int = 3):
        super().__init__()
        if layers not in (2, 3):
            raise ValueError(f"layers must be 2 or 3, got {layers}")
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        # built in module order, so a seed gives the three-layer head the initialisation it always had
        modules = [nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), act()]
        if layers == 3:
            modules += [nn.Identity(), nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), act()]
        self.projection_head = nn.Sequential(*modules)
        self.last_linear = nn.Linear(hidden_dim, num_classes)
        self.norm = nn.BatchNorm1d(num_classes, affine=False) if nbs else nn.Identity()
        self.num_classes = num_classes
        if vit_init:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.last_linear(self.projection_head(features)))

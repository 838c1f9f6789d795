"""The TWIST network: backbone -> projection head -> NBS -> logits (METHOD.md section 3).

With multi-crop, views of one resolution go through the backbone together (one call per
resolution, so its BatchNorm statistics are per resolution, as in the release) and the head
runs once on the features of every view, so the NBS normalises over all crops of the batch.

Example::

    >>> import torch
    >>> from twist.config import get_preset
    >>> from twist.model import build_model
    >>> model = build_model(get_preset("digits").model, in_channels=1)
    >>> views = [torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.randn(4, 1, 12, 12)]
    >>> [z.shape for z in model(views)]
    [torch.Size([4, 10]), torch.Size([4, 10]), torch.Size([4, 10])]
"""

from __future__ import annotations

import torch
from torch import nn

from twist.backbones import build_backbone
from twist.config import ModelConfig
from twist.head import TwistHead


class TwistModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: TwistHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def backbone_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, one backbone call per run of equal-sized views."""
        feats = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            batch = views[start] if end == start + 1 else torch.cat(views[start:end])
            feats.append(self.backbone(batch))
            start = end
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Logits for each view: a list of (B, C) tensors in the order of ``views``."""
        if isinstance(views, torch.Tensor):
            views = [views]
        logits = self.head(self.backbone_views(views))
        return list(logits.split([v.shape[0] for v in views]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, D): the representation that is evaluated and exported."""
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of one batch; in eval mode the NBS uses running statistics."""
        return self.head(self.backbone(x))


def build_model(cfg: ModelConfig, in_channels: int = 3) -> TwistModel:
    backbone = build_backbone(cfg, in_channels)
    head = TwistHead(backbone.feature_dim, cfg.hidden_dim, cfg.num_classes, cfg.activation, cfg.nbs,
                     vit_init=cfg.backbone.startswith("vit_"))
    return TwistModel(backbone, head)

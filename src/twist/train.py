"""The TWIST training run, visible from top to bottom.

    images (uint8, in memory or streamed) -> batched on-device augmentation -> views
    -> backbone once per resolution -> head + NBS once on all views -> TwistLoss
    -> backward -> (clip) -> optimiser step with per-step lr / weight-decay schedules
    -> per epoch: cluster metrics + kNN when labels exist, metrics.jsonl, atomic checkpoint
    -> the self-labeling stage when the recipe has one (twist.selflabel)

:func:`train` reads as the run goes: set-up, resume, a loop of :meth:`StageRunner.train_one_epoch`,
end of run. This module holds what is particular to the TWIST stage (its step, its schedules,
its metrics fields, its checkpoint); twist.stage holds what every stage shares (non-finite
policy, checkpoints, metrics lines, TensorBoard, progress).

Runs on CPU or GPU, one process or many (``torchrun ... -m twist train``). A run folder that
already holds a checkpoint is resumed from it, so re-running the same command after a crash
continues where it stopped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twist import distributed as tdist
from twist.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropAugment, dataset_stats
from twist.config import ConfigError, TwistConfig
from twist.data import ImageDataset, Listing, ViewPlan, load_dataset
from twist.io import write_text_atomic
from twist.loss import TwistLoss
from twist.model import build_model
from twist.optim import build_optimizer, cosine_schedule, set_step_values
from twist.runtime import keep_freed_cpu_memory, resolve_device, resolve_precision, seed_everything, unwrap
from twist.selflabel import STAGE as SELFLABEL, run_selflabel
from twist.session import TrainingSession
from twist.stage import (METRICS_NAME, SKIPPED_NAME, Run, RunState, Stage, StageRunner, TrainingError, batch_to_device, compiled,
                         drop_unsaved_metrics, prepare_output, read_resume_checkpoint, report_skipped, restore_rng,
                         sweep_stale_temporaries, tensorboard, train_step)

logger = logging.getLogger(__name__)

__all__ = ["train", "TwistStage", "TwistStep", "TrainingError", "train_step", "preset_hint", "predictions_collapsed"]


# ---------------------------------------------------------------------- the run
def train(cfg: TwistConfig, data: str = "digits", out: str | Path = "runs/twist", *, progress: bool = True,
          max_steps: int | None = None, listing: Listing | None = None) -> dict[str, Any]:
    """Train TWIST on ``data`` and write checkpoints and metrics to ``out``.

    Args:
        cfg: the run's configuration (validated here).
        data: 'digits', an npz file, a folder of npz splits, or an image folder.
        out: run folder; if it holds a checkpoint, training resumes from it.
        progress: show progress bars.
        max_steps: stop after this many optimiser steps in total (tests, benchmarks).
        listing: the listing of an image folder ``data`` made already (the ``listing`` of
            :func:`twist.autopreset.summarize_data`, which ``twist train`` without --preset
            calls to choose the recipe), so that the folder is walked once, not twice.

    Returns the last epoch's metrics record. Raises :class:`twist.preempt.Preempted` after
    SIGTERM / SIGUSR1 (checkpoint written), ``RunFolderInUse`` when another process trains in
    ``out``, TrainingError when training cannot go on. ``out`` is locked and its status kept
    in ``status.json`` for the whole session (twist.session).
    """
    cfg.validate()
    with TrainingSession(out) as session:
        return train_session(cfg, str(data), Path(out), session, progress=progress, max_steps=max_steps,
                             listing=listing)


def train_session(cfg: TwistConfig, data: str, out: Path, session: TrainingSession, *, progress: bool,
                  max_steps: int | None, listing: Listing | None = None) -> dict[str, Any]:
    """:func:`train` inside its session: set-up, resume, the TWIST epochs, self-labeling, end."""
    run = start_run(cfg, data, out, progress, session, listing)
    model, teacher = build_networks(cfg, run)
    stage = TwistStage(run, model, teacher)
    state, epoch_sums, selflabel_checkpoint = resume(run, stage)
    runner = StageRunner(run, stage, state, epoch_sums=epoch_sums, max_steps=max_steps)
    run.writer = tensorboard(run.out) if run.main and cfg.train.tensorboard else None
    announce(run, runner.steps_per_epoch)

    last: dict[str, Any] = {}
    warned_collapse = False
    for epoch in range(state.epoch, cfg.train.epochs):
        record = runner.train_one_epoch(epoch)
        if record is not None:
            last = record
            warned_collapse = warned_collapse or warn_if_collapsed(run, record)
        if runner.stopped:
            break

    if runner.preempted and (state.epoch < cfg.train.epochs or cfg.selflabel.epochs > 0):  # else the run is done
        session.stop.stop(f"optimiser step {state.global_step}")
    if cfg.selflabel.epochs > 0 and state.epoch >= cfg.train.epochs and not runner.stopped:
        last = run_selflabel(run, model, teacher, vars(state), resume_from=selflabel_checkpoint,
                             max_steps=None if max_steps is None else max_steps - state.global_step) or last
    if run.writer is not None:
        run.writer.close()
    tdist.barrier()  # no rank leaves before rank 0 has written its last files
    return last


# ---------------------------------------------------------------------- set-up
def start_run(cfg: TwistConfig, data: str, out: Path, progress: bool, session: TrainingSession | None = None,
              listing: Listing | None = None) -> Run:
    """Device, processes and precision; the run folder (locked for ``session`` and proved
    writable before any data is loaded); the training and validation data (an image folder from
    ``listing`` when one is given) and their normalisation."""
    device = resolve_device(cfg.train.device)
    tdist.init_from_env(device.type)
    rank, world = tdist.rank(), tdist.world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    if rank == 0:
        prepare_output(out, session)

    image_size = cfg.train.image_size or cfg.augment.global_size
    dataset = load_dataset(data, "train", image_size=image_size, bad_files=cfg.train.bad_files, scan=cfg.train.scan,
                           max_memory_gb=cfg.train.max_memory_gb, progress=progress and rank == 0,
                           crop_size=cfg.augment.global_size,
                           index_path=out / DATA_INDEX_NAME if rank == 0 else None,  # see DATA_INDEX_NAME
                           listing=listing)
    skipped_written = 0
    if rank == 0:
        if not dataset.skipped and (out / SKIPPED_NAME).exists():
            (out / SKIPPED_NAME).unlink()  # a list from an earlier session whose files are now fine
        skipped_written = report_skipped(dataset, out, 0)
    if cfg.train.batch_size * world > len(dataset):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {world} process(es) is larger than the "
                          f"dataset ({len(dataset)} images)")
    val = dataset
    if cfg.train.val_data:
        val = load_dataset(cfg.train.val_data, "test", image_size=image_size, bad_files=cfg.train.bad_files,
                           max_memory_gb=cfg.train.max_memory_gb, progress=False, crop_size=cfg.augment.global_size)
    mean, std = data_mean_std(cfg, dataset)
    data_info = {"channels": dataset.channels, "mean": list(mean), "std": list(std), "image_size": image_size,
                 "class_names": dataset.class_names, "source": data, "eval_resize": dataset.resize_side}
    return Run(cfg=cfg, out=out, device=device, precision=precision, rank=rank, world=world, progress=progress,
               dataset=dataset, val=val, eval_transform=EvalTransform(cfg.augment.global_size, dataset.channels, mean, std),
               data_info=data_info, skipped_written=skipped_written, session=session)


DATA_INDEX_NAME = "data_index.json"
"""Run-folder list of a streamed folder's images (twist.data.listing), so a resume lists nothing.
Streamed photo folders are listed once, their training views cut at decode time from the
original photos (``batch_loader(views=...)``; train.image_size then only sizes data held in
memory), and their evaluation batches are the release's centre crops (``crop_size``)."""

def data_mean_std(cfg: TwistConfig, dataset: ImageDataset) -> tuple[list[float], list[float]]:
    """The normalisation of the run: ImageNet's (train.normalize=imagenet, the release presets;
    RGB only), else the data's own: exact for data in memory, estimated from a seeded sample of
    500 evaluation crops for streamed folders (stored in the checkpoint with the weights)."""
    if cfg.train.normalize == "imagenet" and dataset.channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return dataset_stats(dataset.images if dataset.in_memory else dataset.sample_images(500, cfg.train.seed))


def build_networks(cfg: TwistConfig, run: Run) -> tuple[nn.Module, nn.Module | None]:
    """The model (DDP-wrapped with several processes) and the EMA teacher of the ViT recipes
    (None without one), with the same initial weights on every process."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, in_channels=run.dataset.channels).to(run.device)
    model = model.to(memory_format=run.memory_format)
    teacher = None
    if cfg.ema.enabled:
        from twist.ema import make_teacher

        teacher = make_teacher(model)
    if run.world > 1:
        from twist.parallel import convert_sync_batchnorm, wrap_distributed

        # backbone + hidden head BNs synchronised over all ranks, the NBS within bunches of ranks
        model = wrap_distributed(model, cfg.model.bunch_size, cfg.train.batch_size, run.device)
        if teacher is not None:
            convert_sync_batchnorm(teacher, cfg.model.bunch_size, cfg.train.batch_size, run.device)
        seed_everything(cfg.train.seed + 7919 * run.rank)  # per-rank streams for dropout / drop-path
    return model, teacher


def resume(run: Run, stage: TwistStage) -> tuple[RunState, dict[str, Any] | None, dict[str, Any] | None]:
    """Continue from the run folder's checkpoint when there is one: ``(state, the interrupted
    epoch's running sums or None, the checkpoint when it is a self-labeling one)``. Also writes
    config.json, drops metrics lines of epochs the checkpoint does not hold and sweeps
    temporary files of a killed save."""
    cfg, out = run.cfg, run.out
    ckpt = read_resume_checkpoint(run, unwrap(stage.model), stage.match)
    state, epoch_sums = RunState(), None
    if ckpt is not None:
        stage.load(ckpt)
        state = RunState(**ckpt["state"])
        check_global_batch(ckpt, state, run)
        restore_rng(ckpt, run.rank, stage.aug_gen)
        if state.step_in_epoch:  # the interrupted epoch's running loss sums, so its metrics are whole
            epoch_sums = ckpt.get("epoch_sums")
        if run.main:
            logger.info("resuming %s from epoch %d, step %d", out, state.epoch, state.global_step)
    if run.main:
        write_text_atomic(out / "config.json", cfg.to_json() + "\n")
        logged = state.epoch
        if ckpt is not None and ckpt.get("stage") == SELFLABEL:  # its epochs continue the TWIST count
            logged += int((ckpt.get(SELFLABEL) or {}).get("epoch", 0))
        drop_unsaved_metrics(out / METRICS_NAME, logged)
        sweep_stale_temporaries(out)
    return state, epoch_sums, ckpt if ckpt is not None and ckpt.get("stage") == SELFLABEL else None


def check_global_batch(ckpt: dict[str, Any], state: RunState, run: Run) -> None:
    """Steps per epoch, the schedules and the data order all follow the global batch: a run
    resumes mid-stage only with the global batch it was written with."""
    saved_world = len(ckpt.get("rng_per_rank") or {}) or 1
    saved_train = ckpt["config"].get("train") if isinstance(ckpt.get("config"), dict) else None
    batch = run.cfg.train.batch_size
    saved_batch = saved_train.get("batch_size", batch) if isinstance(saved_train, dict) else batch
    if state.global_step and saved_world * saved_batch != batch * run.world:
        raise TrainingError(f"{run.checkpoint_path} was written by {saved_world} process(es) x batch {saved_batch} = "
                            f"global batch {saved_world * saved_batch}; resume with the same global batch (now "
                            f"{run.world} x {batch} = {batch * run.world}), or start a new run folder")


def announce(run: Run, steps_per_epoch: int) -> None:
    """The run's one-line description (and a note when the preset does not suit the data)."""
    if not run.main:
        return
    cfg, ds = run.cfg, run.dataset
    logger.info("%d images, %dx%dx%d, %s -> C=%d, %d views, batch %d, %d epochs x %d steps, %s %s, %d process(es)",
                len(ds), ds.channels, ds.size[0], ds.size[1], cfg.model.backbone, cfg.model.num_classes,
                2 + cfg.augment.num_local, cfg.train.batch_size * run.world, cfg.train.epochs, steps_per_epoch,
                run.device.type, run.precision, run.world)
    hint = preset_hint(cfg, ds.channels)
    if hint:
        logger.info("note: %s", hint)
    if cfg.train.decode == "gpu":
        logger.info("note: %s", f"train.decode=gpu: JPEG views decoded and cut on {run.device}" if not ds.in_memory else
                    "train.decode=gpu is ignored: the data is held in memory and already cropped on the device "
                    "(it applies to streamed folders and tar shards)")


def warn_if_collapsed(run: Run, record: dict[str, Any]) -> bool:
    """Warn (rank 0) when the epoch shows the uniform collapse; True when it does."""
    cfg = run.cfg
    if not (run.main and predictions_collapsed(record, cfg.model.num_classes)):
        return False
    logger.warning("the head's predictions are uniform (consistency %.4f, sharpness %.4f of at most ln C = %.4f): "
                   "training has collapsed and will not recover. Keep loss.alpha >= loss.beta (now %s and %s) or "
                   "lower optim.lr; see docs/results.md", record["consistency"], record["sharpness"],
                   math.log(cfg.model.num_classes), cfg.loss.alpha, cfg.loss.beta)
    return True


# ---------------------------------------------------------------------- the TWIST stage
class TwistStep:
    """One optimiser step of the TWIST stage on a batch of uint8 images: schedule values,
    augmentation, :func:`twist.stage.train_step`, the EMA teacher, the values to log. What the
    stage runner calls per batch, and what benchmarks/throughput.py times."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, augment,
                 aug_gen: torch.Generator, schedules: tuple, *, device: torch.device, precision: str,
                 memory_format: torch.memory_format, scaler=None, clip_grad: float = 0.0,
                 teacher: nn.Module | None = None, forward_model: nn.Module | None = None) -> None:
        self.model, self.criterion, self.optimizer, self.augment, self.aug_gen = model, criterion, optimizer, augment, aug_gen
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = schedules
        self.device, self.precision, self.memory_format = device, precision, memory_format
        self.scaler, self.clip_grad, self.teacher = scaler, clip_grad, teacher
        self.forward_model = model if forward_model is None else forward_model

    def __call__(self, images: torch.Tensor, it: int) -> tuple[Any, bool, torch.Tensor | None]:
        set_step_values(self.optimizer, float(self.lr_schedule[it]), float(self.wd_schedule[it]))
        images = batch_to_device(images, self.device)
        views = [v.contiguous(memory_format=self.memory_format) for v in self.augment(images, self.aug_gen)]
        terms, finite = train_step(self.forward_model, self.criterion, self.optimizer, views, device=self.device,
                                   precision=self.precision, scaler=self.scaler, clip_grad=self.clip_grad,
                                   teacher=self.teacher)
        if not finite:
            return terms, False, None
        if self.teacher is not None:
            from twist.ema import update_teacher

            update_teacher(self.teacher, unwrap(self.model), float(self.momentum_schedule[it]))
        logged = [terms.loss, terms.consistency, terms.sharpness, terms.diversity]
        if terms.head_losses is not None:
            logged += list(terms.head_losses[1:])
        return terms, True, torch.stack(logged).detach().double().cpu()


class TwistStage(Stage):
    """The TWIST stage: loss, augmentation, per-step schedules, optimiser, and its log fields."""

    def __init__(self, run: Run, model: nn.Module, teacher: nn.Module | None) -> None:
        cfg = run.cfg
        self.run, self.cfg, self.model, self.teacher = run, cfg, model, teacher
        self.epochs = cfg.train.epochs
        self.view_plan = ViewPlan.from_augment(cfg.augment, cfg.train.seed)
        criterion = TwistLoss(cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau, cfg.loss.eps)
        info = run.data_info
        augment = MultiCropAugment(cfg.augment, info["channels"], info["mean"], info["std"])
        self.sizes = (cfg.augment.global_size, cfg.augment.local_size)
        forward_model = compiled(model, cfg)

        # schedules (per optimiser step) and optimiser
        steps_per_epoch = len(run.loader(0))
        total_steps = steps_per_epoch * cfg.train.epochs
        self.global_batch = cfg.train.batch_size * run.world
        peak_lr = cfg.optim.lr * self.global_batch / 256
        self.lr_schedule = cosine_schedule(peak_lr, peak_lr * cfg.optim.min_lr_ratio, total_steps,
                                           round(cfg.optim.warmup_epochs * steps_per_epoch))
        wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
        self.wd_schedule = cosine_schedule(cfg.optim.weight_decay, wd_end, total_steps)
        momentum_schedule = cosine_schedule(cfg.ema.momentum, cfg.ema.momentum_end, total_steps)
        self.optimizer = build_optimizer(model, cfg.optim, peak_lr)
        self.scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + run.rank)
        self.step = TwistStep(model, criterion, self.optimizer, augment, self.aug_gen,
                              (self.lr_schedule, self.wd_schedule, momentum_schedule), device=run.device,
                              precision=run.precision, memory_format=run.memory_format, scaler=self.scaler,
                              clip_grad=cfg.optim.clip_grad, teacher=teacher, forward_model=forward_model)
        self.n_candidates, self.n_trained_heads = len(unwrap(model).heads), len(unwrap(model).trained_heads)
        # running sums of loss, consistency, sharpness, diversity (+ the other heads' losses)
        self.num_logged = 4 + self.n_trained_heads - 1

    def start_epoch(self, epoch: int) -> None:
        """Progressive resizing (augment.progressive_start): the views of epoch ``epoch`` at its
        sizes; the augmentation and the decode-time plan are rebuilt only when they change."""
        sizes = self.cfg.augment.view_sizes(epoch, self.epochs)
        if sizes == self.sizes:
            return
        aug = self.cfg.augment.resized(sizes[0])
        info = self.run.data_info
        self.step.augment = MultiCropAugment(aug, info["channels"], info["mean"], info["std"])
        self.view_plan = ViewPlan.from_augment(aug, self.cfg.train.seed)
        self.sizes = sizes
        if self.run.main:
            logger.info("epoch %d: views of %d px (progressive resizing to %d px)", epoch + 1, sizes[0],
                        self.cfg.augment.global_size)

    def load(self, ckpt: dict[str, Any]) -> None:
        """Weights, optimiser, scaler and teacher from a checkpoint that passed check_resumable."""
        unwrap(self.model).load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is None:  # imported weights (twist import): fresh optimiser and schedule
            if self.run.main:
                logger.info("%s holds weights without optimiser state; starting a fresh optimiser",
                            self.run.checkpoint_path)
        elif ckpt.get("stage", "twist") == "twist":  # a self-labeling checkpoint holds that stage's optimiser
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        if self.teacher is not None and ckpt.get("teacher"):
            self.teacher.load_state_dict(ckpt["teacher"])

    def postfix(self, terms: Any, it: int) -> dict[str, str]:
        return {"loss": f"{terms.loss.item():.4f}", "lr": f"{self.lr_schedule[it]:.3g}"}

    def epoch_fields(self, epoch: int, means: torch.Tensor, state: RunState) -> dict[str, Any]:
        return {"epoch": epoch + 1, "step": state.global_step,
                "loss": means[0].item(), "consistency": means[1].item(), "sharpness": means[2].item(),
                "diversity": means[3].item(), "lr": float(self.lr_schedule[state.global_step - 1]),
                "weight_decay": float(self.wd_schedule[state.global_step - 1])}

    def end_epoch(self, record: dict[str, Any], means: torch.Tensor, state: RunState) -> None:
        if self.n_trained_heads > 1:
            # the classifier head with the lowest epoch loss becomes the model's head (same choice on
            # every rank); over-clustering heads (last) are trained but never candidates
            head_losses = means[[0, *range(4, len(means))]]
            best = unwrap(self.model).promote_lowest(head_losses, self.optimizer)
            if self.n_trained_heads > self.n_candidates:
                record["overcluster_loss"] = head_losses[self.n_candidates].item()
            record["head_losses"] = head_losses[:self.n_candidates].tolist()
            record["promoted_head"] = best
            drop = self.cfg.model.drop_heads_after
            if 0 < drop <= record["epoch"] and self.run.world == 1 and self.drop_losing_heads():
                state.heads_dropped = record["heads_dropped"] = True  # only the winner trains on

    def drop_losing_heads(self) -> bool:
        """model.drop_heads_after: delete the candidate heads other than the promoted one from
        the model and the optimiser (TwistModel.drop_losing_heads; kept with several processes,
        whose DDP reducer is built over every head); True when some were dropped."""
        if not unwrap(self.model).drop_losing_heads(self.optimizer):
            return False
        self.n_candidates, self.n_trained_heads = len(unwrap(self.model).heads), len(unwrap(self.model).trained_heads)
        self.num_logged = 4 + self.n_trained_heads - 1
        return True

    def match(self, ckpt: dict[str, Any]) -> None:
        """Before a checkpoint is checked and loaded: drop the losing heads when it was written
        after model.drop_heads_after had dropped them (the same model and optimiser groups)."""
        if ckpt["state"].get("heads_dropped") is True:
            self.drop_losing_heads()

    def checkpoint_payload(self, state: RunState, rng: dict[str, Any], epoch_sums: dict[str, Any] | None) -> dict:
        return {
            "format": "twist/1",
            "model": unwrap(self.model).state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": vars(state).copy(),
            "epoch_sums": epoch_sums,
            "rng_per_rank": rng,
            "config": self.cfg.to_dict(),
            "data": self.run.data_info,
        }


# ---------------------------------------------------------------------- notes for the user
def preset_hint(cfg: TwistConfig, channels: int) -> str | None:
    """A note for a recipe that does not suit the data, or None. `twist train PATH` without
    --preset uses the cifar10 preset (colour photos): on grayscale glyphs its horizontal flips
    change what a character is and it has no rotation or shear, so the head splits by slant
    (MNIST test ACC 0.857 with it against 0.98-0.99 with the mnist preset, docs/results.md)."""
    if channels == 1 and cfg.preset in ("cifar10", "cifar10-gpu") and cfg.augment.flip_p > 0:
        return (f"the images are grayscale and the {cfg.preset} preset is a recipe for colour photos "
                f"(horizontal flips, no rotation); for digits, letters or other glyphs --preset mnist "
                f"(or digits for 8-16 px images) does much better: MNIST test ACC 0.98 against 0.857")
    return None


def predictions_collapsed(record: dict[str, Any], num_classes: int) -> bool:
    """True when an epoch's mean terms show the uniform collapse: every prediction flat
    (sharpness, the mean per-sample entropy, at its maximum ln C) and the views trivially in
    agreement. The NBS does not rule it out: each class logit keeps unit variance over the batch
    while all C logits of an image move together. Seen on CIFAR-10 with alpha 0.5 < beta 1,
    where that solution's loss (alpha - beta) ln C beats what a confident run reaches early on."""
    return record["consistency"] < 0.01 and record["sharpness"] > 0.99 * math.log(num_classes)

"""The self-labeling stage (METHOD.md section 6), run after TWIST training in the same run.

The release's ResNet recipes end with a few epochs of self-labeling (derived from SCAN): the
network's own confident predictions become pseudo-labels for harder crops. Per batch:

1. Views: 2 global + N local crops with harder scales (``selflabel.global_scale`` 0.14-1,
   ``selflabel.local_scale`` 0.05-0.14); one forward pass of the student on all of them.
2. Weak anchor, per sample: of the two global views, the one whose softmax has the larger
   maximum probability (the first one on ties). With an EMA teacher, the teacher's logits of
   the two global views play this role instead of the student's. The anchor gives the target
   (its argmax) and the sample's confidence (its max-probability); no gradient flows into it.
3. Strong views, per sample: the other global view and every local crop (N + 1 views).
4. Threshold: ``q`` is the fraction of the batch that trains. With the batch's confidences
   sorted in decreasing order, the threshold is the one at position ``floor(q * B)`` (clamped
   to ``B - 1``) and the samples strictly above it are selected: ``floor(q * B)`` samples when
   there are no ties. This is the release's definition of its "quantile"; in the usual
   sense the threshold is the ``(1 - q)``-quantile. ``q`` follows a cosine from
   ``selflabel.quantile_start`` (0.5) to ``selflabel.quantile_end`` (0.6) over the stage, so
   the selected share grows from half the batch to 60 %.
5. Loss: for each strong view, the cross-entropy of its logits (``z / tau``) against the
   anchor's argmax, averaged over the selected samples; then averaged over the N + 1 strong
   views. With no sample selected the loss is 0 (and still part of the graph).
6. Logged only: the fraction selected, the threshold, ``q``, and the TWIST entropy terms of the
   two global views (sharpness = mean per-sample entropy, diversity = entropy of the batch-mean
   distribution), averaged over the two views.

The threshold and the selection are per process (the release computes them on each GPU's
batch); DDP averages the gradients as usual.

Optimisation: a fresh optimiser of the kind ``optim.name`` (momentum buffers restart; the
learning rate warms up from 0 anyway), learning rate ``selflabel.lr * global_batch / 256``
with ``selflabel.warmup_epochs`` of linear warm-up then a cosine to ``optim.min_lr_ratio``
times the peak, and the weight decay the TWIST stage ended with (``optim.weight_decay_end``,
or ``optim.weight_decay``), held constant. Gradient clipping and the non-finite policy are the
TWIST stage's. With an EMA teacher, the teacher keeps following the student with momentum
``ema.momentum_end`` (the value the TWIST stage ended on).

Checkpoints carry ``"stage": "selflabel"`` and ``"selflabel": {"epoch", "step_in_epoch",
"global_step"}`` (steps counted within the stage); their ``"state"`` is the completed TWIST
stage's, so :func:`twist.train.train` skips straight to this stage when it resumes, and this
stage resumes where it stopped. Metrics go to ``OUT/metrics.jsonl`` with ``"stage":
"selflabel"``; their ``epoch`` continues the TWIST count (801..850 for the 800 + 50 recipe).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from twist import distributed as tdist

logger = logging.getLogger(__name__)

__all__ = ["selflabel_loss", "SelfLabelLoss", "SelfLabelTerms", "selection_threshold", "run_selflabel", "STAGE"]

STAGE = "selflabel"
"""Value of ``checkpoint["stage"]`` and of ``"stage"`` in metrics records of this stage."""


# ---------------------------------------------------------------------- the loss
def selection_threshold(confidence: torch.Tensor, quantile: float) -> torch.Tensor:
    """The release's threshold: the confidence ranked ``floor(quantile * B)`` in decreasing order
    (clamped to the last one). Samples strictly above it are selected."""
    if confidence.dim() != 1 or confidence.numel() == 0:
        raise ValueError(f"confidence must be a non-empty 1-D tensor, got shape {tuple(confidence.shape)}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    ordered = torch.sort(confidence, descending=True).values
    k = min(int(quantile * confidence.numel()), confidence.numel() - 1)
    return ordered[k]


def _entropies(p: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, entropy of the batch-mean distribution), eps inside the logs."""
    sharp = -(p * torch.log(p + eps)).sum(1).mean()
    mean_p = p.mean(0)
    div = -(mean_p * torch.log(mean_p + eps)).sum()
    return sharp, div


def selflabel_loss(logits_views: Sequence[torch.Tensor], quantile: float, *,
                   anchor_logits: Sequence[torch.Tensor] | None = None, tau: float = 1.0,
                   eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The self-labeling loss of one batch (see the module docstring).

    Args:
        logits_views: student logits ``[g1, g2, l1, ..., lN]``, each (B, C).
        quantile: the fraction ``q`` of the batch to train on (release's "quantile").
        anchor_logits: optional ``[g1, g2]`` logits that choose the weak anchor and give the
            targets (an EMA teacher's); default: the student's global views, detached.
        tau: softmax temperature (p = softmax(z / tau)); 1 in every recipe.
        eps: constant inside the logs of the logged entropies.

    Returns ``(loss, stats)``: ``loss`` a 0-d float32 tensor with gradients into the strong
    views; ``stats`` detached 0-d tensors: ``threshold``, ``selected`` (fraction of the batch),
    ``quantile``, ``anchor_first`` (fraction whose weak anchor is global view 1), ``sharpness``,
    ``diversity``, and ``targets`` / ``mask`` (per-sample (B,) tensors, for inspection).
    """
    views = list(logits_views)
    if len(views) < 2:
        raise ValueError(f"self-labeling needs at least the two global views, got {len(views)} view(s)")
    shape = views[0].shape
    if len(shape) != 2:
        raise ValueError(f"each view's logits must be (B, C), got {tuple(shape)}")
    for v in views:
        if v.shape != shape:
            raise ValueError(f"all views must have the same shape, got {tuple(shape)} and {tuple(v.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    anchors = list(anchor_logits) if anchor_logits is not None else views[:2]
    if len(anchors) != 2 or any(a.shape != shape for a in anchors):
        raise ValueError("anchor_logits must be the two global views' logits, shaped like the student's")

    with torch.autocast(device_type=views[0].device.type, enabled=False):
        with torch.no_grad():
            pa = [torch.softmax(a.detach().to(dtype) / tau, dim=1) for a in anchors]
            conf1, target1 = pa[0].max(dim=1)
            conf2, target2 = pa[1].max(dim=1)
            first = conf1 >= conf2                      # weak anchor = global view 1 where True
            confidence = torch.where(first, conf1, conf2)
            targets = torch.where(first, target1, target2)
            threshold = selection_threshold(confidence, quantile)
            mask = confidence > threshold
        z = [v.to(dtype) / tau for v in views]
        strong = [torch.where(first[:, None], z[1], z[0])] + z[2:]
        n_sel = int(mask.sum())
        if n_sel > 0:
            ces = [F.cross_entropy(s[mask], targets[mask]) for s in strong]
            loss = torch.stack(ces).mean()
        else:
            loss = 0.0 * torch.stack([s.sum() for s in strong]).sum()
        with torch.no_grad():
            ps = [torch.softmax(v, dim=1) for v in z[:2]]
            ent = [_entropies(p, eps) for p in ps]
            sharpness = 0.5 * (ent[0][0] + ent[1][0])
            diversity = 0.5 * (ent[0][1] + ent[1][1])
    stats = {
        "threshold": threshold.detach(),
        "selected": mask.to(dtype).mean(),
        "quantile": torch.tensor(float(quantile), dtype=dtype),
        "anchor_first": first.to(dtype).mean(),
        "sharpness": sharpness,
        "diversity": diversity,
        "targets": targets,
        "mask": mask,
    }
    return loss, stats


@dataclass
class SelfLabelTerms:
    """What :class:`SelfLabelLoss` returns: the loss and the logged statistics (0-d tensors)."""

    loss: torch.Tensor
    threshold: torch.Tensor
    selected: torch.Tensor
    sharpness: torch.Tensor
    diversity: torch.Tensor

    LOGGED = ("loss", "selected", "threshold", "sharpness", "diversity")

    def vector(self) -> torch.Tensor:
        """The logged values as one detached float64 CPU vector (order: :attr:`LOGGED`)."""
        return torch.stack([getattr(self, k).detach().to(torch.float64).reshape(()) for k in self.LOGGED]).cpu()


class SelfLabelLoss(nn.Module):
    """:func:`selflabel_loss` as a criterion with the TWIST loss's calling convention
    (``criterion(student_views, teacher=teacher_global_views)``), so that
    :func:`twist.train.train_step` can run it. Set :attr:`quantile` before each step."""

    def __init__(self, tau: float = 1.0, eps: float = 1e-5, quantile: float = 0.5):
        super().__init__()
        self.tau, self.eps, self.quantile = float(tau), float(eps), float(quantile)

    def forward(self, views: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None = None) -> SelfLabelTerms:
        loss, s = selflabel_loss(views, self.quantile, anchor_logits=teacher, tau=self.tau, eps=self.eps)
        return SelfLabelTerms(loss, s["threshold"], s["selected"], s["sharpness"], s["diversity"])


# ---------------------------------------------------------------------- the stage
@dataclass
class SelfLabelState:
    epoch: int = 0            # self-labeling epochs completed
    step_in_epoch: int = 0
    global_step: int = 0      # optimiser steps within the stage


def _loader(dataset, cfg, epoch: int, rank: int, world: int, start_batch: int):
    """This stage's batches for one epoch, starting at batch ``start_batch`` (resume), and the
    number of batches of the whole epoch."""
    from twist.data import batch_loader

    loader = batch_loader(dataset, cfg.train.batch_size, shuffle=True, drop_last=True, seed=cfg.train.seed,
                          epoch=epoch, rank=rank, world_size=world, num_workers=cfg.train.num_workers,
                          start_batch=start_batch)
    return loader, len(loader)


def _read_resume_point(ckpt_path: Path, cfg, world: int, main: bool):
    """Where this stage starts: (the finished TWIST stage's counters, the data description, this
    stage's own checkpoint or None). Rank 0 reads, every rank gets the same (as train.py's resume)."""
    from twist.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path) if main and ckpt_path.exists() else None
    if ckpt is not None and ckpt.get("stage") != STAGE:
        ckpt = {"state": ckpt.get("state"), "data": ckpt.get("data")}  # the finished TWIST stage: counters only
    if world > 1:
        ckpt = tdist.broadcast_object(ckpt)
    ckpt = ckpt or {}
    twist_state = dict(ckpt.get("state") or {"global_step": 0})
    twist_state.update(epoch=cfg.train.epochs, step_in_epoch=0)
    return twist_state, ckpt.get("data") or {}, ckpt if ckpt.get("stage") == STAGE else None


def _running_sums(saved: dict[str, Any] | None) -> tuple[torch.Tensor, int, int]:
    """An epoch's running (sums of the logged values, steps counted, steps skipped): zeros, or
    those a mid-epoch checkpoint saved, so a resumed epoch logs what an uninterrupted one would."""
    if saved is None:
        return torch.zeros(len(SelfLabelTerms.LOGGED), dtype=torch.float64), 0, 0
    return saved["sums"].to(torch.float64).clone(), int(saved["count"]), int(saved["skipped_steps"])


def run_selflabel(cfg, model: nn.Module, teacher: nn.Module | None, dataset, val, out: str | Path,
                  device: torch.device, precision: str, mean: Sequence[float], std: Sequence[float], *,
                  progress: bool = True, max_steps: int | None = None, session=None) -> dict[str, Any] | None:
    """Run ``cfg.selflabel.epochs`` epochs of self-labeling on ``model`` (see the module docstring).

    Called by :func:`twist.train.train` once the TWIST epochs are done, with its (possibly
    DDP-wrapped) model, the EMA teacher or None, the training data, the validation data, the
    run folder, the device / precision and the normalisation of the TWIST stage. Resumes from
    ``OUT/checkpoint.pt`` when that holds a self-labeling checkpoint. ``max_steps`` stops the
    stage after that many of its optimiser steps (tests). ``session`` (a
    :class:`twist.session.TrainingSession`) stops the stage on SIGTERM / SIGUSR1 with a
    checkpoint and raises :class:`twist.preempt.Preempted`; its provenance goes into checkpoints.

    Returns the last epoch's metrics record, or None when the stage has no epochs.
    """
    from twist.augment import EvalTransform, MultiCropAugment
    from twist.checkpoint import CHECKPOINT_NAME, save_checkpoint
    from twist.ema import update_teacher
    from twist.inference import evaluate_model
    from twist.optim import build_optimizer, cosine_schedule, set_step_values
    from twist.train import (TrainingError, _progress, _rng_state, _set_rng_state, _summary, append_jsonl,
                             stop_if_diverged, train_step, unwrap)

    sl = cfg.selflabel
    if sl.epochs <= 0 or (max_steps is not None and max_steps <= 0):
        return None
    out = Path(out)
    rank, world = tdist.rank(), tdist.world_size()
    main = rank == 0
    ckpt_path = out / CHECKPOINT_NAME
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    augment = MultiCropAugment(cfg.augment, dataset.channels, mean, std, global_scale=tuple(sl.global_scale),
                               local_scale=tuple(sl.local_scale))
    eval_transform = EvalTransform(cfg.augment.global_size, dataset.channels, mean, std)
    criterion = SelfLabelLoss(cfg.loss.tau, cfg.loss.eps, sl.quantile_start)

    # ---- schedules (per optimiser step of this stage) and optimiser
    first_epoch = cfg.train.epochs  # loader epochs continue the TWIST count: fresh shuffles
    _, steps_per_epoch = _loader(dataset, cfg, first_epoch, rank, world, 0)
    total_steps = steps_per_epoch * sl.epochs
    global_batch = cfg.train.batch_size * world
    peak_lr = sl.lr * global_batch / 256
    lr_schedule = cosine_schedule(peak_lr, peak_lr * cfg.optim.min_lr_ratio, total_steps,
                                  round(sl.warmup_epochs * steps_per_epoch))
    quantile_schedule = cosine_schedule(sl.quantile_start, sl.quantile_end, total_steps)
    weight_decay = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 7_000_003)

    # ---- resume
    state, epoch_sums = SelfLabelState(), None
    twist_state, data_info, ckpt = _read_resume_point(ckpt_path, cfg, world, main)
    if ckpt is not None:
        for module, key in ((unwrap(model), "model"), (teacher, "teacher"), (optimizer, "optimizer"), (scaler, "scaler")):
            if module is not None and ckpt.get(key):
                module.load_state_dict(ckpt[key])
        state = SelfLabelState(**ckpt[STAGE])
        epoch_sums = ckpt.get("epoch_sums") if state.step_in_epoch else None
        rng = ckpt.get("rng_per_rank", {}).get(str(rank))
        if rng is not None:
            _set_rng_state(rng, aug_gen)
        if main:
            logger.info("resuming self-labeling in %s from epoch %d, step %d", out, state.epoch, state.global_step)
        del ckpt
    if state.epoch >= sl.epochs:
        return None

    def checkpoint() -> None:
        rng = {str(rank): _rng_state(aug_gen)}
        # mid-epoch: the running sums (mean over ranks), so the resumed epoch logs the uninterrupted values
        saved_sums = tdist.all_reduce_mean_nograd(sums) if state.step_in_epoch else None
        if world > 1:
            rng = tdist.gather_objects(rng)
        if not main:
            return
        save_checkpoint({
            "format": "twist/1",
            "stage": STAGE,
            STAGE: vars(state).copy(),
            "model": unwrap(model).state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": dict(twist_state),
            "rng_per_rank": rng,
            "epoch_sums": {"sums": saved_sums.clone(), "count": count, "skipped_steps": skipped_steps}
            if state.step_in_epoch else None,
            "provenance": session.provenance if session is not None else None,
            "config": cfg.to_dict(),
            "data": data_info or {"channels": dataset.channels, "mean": list(mean), "std": list(std),
                                  "image_size": cfg.train.image_size or cfg.augment.global_size,
                                  "class_names": dataset.class_names},
        }, ckpt_path)

    if main:
        logger.info("self-labeling for %d epochs x %d steps, lr %.4g, crops global %s local %s, quantile %s -> %s",
                    sl.epochs, steps_per_epoch, peak_lr, tuple(sl.global_scale), tuple(sl.local_scale),
                    sl.quantile_start, sl.quantile_end)
    metrics_path = out / "metrics.jsonl"
    last: dict[str, Any] = {}
    stop = preempted = False
    skipped_in_a_row = 0
    for epoch in range(state.epoch, sl.epochs):
        model.train()
        loader, _ = _loader(dataset, cfg, first_epoch + epoch, rank, world, state.step_in_epoch)
        sums, count, skipped_steps = _running_sums(epoch_sums)  # the interrupted epoch's, on resume
        epoch_sums, count_start = None, count
        t0 = time.perf_counter()
        bar = _progress(loader, f"self-label {epoch + 1}/{sl.epochs}", progress and main,
                        initial=state.step_in_epoch, total=steps_per_epoch)
        for images, _ in bar:
            it = state.global_step
            set_step_values(optimizer, float(lr_schedule[it]), weight_decay)
            criterion.quantile = float(quantile_schedule[it])
            images = images.to(device, non_blocking=True)
            views = [v.contiguous(memory_format=memory_format) for v in augment(images, aug_gen)]
            terms, finite = train_step(model, criterion, optimizer, views, device=device, precision=precision,
                                       scaler=scaler, clip_grad=cfg.optim.clip_grad, teacher=teacher)
            if not finite:
                msg = (f"non-finite loss or gradient in self-labeling epoch {epoch + 1}, step {it} "
                       f"(loss={terms.loss.item():.4g})")
                if cfg.train.nonfinite == "stop":
                    raise TrainingError(msg + "; stopping, the last checkpoint is intact "
                                              "(set train.nonfinite=skip to skip such steps)")
                skipped_steps += 1
                skipped_in_a_row += 1
                stop_if_diverged(skipped_in_a_row, cfg, msg, "the last checkpoint is intact")
                if main:
                    logger.warning("%s; step skipped", msg)
            else:
                skipped_in_a_row = 0
                if teacher is not None:
                    update_teacher(teacher, unwrap(model), cfg.ema.momentum_end)
                sums += terms.vector()
                count += 1
            state.global_step += 1
            state.step_in_epoch += 1
            if main and progress and state.global_step % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{terms.loss.item():.4f}", sel=f"{terms.selected.item():.2f}")
            if cfg.train.checkpoint_every_steps and state.global_step % cfg.train.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < steps_per_epoch:
                checkpoint()
            if max_steps is not None and state.global_step >= max_steps:
                stop = True
                break
            if session is not None and session.stop.requested(device):  # SIGTERM / SIGUSR1: checkpoint, exit 143
                stop = preempted = True
                break
        if stop and state.step_in_epoch < steps_per_epoch:
            checkpoint()
            break

        # ---- end of epoch: log, evaluate, checkpoint
        elapsed = time.perf_counter() - t0
        means = tdist.all_reduce_mean_nograd(sums / max(count, 1))
        record: dict[str, Any] = {"stage": STAGE, "epoch": cfg.train.epochs + epoch + 1,
                                  "selflabel_epoch": epoch + 1, "step": twist_state.get("global_step", 0) + state.global_step}
        record.update({k: v for k, v in zip(SelfLabelTerms.LOGGED, means.tolist())})
        record.update({"quantile": float(quantile_schedule[state.global_step - 1]),
                       "lr": float(lr_schedule[state.global_step - 1]), "weight_decay": weight_decay,
                       "images_per_sec": (count - count_start) * global_batch / max(elapsed, 1e-9),
                       "epoch_seconds": elapsed,
                       "skipped_steps": skipped_steps})
        last_epoch = epoch + 1 == sl.epochs
        if val is not None and val.labels is not None and cfg.train.eval_every and \
                ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            record.update(evaluate_model(unwrap(model), val, eval_transform, device=device, precision=precision,
                                         batch_size=cfg.train.eval_batch_size,
                                         memory=dataset if val is not dataset else None,
                                         channels_last=cfg.train.channels_last))
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if main:  # logged before the checkpoint, as in twist.train: a crash in between re-runs the epoch
            append_jsonl(metrics_path, record)  # and resume drops this line, so it is never lost nor doubled
        checkpoint()
        if main:
            logger.info("self-label %s", _summary(record))
        last = record
        if stop:
            break
    if preempted and state.epoch < sl.epochs:  # else the run is done
        session.stop.stop(f"self-labeling step {state.global_step}")
    return last or None

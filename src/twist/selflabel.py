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

The stage runs on the TWIST stage's engine (:class:`twist.stage.StageRunner`): this module
supplies only its step and its log fields, so the non-finite policy (with the BatchNorm
statistics of a skipped step restored), the one-line error on a checkpoint that cannot be
written, the resume checks, ``train.compile``, TensorBoard (under ``selflabel/``) and the
progress bar are the TWIST stage's.

Checkpoints carry ``"stage": "selflabel"`` and ``"selflabel": {"epoch", "step_in_epoch",
"global_step"}`` (steps counted within the stage), and mid-epoch the epoch's running sums
(``"epoch_sums"``, so a resumed epoch logs the means of an uninterrupted one); their
``"state"`` is the completed TWIST stage's, so :func:`twist.train.train` skips straight to
this stage when it resumes, and this stage resumes where it stopped. Metrics go to ``OUT/metrics.jsonl`` with ``"stage":
"selflabel"``; their ``epoch`` continues the TWIST count (801..850 for the 800 + 50 recipe).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from twist.augment import MultiCropAugment
from twist.data import ViewPlan
from twist.ema import update_teacher
from twist.optim import build_optimizer, cosine_schedule, set_step_values
from twist.runtime import unwrap
from twist.stage import Run, RunState, Stage, StageRunner, batch_to_device, compiled, restore_rng, train_step

__all__ = ["selflabel_loss", "SelfLabelLoss", "SelfLabelTerms", "selection_threshold", "run_selflabel", "SelfLabelStage",
           "STAGE"]

logger = logging.getLogger(__name__)

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
    :func:`twist.stage.train_step` can run it. Set :attr:`quantile` before each step."""

    def __init__(self, tau: float = 1.0, eps: float = 1e-5, quantile: float = 0.5):
        super().__init__()
        self.tau, self.eps, self.quantile = float(tau), float(eps), float(quantile)

    def forward(self, views: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None = None) -> SelfLabelTerms:
        loss, s = selflabel_loss(views, self.quantile, anchor_logits=teacher, tau=self.tau, eps=self.eps)
        return SelfLabelTerms(loss, s["threshold"], s["selected"], s["sharpness"], s["diversity"])


# ---------------------------------------------------------------------- the stage
class SelfLabelStage(Stage):
    """The self-labeling stage: its augmentation, schedules, fresh optimiser, step and log fields."""

    name = STAGE
    epoch_label = "self-labeling epoch"
    bar_label = "self-label"
    summary_prefix = "self-label "
    tensorboard_prefix = "selflabel/"
    num_logged = len(SelfLabelTerms.LOGGED)

    def __init__(self, run: Run, model: nn.Module, teacher: nn.Module | None, twist_state: dict[str, int]) -> None:
        cfg, sl, info = run.cfg, run.cfg.selflabel, run.data_info
        self.run, self.cfg, self.model, self.teacher, self.twist_state = run, cfg, model, teacher, twist_state
        self.epochs = sl.epochs
        self.loader_epoch_offset = cfg.train.epochs  # loader epochs continue the TWIST count: fresh shuffles
        self.augment = MultiCropAugment(cfg.augment, info["channels"], info["mean"], info["std"],
                                        global_scale=tuple(sl.global_scale), local_scale=tuple(sl.local_scale))
        # streamed photos: the same harder crops, cut at decode time from the original files
        self.view_plan = ViewPlan.from_augment(dataclasses.replace(cfg.augment, global_scale=tuple(sl.global_scale),
                                                                   local_scale=tuple(sl.local_scale)), cfg.train.seed)
        self.criterion = SelfLabelLoss(cfg.loss.tau, cfg.loss.eps, sl.quantile_start)
        self.forward_model = compiled(model, cfg)

        # schedules (per optimiser step of this stage) and optimiser
        steps_per_epoch = len(run.loader(self.loader_epoch_offset))
        total_steps = steps_per_epoch * sl.epochs
        self.global_batch = cfg.train.batch_size * run.world
        self.peak_lr = sl.lr * self.global_batch / 256
        self.lr_schedule = cosine_schedule(self.peak_lr, self.peak_lr * cfg.optim.min_lr_ratio, total_steps,
                                           round(sl.warmup_epochs * steps_per_epoch))
        self.quantile_schedule = cosine_schedule(sl.quantile_start, sl.quantile_end, total_steps)
        self.weight_decay = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
        self.optimizer = build_optimizer(model, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + run.rank + 7_000_003)

    def step(self, images: torch.Tensor, it: int) -> tuple[SelfLabelTerms, bool, torch.Tensor | None]:
        """One optimiser step of self-labeling: schedule values, harder crops, the shared
        :func:`twist.stage.train_step` with :class:`SelfLabelLoss`, the EMA teacher."""
        run = self.run
        set_step_values(self.optimizer, float(self.lr_schedule[it]), self.weight_decay)
        self.criterion.quantile = float(self.quantile_schedule[it])
        images = batch_to_device(images, run.device)
        views = [v.contiguous(memory_format=run.memory_format) for v in self.augment(images, self.aug_gen)]
        terms, finite = train_step(self.forward_model, self.criterion, self.optimizer, views, device=run.device,
                                   precision=run.precision, scaler=self.scaler, clip_grad=self.cfg.optim.clip_grad,
                                   teacher=self.teacher)
        if not finite:
            return terms, False, None
        if self.teacher is not None:
            update_teacher(self.teacher, unwrap(self.model), self.cfg.ema.momentum_end)
        return terms, True, terms.vector()

    def postfix(self, terms: SelfLabelTerms, it: int) -> dict[str, str]:
        return {"loss": f"{terms.loss.item():.4f}", "sel": f"{terms.selected.item():.2f}"}

    def epoch_fields(self, epoch: int, means: torch.Tensor, state: RunState) -> dict[str, Any]:
        record: dict[str, Any] = {"stage": STAGE, "epoch": self.cfg.train.epochs + epoch + 1,
                                  "selflabel_epoch": epoch + 1,
                                  "step": self.twist_state.get("global_step", 0) + state.global_step}
        record.update({k: v for k, v in zip(SelfLabelTerms.LOGGED, means.tolist())})
        record.update({"quantile": float(self.quantile_schedule[state.global_step - 1]),
                       "lr": float(self.lr_schedule[state.global_step - 1]), "weight_decay": self.weight_decay})
        return record

    def load(self, ckpt: dict[str, Any]) -> None:
        """Weights, teacher, optimiser and scaler from a self-labeling checkpoint."""
        unwrap(self.model).load_state_dict(ckpt["model"])
        if self.teacher is not None and ckpt.get("teacher"):
            self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])

    def checkpoint_payload(self, state: RunState, rng: dict[str, Any], epoch_sums: dict[str, Any] | None) -> dict:
        return {
            "format": "twist/1",
            "stage": STAGE,
            # this stage's counters (heads_dropped belongs to the TWIST stage's "state" below)
            STAGE: {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step},
            "model": unwrap(self.model).state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": dict(self.twist_state),
            "rng_per_rank": rng,
            "config": self.cfg.to_dict(),
            "data": self.run.data_info,
            "epoch_sums": epoch_sums,
        }


def run_selflabel(run: Run, model: nn.Module, teacher: nn.Module | None, twist_state: dict[str, int], *,
                  resume_from: dict[str, Any] | None = None, max_steps: int | None = None) -> dict[str, Any] | None:
    """Run ``cfg.selflabel.epochs`` epochs of self-labeling on ``model`` (see the module docstring).

    Called by :func:`twist.train.train` once the TWIST epochs are done, with its run (config,
    data, run folder, device), its (possibly DDP-wrapped) model, the EMA teacher or None and the
    completed TWIST stage's counters. ``resume_from`` is the run folder's self-labeling
    checkpoint (already read and checked by train), from which the stage continues.
    ``max_steps`` stops the stage after that many of its optimiser steps (tests).

    Returns the last epoch's metrics record, or None when the stage has no epochs.
    """
    cfg, sl = run.cfg, run.cfg.selflabel
    if sl.epochs <= 0 or (max_steps is not None and max_steps <= 0):
        return None
    twist_state = {**twist_state, "epoch": cfg.train.epochs, "step_in_epoch": 0}
    stage = SelfLabelStage(run, model, teacher, twist_state)
    state, epoch_sums = RunState(), None
    if resume_from is not None:
        stage.load(resume_from)
        state = RunState(**resume_from[STAGE])
        restore_rng(resume_from, run.rank, stage.aug_gen)
        if state.step_in_epoch:  # older checkpoints have no sums: the epoch's means then start afresh
            epoch_sums = resume_from.get("epoch_sums")
        if run.main:
            logger.info("resuming self-labeling in %s from epoch %d, step %d", run.out, state.epoch, state.global_step)
    if state.epoch >= sl.epochs:
        return None
    runner = StageRunner(run, stage, state, epoch_sums=epoch_sums, max_steps=max_steps)
    if run.main:
        logger.info("self-labeling for %d epochs x %d steps, lr %.4g, crops global %s local %s, quantile %s -> %s",
                    sl.epochs, runner.steps_per_epoch, stage.peak_lr, tuple(sl.global_scale), tuple(sl.local_scale),
                    sl.quantile_start, sl.quantile_end)
    last: dict[str, Any] = {}
    for epoch in range(state.epoch, sl.epochs):
        record = runner.train_one_epoch(epoch)
        if record is not None:
            last = record
        if runner.stopped:
            break
    if runner.preempted and state.epoch < sl.epochs:  # else the run is done
        run.session.stop.stop(f"self-labeling step {state.global_step}")
    return last or None

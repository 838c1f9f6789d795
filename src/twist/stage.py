"""The one training engine: what every training stage (TWIST, self-labeling) shares.

A stage is a :class:`Stage`: it supplies its step (one optimiser step on a batch of uint8
images) and its extra log fields; :class:`StageRunner` does everything else the same way for
every stage, so that the stages cannot drift apart:

- batches: one loader per epoch, deterministic in (seed, epoch), resumable at a batch;
- the non-finite policy: ``train.nonfinite=stop`` ends the run with one line naming the step;
  ``skip`` drops the step, restores the BatchNorm running statistics its forward changed, and
  stops after ``train.max_skipped_in_a_row`` skipped steps in a row;
- running loss sums, the epoch's metrics line (``OUT/metrics.jsonl``), the evaluation,
  TensorBoard scalars and the one-line summary on stderr;
- checkpoints every ``train.checkpoint_every_steps`` steps, at the end of every epoch and when
  ``max_steps`` stops a run mid-epoch; a checkpoint that cannot be written (disk full) ends the
  run with one line, the previous checkpoint intact;
- progress bars;
- stop signals (SIGTERM / SIGUSR1, :mod:`twist.preempt`): the stage ends after the current
  step with a checkpoint, ``preempted`` set; the run then raises ``Preempted`` (exit 143).

Resume is shared too: :func:`read_resume_checkpoint` (read without executing code, the same
dict on every rank, refused with one line when this run cannot continue from it),
:func:`restore_rng`, :func:`drop_unsaved_metrics`. Each stage loads its own weights and
optimiser from the dict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from twist import distributed as tdist
from twist.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from twist.config import ConfigError, TwistConfig
from twist.data import ImageDataset, ViewPlan, batch_loader
from twist.inference import evaluate_model
from twist.io import stale_temporaries, write_text_atomic
from twist.runtime import autocast_context, unwrap
from twist.session import TrainingSession

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SKIPPED_NAME = "skipped_files.tsv"
"""Run-folder list of the data files left out (``path<TAB>reason``, see ImageDataset.write_skipped)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss under the 'stop' policy, unusable output folder)."""


# ---------------------------------------------------------------------- the run
@dataclass
class RunState:
    """Where a stage stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0            # epochs completed
    step_in_epoch: int = 0    # optimiser steps completed inside the current epoch
    global_step: int = 0      # optimiser steps completed in the stage
    heads_dropped: bool = False  # model.drop_heads_after has removed the losing heads (TWIST stage)


@dataclass
class Run:
    """What the stages of one run share: configuration, processes, device, data, run folder."""

    cfg: TwistConfig
    out: Path
    device: torch.device
    precision: str
    rank: int
    world: int
    progress: bool
    """Progress bars on (rank 0 only)."""
    dataset: ImageDataset
    val: ImageDataset
    """Evaluated after epochs when labelled (the training data itself unless train.val_data)."""
    eval_transform: Any
    data_info: dict[str, Any]
    """The checkpoint's "data" entry: channels, normalisation, image size, class names, source."""
    session: TrainingSession | None = None
    """The run folder's lock, provenance, status and stop signals (twist.session); None for
    callers that train without one (benchmarks)."""
    writer: Any = None
    """TensorBoard SummaryWriter (rank 0, with train.tensorboard)."""
    skipped_written: int = 0
    """Entries of the dataset's skipped list already in OUT/skipped_files.tsv."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format

    def loader(self, epoch: int, start_batch: int = 0, views: ViewPlan | None = None):
        """The training batches of loader epoch ``epoch`` for this rank, from ``start_batch``;
        streamed photos come as the ``views`` cut at decode time (a list of uint8 batches),
        already on the training device under train.decode=gpu (twist.data.device_decode)."""
        t = self.cfg.train
        return batch_loader(self.dataset, t.batch_size, shuffle=True, drop_last=True, seed=t.seed, epoch=epoch,
                            rank=self.rank, world_size=self.world, num_workers=t.num_workers,
                            start_batch=start_batch, views=views,
                            decode_device=self.device if t.decode == "gpu" else None)


def batch_to_device(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A loader batch on the training device: whole uint8 images, or the list of uint8 view
    batches that streamed photos come as (cut at decode time; the augmentation then applies
    only its photometric part)."""
    if isinstance(images, list):
        return [v.to(device, non_blocking=True) for v in images]
    return images.to(device, non_blocking=True)


def compiled(model: nn.Module, cfg: TwistConfig) -> nn.Module:
    """The module a stage's forward runs: ``torch.compile(model)`` under train.compile (same
    parameters, compiled graphs), else the model itself."""
    return torch.compile(model) if cfg.train.compile else model


class Stage:
    """What a training stage supplies to :class:`StageRunner`. Subclasses set the attributes in
    ``__init__`` and implement :meth:`step`, :meth:`epoch_fields` and :meth:`checkpoint_payload`."""

    name = "twist"
    """Stage name: ``"stage"`` of its checkpoints and metrics lines (absent for TWIST)."""
    epoch_label = "epoch"
    """How messages name this stage's epochs ("epoch", "self-labeling epoch")."""
    bar_label = "epoch"
    summary_prefix = ""
    tensorboard_prefix = ""
    epochs: int
    loader_epoch_offset: int = 0
    """Added to the stage's epoch to get the loader's (a later stage gets fresh shuffles)."""
    view_plan: ViewPlan | None = None
    """The crops of the stage's views, cut at decode time for streamed photos (twist.data.crops)."""
    num_logged: int
    """Length of the vector of running sums :meth:`step` returns."""
    model: nn.Module
    teacher: nn.Module | None = None
    aug_gen: torch.Generator
    global_batch: int

    def start_epoch(self, epoch: int) -> None:
        """Set what changes from epoch to epoch (TWIST: the view sizes of progressive resizing)
        before stage epoch ``epoch``'s (0-based) batches are drawn; nothing by default."""

    def step(self, images: torch.Tensor, it: int) -> tuple[Any, bool, torch.Tensor | None]:
        """One optimiser step on uint8 ``images`` at stage step ``it``: ``(terms, finite,
        logged)`` with ``logged`` the float64 CPU vector added to the epoch's sums (None when not
        finite, in which case the step was not taken)."""
        raise NotImplementedError

    def postfix(self, terms: Any, it: int) -> dict[str, str]:
        """Progress-bar fields after step ``it``."""
        return {"loss": f"{terms.loss.item():.4f}"}

    def epoch_fields(self, epoch: int, means: torch.Tensor, state: RunState) -> dict[str, Any]:
        """The metrics line's leading fields for finished stage epoch ``epoch`` (0-based)."""
        raise NotImplementedError

    def end_epoch(self, record: dict[str, Any], means: torch.Tensor, state: RunState) -> None:
        """Work after an epoch's means are known, before evaluation (e.g. promote a head); ``state``
        already counts the epoch's steps."""

    def checkpoint_payload(self, state: RunState, rng: dict[str, Any], epoch_sums: dict[str, Any] | None) -> dict:
        """The checkpoint dict of this stage at ``state``."""
        raise NotImplementedError


# ---------------------------------------------------------------------- the runner
class StageRunner:
    """Runs a :class:`Stage`'s epochs (see the module docstring). ``max_steps`` stops the stage
    after that many of its optimiser steps in total, with a checkpoint (tests, benchmarks)."""

    def __init__(self, run: Run, stage: Stage, state: RunState, *, epoch_sums: dict[str, Any] | None = None,
                 max_steps: int | None = None) -> None:
        self.run, self.stage, self.state = run, stage, state
        self.epoch_sums = epoch_sums
        self.max_steps = max_steps
        self.steps_per_epoch = len(run.loader(stage.loader_epoch_offset))
        self.stopped = False
        self.preempted = False
        """Stopped by SIGTERM / SIGUSR1 (checkpoint written); the caller ends the run."""
        self.skipped_in_a_row = 0
        self.sums = torch.zeros(stage.num_logged, dtype=torch.float64)
        self.count = self.skipped_steps = 0

    def train_one_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Train stage epoch ``epoch`` (0-based) from where the state stands; return its metrics
        record, or None when ``max_steps`` stopped the stage inside the epoch (checkpoint written)."""
        run, stage, state, cfg = self.run, self.stage, self.state, self.run.cfg
        stage.model.train()
        stage.start_epoch(epoch)
        loader = run.loader(stage.loader_epoch_offset + epoch, state.step_in_epoch, stage.view_plan)
        self._start_sums()
        count_start = self.count
        t0 = time.perf_counter()
        bar = progress_bar(loader, f"{stage.bar_label} {epoch + 1}/{stage.epochs}", run.progress and run.main,
                           initial=state.step_in_epoch, total=self.steps_per_epoch)
        for images, _ in bar:
            it = state.global_step
            terms = self._step(images, it, epoch)
            state.global_step += 1
            state.step_in_epoch += 1
            if run.main and run.progress and state.global_step % cfg.train.log_every == 0:
                bar.set_postfix(**stage.postfix(terms, it))
            if cfg.train.checkpoint_every_steps and state.global_step % cfg.train.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < self.steps_per_epoch:
                self.checkpoint()
            if self.max_steps is not None and state.global_step >= self.max_steps:
                self.stopped = True
                break
            if run.session is not None and run.session.stop.requested(run.device):  # every rank, same step
                self.stopped = self.preempted = True
                break
        if self.stopped and state.step_in_epoch < self.steps_per_epoch:
            self.checkpoint()
            return None
        return self._end_epoch(epoch, time.perf_counter() - t0, count_start)

    def _start_sums(self) -> None:
        """Zero the running sums, or take the interrupted epoch's from the resumed checkpoint."""
        self.sums = torch.zeros(self.stage.num_logged, dtype=torch.float64)
        self.count = self.skipped_steps = 0
        if self.epoch_sums is not None:
            self.sums = self.epoch_sums["sums"].to(torch.float64).clone()
            self.count, self.skipped_steps = int(self.epoch_sums["count"]), int(self.epoch_sums["skipped_steps"])
            self.epoch_sums = None

    def _step(self, images: torch.Tensor, it: int, epoch: int) -> Any:
        """The stage's step under the non-finite policy; returns its terms."""
        cfg, stage = self.run.cfg, self.stage
        buffers = snapshot_buffers(stage.model, stage.teacher) if cfg.train.nonfinite == "skip" else []
        terms, finite, logged = stage.step(images, it)
        if finite:
            self.skipped_in_a_row = 0
            self.sums += logged
            self.count += 1
            return terms
        msg = (f"non-finite loss or gradient at optimiser step {it + 1} ({stage.epoch_label} {epoch + 1}, step "
               f"{self.state.step_in_epoch + 1} of {self.steps_per_epoch}; loss={terms.loss.item():.4g})")
        path = self.run.checkpoint_path
        kept = f"the last checkpoint ({path}) is intact" if path.exists() else "no checkpoint was written"
        if cfg.train.nonfinite == "stop":
            raise TrainingError(f"{msg}; stopped, {kept} (set train.nonfinite=skip to skip such steps)")
        restore_buffers(buffers)
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        stop_if_diverged(self.skipped_in_a_row, cfg, msg, kept)
        if self.run.main:
            logger.warning("%s; step skipped", msg)
        return terms

    def _end_epoch(self, epoch: int, elapsed: float, count_start: int) -> dict[str, Any]:
        """Log, evaluate and checkpoint a finished epoch; return its metrics record."""
        run, stage, state, cfg = self.run, self.stage, self.state, self.run.cfg
        means = tdist.all_reduce_mean_nograd(self.sums / max(self.count, 1))
        record = stage.epoch_fields(epoch, means, state)
        record.update({"images_per_sec": (self.count - count_start) * stage.global_batch / max(elapsed, 1e-9),
                       "epoch_seconds": elapsed, "skipped_steps": self.skipped_steps})
        stage.end_epoch(record, means, state)
        last_epoch = epoch + 1 == stage.epochs
        if run.val.labels is not None and cfg.train.eval_every and \
                ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            record.update(evaluate_model(unwrap(stage.model), run.val, run.eval_transform, device=run.device,
                                         precision=run.precision, batch_size=cfg.train.eval_batch_size,
                                         memory=run.dataset if run.val is not run.dataset else None,
                                         channels_last=cfg.train.channels_last))
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if run.main:  # logged before the checkpoint: a crash in between re-runs this epoch, whose line resume drops
            append_jsonl(run.out / METRICS_NAME, record)
            run.skipped_written = report_skipped(run.dataset, run.out, run.skipped_written)
        self.checkpoint()
        if run.main:
            if run.writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "selflabel_epoch"):
                        run.writer.add_scalar(stage.tensorboard_prefix + k, v, record["epoch"])
                run.writer.flush()
            logger.info("%s%s", stage.summary_prefix, summary(record))
        return record

    def checkpoint(self) -> None:
        """Write the stage's checkpoint (rank 0; every rank takes part in the collectives)."""
        run, state = self.run, self.state
        rng = {str(run.rank): rng_state(self.stage.aug_gen)}
        # mid-epoch: the mean over ranks of the running loss sums, so that the resumed epoch's
        # logged means (averaged over ranks again at its end) are those of an uninterrupted run
        saved_sums = tdist.all_reduce_mean_nograd(self.sums) if state.step_in_epoch else None
        if run.world > 1:
            rng = tdist.gather_objects(rng)
        if not run.main:
            return
        epoch_sums = {"sums": saved_sums.clone(), "count": self.count, "skipped_steps": self.skipped_steps} \
            if state.step_in_epoch else None
        payload = self.stage.checkpoint_payload(state, rng, epoch_sums)
        payload["provenance"] = run.session.provenance if run.session is not None else None
        save_checkpoint_or_stop(payload, run.checkpoint_path)


# ---------------------------------------------------------------------- one optimiser step
def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor], *,
               device: torch.device, precision: str, scaler=None, clip_grad: float = 0.0,
               teacher: nn.Module | None = None):
    """One optimiser step on a batch of augmented views, for any stage's criterion.

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
    if not tdist.all_true(all_finite(loss, model), device):
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


def sum_head_losses(per_head: list) -> tuple:
    """With several heads (model.num_heads > 1, or an over-clustering head) each head has its own
    loss and their sum trains the shared backbone. Returns head 0's terms, carrying every
    head's detached loss in ``head_losses`` (the lowest classifier head's is promoted after the
    epoch), and the summed loss."""
    terms = per_head[0]
    terms.head_losses = torch.stack([t.loss.detach() for t in per_head])
    return terms, torch.stack([t.loss for t in per_head]).sum()


def all_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    """True when the loss and every gradient are finite (one reduction over all gradients)."""
    if not torch.isfinite(loss).all():
        return False
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    if not norms:
        return True
    return bool(torch.isfinite(torch.stack(norms)).all())


def snapshot_buffers(*modules: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the modules' buffers (BatchNorm running statistics), taken before a step."""
    return [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]


def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo what a skipped (non-finite) step's forward did to BatchNorm running statistics."""
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


def stop_if_diverged(skipped_in_a_row: int, cfg: TwistConfig, msg: str, kept: str) -> None:
    """Under train.nonfinite=skip, raise TrainingError once train.max_skipped_in_a_row steps in
    a row were skipped: such a run has diverged rather than met one bad batch. ``msg`` names
    the last step, ``kept`` what the checkpoint holds."""
    if skipped_in_a_row >= cfg.train.max_skipped_in_a_row:
        raise TrainingError(f"{msg}; {skipped_in_a_row} steps in a row were not finite "
                            f"(train.max_skipped_in_a_row={cfg.train.max_skipped_in_a_row}): the run "
                            f"has diverged; stopped, {kept}. Try a lower optim.lr or train.precision=fp32")


# ---------------------------------------------------------------------- random streams
def rng_state(aug_gen: torch.Generator) -> dict[str, Any]:
    """This process's random streams (torch, the augmentation's generator, CUDA's)."""
    state = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(ckpt: dict[str, Any], rank: int, aug_gen: torch.Generator) -> None:
    """Continue this rank's random streams where the checkpoint left them."""
    rng = ckpt.get("rng_per_rank", {}).get(str(rank))
    if rng is not None:
        set_rng_state(rng, aug_gen)


# ---------------------------------------------------------------------- resume
def read_resume_checkpoint(run: Run, model: nn.Module,
                           match: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """The run folder's checkpoint, or None: rank 0 alone reads it and every rank gets the same
    dict (the run folder need not be on a file system every node sees, and no rank can read a
    half-written file); refused with one CheckpointError line when this run cannot continue
    from it, before anything in it is used. ``match(ckpt)`` first brings the model to the shape
    the checkpoint records (e.g. heads dropped by model.drop_heads_after)."""
    path = run.checkpoint_path
    ckpt = load_resume_checkpoint(path) if run.main and path.exists() else None
    if run.world > 1:
        ckpt = tdist.broadcast_object(ckpt)
    if ckpt is not None:
        if match is not None and isinstance(ckpt.get("state"), dict):
            match(ckpt)
        check_resumable(ckpt, path, model)
    return ckpt


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The run folder's checkpoint, read without executing code; one-line CheckpointError otherwise."""
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


def check_resumable(ckpt: dict[str, Any], path: Path, model: nn.Module) -> None:
    """Refuse, with one line, a checkpoint this run cannot continue from (before touching the model)."""
    def refuse(why: str) -> None:
        raise CheckpointError(f"cannot resume from {path}: {why}. Move it away (or choose another --out) to start afresh")

    weights, state = ckpt.get("model"), ckpt.get("state")
    if not isinstance(weights, dict) or not isinstance(state, dict):
        refuse("it is not a twist training checkpoint (no model weights and run state)")
    counters = [state] + ([ckpt.get(ckpt["stage"])] if ckpt.get("stage", "twist") != "twist" else [])
    for c in counters:
        if not (isinstance(c, dict) and all(type(c.get(k)) is int and c[k] >= 0
                                            for k in ("epoch", "step_in_epoch", "global_step"))
                and type(c.get("heads_dropped", False)) is bool):
            refuse(f"its run state is invalid ({c!r:.200})")
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


def drop_unsaved_metrics(path: Path, last_epoch: int) -> None:
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
        write_text_atomic(path, "".join(keep))


def sweep_stale_temporaries(out: Path) -> None:
    """Remove the temporary checkpoint files a process killed while saving left behind."""
    for stale in stale_temporaries(out, CHECKPOINT_NAME):
        stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------- run folder and logs
def prepare_output(out: Path, session: TrainingSession | None = None) -> None:
    """Create the run folder, lock it for ``session`` before writing anything in it (a second
    process fails here, changing nothing), prove it is writable before any data is loaded, then
    record the session's provenance and status (twist.session)."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if session is not None:
            session.lock.acquire()
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)  # a little real data: a full disk fails here, not after an epoch
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        if session is not None:
            session.start()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # a full disk must not keep the probe's bytes
        raise TrainingError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def save_checkpoint_or_stop(payload: dict[str, Any], path: Path) -> None:
    """Save a checkpoint; a write that fails (disk full, folder removed) ends the run with one
    TrainingError line, the previous checkpoint being still whole (the write is atomic)."""
    try:
        save_checkpoint(payload, path)
    except OSError as exc:
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}; "
                            f"the previous checkpoint is intact") from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def report_skipped(dataset: ImageDataset, out: Path, written: int) -> int:
    """(Re)write OUT/skipped_files.tsv when the dataset's skipped list grew past ``written``
    entries (streamed folders add files that fail to decode during training); return its length."""
    if len(dataset.skipped) > written:
        dataset.write_skipped(out / SKIPPED_NAME)
        logger.info("skipped %d file(s) of the data; list in %s", len(dataset.skipped), out / SKIPPED_NAME)
    return len(dataset.skipped)


def summary(record: dict[str, Any]) -> str:
    """An epoch's metrics record as one short line for stderr."""
    keys = ["epoch", "loss", "consistency", "sharpness", "diversity", "acc", "nmi", "ari", "knn_top1", "clusters_used"]
    parts = []
    for k in keys:
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def progress_bar(iterable, desc: str, enabled: bool, initial: int = 0, total: int | None = None):
    """A tqdm bar over ``iterable``, or the iterable itself behind the same interface."""
    if not enabled:
        return NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, initial=initial, total=total, leave=False, dynamic_ncols=True)


class NoBar:
    """A progress bar that shows nothing (progress off, or not rank 0)."""

    def __init__(self, iterable):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def set_postfix(self, **_: Any) -> None:
        pass


def tensorboard(out: Path):
    """A TensorBoard writer for ``train.tensorboard=true`` (the per-epoch scalars of
    metrics.jsonl, under OUT/tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:
        raise ConfigError(f"train.tensorboard=true needs the tensorboard package ({exc}); install it with "
                          f"pip install 'twist[tensorboard]', or leave train.tensorboard off") from None
    return SummaryWriter(str(out / "tensorboard"))

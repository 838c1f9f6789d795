"""The EMA teacher of the ViT recipes (METHOD.md section 5).

The teacher is a copy of the student whose parameters follow an exponential moving average of
the student's after every optimiser step::

    teacher = m * teacher + (1 - m) * student        (m: cosine 0.996 -> 1 over training)

and whose buffers (BatchNorm running statistics of the head and NBS) are copied from the
student, so an exported teacher evaluates like a trained network. The teacher never receives
gradients. It runs on the two global crops only, under ``torch.no_grad``; its logits are the
targets of the consistency term (:class:`twist.loss.TwistLoss` with ``teacher=``):
``mean over (teacher view i, student view j != i) of KL(teacher_i || student_j)``.

Mode: the teacher stays in training mode, as in the release, so its BatchNorms (and the NBS in
particular) normalise with the statistics of its own batch, like the student's, and its
stochastic depth stays on: the release builds the teacher with the student's arguments
(``train.py``: ``teacher_model = TWIST(args)``, ``drop_path_rate=args.drop_path``) and never
switches it to eval mode, and its ``DropPath`` drops paths whenever ``self.training`` is true
(``vision_transformer.py``). With the ViT-B preset (``model.drop_path = 0.1``) the teacher's
targets therefore carry the same per-sample stochastic depth as the student's (DINO, by
contrast, disables it in its teacher). ViT-S uses no stochastic depth at all.

Example::

    >>> import torch
    >>> from twist.ema import make_teacher, update_teacher
    >>> student = torch.nn.Linear(3, 2)
    >>> teacher = make_teacher(student)
    >>> update_teacher(teacher, student, momentum=0.996)
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (unwrapped from DDP) to be used as the EMA teacher.

    Parameters do not require gradients; the copy is in training mode (batch statistics in its
    BatchNorms, stochastic depth as in the student), as the release's teacher.
    """
    teacher = copy.deepcopy(_unwrap(model))
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train()
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter; buffers
    (BatchNorm running statistics, counters) are copied from the student.

    ``student`` may be wrapped (DDP); parameters are matched in registration order, which
    :func:`make_teacher`'s deep copy preserves.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    student = _unwrap(student)
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters but the student has {len(s_params)}: "
                         f"the teacher must be a copy of the student (make_teacher)")
    if momentum < 1.0:
        by_dtype: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for t, s in zip(t_params, s_params):
            if t.shape != s.shape:
                raise ValueError(f"teacher/student parameter shape mismatch: {tuple(t.shape)} vs {tuple(s.shape)}")
            ts, ss = by_dtype.setdefault((t.device, t.dtype), ([], []))
            ts.append(t)
            ss.append(s.to(dtype=t.dtype, device=t.device))
        for ts, ss in by_dtype.values():
            torch._foreach_mul_(ts, momentum)
            torch._foreach_add_(ts, ss, alpha=1.0 - momentum)
    t_bufs = list(teacher.buffers())
    s_bufs = list(student.buffers())
    if len(t_bufs) != len(s_bufs):
        raise ValueError(f"teacher has {len(t_bufs)} buffers but the student has {len(s_bufs)}")
    for t, s in zip(t_bufs, s_bufs):
        t.copy_(s)

"""Multi-process training: synchronised BatchNorms and the DDP wrapper (METHOD.md section 3).

In a distributed run the release normalises

- every BatchNorm of the backbone and the head's two hidden BatchNorms over the *global*
  batch (all processes), and
- the NBS (``head.norm``, a non-affine BatchNorm over the logits) over *bunches* of about
  ``bunch_size`` images: consecutive ranks are grouped so that their per-rank batches add up
  to ``bunch_size`` (``ranks_per_group = max(1, bunch_size // per_rank_batch)``).

:func:`wrap_distributed` does both conversions and wraps the model in
``DistributedDataParallel``. It is only ever called when more than one process runs; with one
process the model keeps its plain ``nn.BatchNorm`` layers and nothing distributed is touched.

Which synchronised BatchNorm
----------------------------
On CUDA tensors torch's own :class:`torch.nn.SyncBatchNorm` is used (fused kernels, NCCL).
torch's version refuses CPU tensors, so on CPUs (gloo) :class:`SyncBatchNorm` of this module
is used: a custom autograd function that gathers every rank's per-channel (count, mean,
sum of squared deviations) in the forward pass and all-reduces per-channel ``sum(dy)`` and
``sum(dy * xhat)`` in the backward pass. Both compute the batch statistics of the whole
group, so the forward output, the input gradients and the running statistics are those a
single ``nn.BatchNorm`` would compute on the concatenated batch (running variance unbiased,
momentum 0.1 by default), and eval mode (running statistics, no communication) is identical.
``impl="twist"`` forces this module's version on every device.

Gradient convention: the gradient an input receives is that of the *sum* of every rank's
loss (like torch's SyncBatchNorm); DDP then averages parameter gradients over ranks, which
makes the step equal to the one-process step on the concatenated batch. The affine
parameters' gradients stay local: DDP averages them.

Example (inside a process group)::

    model = wrap_distributed(model, bunch_size=256, per_rank_batch=64, device=device)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "ranks_per_group", "bunch_groups", "convert_sync_batchnorm", "wrap_distributed"]


# ---------------------------------------------------------------------- the autograd function
class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of the batches of every rank in ``group`` (train mode).

    Forward: each rank computes per-channel count, mean and M2 (sum of squared deviations
    from its own mean) in float32; one all_gather brings every rank's triple; they are merged
    with the parallel-variance formula (numerically as good as a two-pass variance).
    Backward: one all_reduce of per-channel ``sum(dy)`` and ``sum(dy * xhat)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                momentum: float, group: Any, group_size: int) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n_local = xf.numel() // xf.shape[1]
        if n_local > 0:
            mean_local = xf.mean(dim=dims)
            m2_local = (xf - mean_local.view(shape)).square().sum(dim=dims)
        else:
            mean_local = xf.new_zeros(xf.shape[1])
            m2_local = xf.new_zeros(xf.shape[1])
        count_local = torch.full((1,), float(n_local), device=x.device, dtype=torch.float32)
        packed = torch.cat([count_local, mean_local, m2_local])
        gathered = [torch.empty_like(packed) for _ in range(group_size)]
        dist.all_gather(gathered, packed, group=group)
        stats = torch.stack(gathered)  # (G, 1 + 2C)
        c = xf.shape[1]
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
        n = counts.sum()
        if n.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n.item())} "
                             f"in the whole synchronisation group")
        mean = (counts * means).sum(0) / n
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / n  # biased: used to normalise
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None:
            with torch.no_grad():
                unbiased = m2 / (n - 1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.float().view(shape)
        if bias is not None:
            out = out + bias.float().view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group, ctx.group_size, ctx.has_bias = group, group_size, bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        dy = grad_out.float()
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        sum_dy_local = dy.sum(dim=dims)
        sum_dy_xhat_local = (dy * xhat).sum(dim=dims)
        grad_weight = sum_dy_xhat_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy_local.to(weight.dtype if weight is not None else dy.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy_local, sum_dy_xhat_local])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            c = sum_dy_local.shape[0]
            mean_dy = (sums[:c] / n).view(shape)
            mean_dy_xhat = (sums[c:] / n).view(shape)
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = ((dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


# ---------------------------------------------------------------------- the module
class SyncBatchNorm(_BatchNorm):
    """A BatchNorm whose training-mode statistics are those of every rank in ``process_group``.

    Same parameters, buffers and state-dict names as ``nn.BatchNorm{1,2,3}d``, so checkpoints
    do not change. In eval mode, or when the group holds one process (or none is initialised),
    it is exactly ``nn.functional.batch_norm`` and communicates nothing. Works on any device
    with any backend that supports ``all_gather`` and ``all_reduce`` (gloo on CPUs).

    Args:
        process_group: the group to synchronise over; None = all processes.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        group_size = self._group_size() if use_batch_stats else 1
        if not use_batch_stats or group_size == 1:
            return nn.functional.batch_norm(
                x, self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight, self.bias, use_batch_stats, momentum, self.eps)
        track = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, self.process_group, group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronised"


# ---------------------------------------------------------------------- groups and conversion
def ranks_per_group(bunch_size: int, per_rank_batch: int, world: int) -> int:
    """How many consecutive ranks share one NBS bunch: ``max(1, bunch_size // per_rank_batch)``,
    at most ``world``."""
    return max(1, min(world, bunch_size // max(per_rank_batch, 1)))


def bunch_groups(bunch_size: int, per_rank_batch: int) -> tuple[Any, list[list[int]]]:
    """Create the NBS groups on every rank; return (this rank's group, all rank lists).

    Groups are runs of consecutive ranks ``[0..k-1], [k..2k-1], ...``; when ``k`` does not
    divide the world size the last group is smaller. Every rank calls ``dist.new_group`` for
    every group in the same order, as torch requires (also when one group holds every rank:
    the NBS then has a communicator of its own). With ``k == 1`` no group is created and the
    NBS stays local to each rank (returned as the string "local").
    """
    world, me = dist.get_world_size(), dist.get_rank()
    k = ranks_per_group(bunch_size, per_rank_batch, world)
    ranks = [list(range(s, min(s + k, world))) for s in range(0, world, k)]
    if k == 1:
        return "local", ranks
    mine = None
    for r in ranks:
        g = dist.new_group(r)
        if me in r:
            mine = g
    return mine, ranks


def _sync_bn_like(bn: _BatchNorm, group: Any, impl: str) -> nn.Module:
    if group == "local":
        return bn
    cls = nn.SyncBatchNorm if impl == "torch" else SyncBatchNorm
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group=group)
    if bn.affine:
        new.weight = bn.weight  # keep the Parameter objects themselves
        new.bias = bn.bias
    new.running_mean = bn.running_mean
    new.running_var = bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _convert(module: nn.Module, group: Any, impl: str, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Replace every (non-synchronised) BatchNorm under ``module`` except those in ``skip``."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        return module if any(module is s for s in skip) else _sync_bn_like(module, group, impl)
    for name, child in list(module.named_children()):
        new = _convert(child, group, impl, skip)
        if new is not child:
            setattr(module, name, new)
    return module


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "torch" if torch.device(device).type == "cuda" else "twist"
    if impl not in ("torch", "twist"):
        raise ValueError(f"impl must be auto, torch or twist, got {impl!r}")
    return impl


def convert_sync_batchnorm(model: nn.Module, bunch_size: int, per_rank_batch: int,
                           device: torch.device | str = "cpu", impl: str = "auto") -> nn.Module:
    """Synchronise the BatchNorms of a TWIST model in place (and return it).

    The NBS (``head.norm``) is synchronised within bunches of ranks (:func:`bunch_groups`),
    every other BatchNorm over all ranks. Call it on every rank, in the same order, for every
    model that gets converted (the group creation is collective). Parameter and buffer
    objects are kept, so optimisers, EMA teachers and state dicts are unaffected.
    """
    impl = _resolve_impl(impl, device)
    heads = getattr(model, "trained_heads", None) or ([model.head] if hasattr(model, "head") else [])
    todo = [h for h in heads if isinstance(getattr(h, "norm", None), _BatchNorm)
            and not isinstance(h.norm, (SyncBatchNorm, nn.SyncBatchNorm))]
    skip = []
    if todo:
        group, _ = bunch_groups(bunch_size, per_rank_batch)
        for h in todo:
            h.norm = _sync_bn_like(h.norm, group, impl)
            skip.append(h.norm)
    return _convert(model, None, impl, tuple(skip))


def wrap_distributed(model: nn.Module, bunch_size: int, per_rank_batch: int, device: torch.device | str,
                     impl: str = "auto") -> nn.Module:
    """Synchronise the model's BatchNorms and wrap it in ``DistributedDataParallel``.

    Needs an initialised process group with more than one process. DDP broadcasts rank 0's
    parameters and buffers at construction (so every rank starts from the same weights) and
    averages gradients over ranks after each backward pass. ``model.module`` is the plain
    model (same state-dict names as in a one-process run).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_distributed needs an initialised torch.distributed process group")
    device = torch.device(device)
    convert_sync_batchnorm(model, bunch_size, per_rank_batch, device, impl)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               output_device=device_ids[0] if device_ids else None)

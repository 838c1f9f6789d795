"""Everything in twist that touches ``torch.distributed``, in one place.

With one process (a laptop CPU, one GPU) none of these functions calls into
``torch.distributed``: they check :func:`is_distributed` first and return the local answer.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all processes, differentiable.

    The backward pass all-reduces the incoming gradients too (:class:`_AllReduceSum`), so
    each process receives the gradient of the *global* quantity, not only of its own
    contribution. A plain ``dist.all_reduce`` (invisible to autograd) or
    a gather whose backward does not sum over ranks silently scales gradients by
    1 / world_size: the bug METHOD.md section 2 warns about.
    """
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x) / dist.get_world_size()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is the sum over processes of the incoming gradients.

    Every process's output is the same sum S = sum_r x_r, and every process's loss depends on
    it; so d(sum_r' L_r') / d x_r = sum_r' dL_r'/dS: the backward pass all-reduces too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_mean_nograd(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor used only for logging (no autograd)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def init_from_env(device_type: str) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    NCCL for CUDA devices (plus gloo for CPU tensors), gloo for CPUs; the rendezvous comes from the environment torchrun
    (or a launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) provides. Returns True
    when a group is initialised (by this call or before it). With WORLD_SIZE unset or 1 nothing
    in torch.distributed is called.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    # On GPUs, NCCL for CUDA tensors and gloo for the few CPU tensors (loss sums, flags,
    # pickled objects) so that every collective works whatever device its tensor is on.
    backend = "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only when ``flag`` is true on every process (e.g. "loss and gradients are finite"),
    so that all processes take the same decision."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every process (pickled; for small or one-off objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every process, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def shard(n: int) -> tuple[int, int]:
    """This process's contiguous slice ``[start, stop)`` of ``n`` items (sizes differ by <= 1).

    Unlike a padded sampler, the shards are disjoint and cover every item exactly once, so
    gathered results hold no duplicates.
    """
    world, me = world_size(), rank()
    base, extra = divmod(n, world)
    start = me * base + min(me, extra)
    return start, start + base + (1 if me < extra else 0)


def gather_rows(x: torch.Tensor, n: int, dst: int = 0, device: torch.device | str | None = None) -> torch.Tensor | None:
    """Concatenate every process's :func:`shard` of rows (``x`` holds this process's shard of
    ``n`` rows) on rank ``dst``; other ranks get None. ``device`` is where the transfer happens
    (a CUDA device with NCCL); the result is on ``x``'s device."""
    if not is_distributed():
        return x
    world = world_size()
    base, extra = divmod(n, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    longest = max(sizes)
    home = x.device
    dev = torch.device(device) if device is not None else home
    padded = torch.zeros((longest,) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if rank() != dst:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(home)


def gather_objects(obj: dict) -> dict:
    """Merge one small dict from every process (e.g. per-rank RNG states) into one dict."""
    if not is_distributed():
        return obj
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged

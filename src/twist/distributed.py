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

    The backward pass of ``torch.distributed.nn.functional.all_reduce`` all-reduces the
    incoming gradients too, so each process receives the gradient of the *global* quantity,
    not only of its own contribution. A plain ``dist.all_reduce`` (invisible to autograd) or
    a gather whose backward does not sum over ranks silently scales gradients by
    1 / world_size: the bug METHOD.md section 2 warns about.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM) / dist.get_world_size()


def all_reduce_mean_nograd(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor used only for logging (no autograd)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def init_from_env(device_type: str) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    NCCL for CUDA devices, gloo for CPUs. Returns True when a group was initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


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

"""Where and how a run computes: the device, the numeric precision and its autocast context,
the seeds, the CPU allocator setting, and the model under a DDP wrapper. Shared by training,
serving, prediction, the evaluation protocols and the benchmarks, so that they all choose a
device and a precision the same way."""

from __future__ import annotations

import contextlib
import os
import random
import sys

import numpy as np
import torch
from torch import nn

from twist.config import ConfigError

__all__ = ["resolve_device", "cpu_supports_bf16", "keep_freed_cpu_memory", "resolve_precision",
           "autocast_context", "seed_everything", "unwrap"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: 'auto' is this process's GPU (``LOCAL_RANK`` under torchrun)
    when there is one, else the CPU; asking for CUDA without it is a configuration error."""
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
    resident memory). Process-wide; called by :func:`twist.train.train` on CPU. Returns False (and changes
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
    """``train.precision`` for ``device``: 'auto' picks the fastest precision the hardware runs
    natively (bf16 or fp16 on a GPU, bf16 on a CPU with bf16 units, fp32 otherwise)."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on a CPU")
    return name


def autocast_context(device: torch.device, precision: str):
    """The forward pass's autocast for ``precision`` (nothing for fp32), the same in every caller."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch together, so that a run's initial weights follow its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or any ``.module``) wrapper; the model itself otherwise."""
    return model.module if hasattr(model, "module") else model

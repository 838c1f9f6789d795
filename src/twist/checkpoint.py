"""Checkpoints: written atomically, loaded without executing code.

A twist checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)``: unpickling is restricted to those types and a crafted
file cannot run code. Writing goes to a temporary file in the same folder, is flushed to disk,
then renamed over the old checkpoint, so a crash leaves either the old or the new file, never
half of one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from twist.io import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "twist/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or needs a trust opt-in."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`twist.io.atomic_write`: a unique temporary
    file beside it, fsync, rename)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"no {CHECKPOINT_NAME} in run folder {path}")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals (classes, functions) a torch file's pickle refers to beyond what
    ``weights_only`` loading allows, found by scanning the pickle without executing it
    (empty when the file cannot be scanned, e.g. the legacy non-zip format)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def load_checkpoint(path: str | Path, trust_pickle: bool = False, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict.

    By default only tensors and plain containers are unpickled (``weights_only=True``). Files
    holding other objects (the authors' release stores an argparse Namespace) are refused
    with a message; ``trust_pickle=True`` loads them with full unpickling, which can execute
    code from the file, so use it only for files you trust.
    """
    path = resolve_checkpoint(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        found = unsafe_globals(path)
        hint = (" It looks like a checkpoint of the authors' release (its only extra object is the args "
                "Namespace): import it safely with `twist import FILE --out RUN_DIR`."
                if found == ["argparse.Namespace"] else "")
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers"
            f"{' (' + ', '.join(found) + ')' if found else ''}, so it was not loaded (loading it could "
            f"execute code).{hint} If you trust this file, pass --trust-pickle (Python: trust_pickle=True)."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    return obj

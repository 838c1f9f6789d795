"""Where a run came from: versions, code commit, machine and command line.

A number in a results table is only worth what can be told about the run that made it. Every
training session records :func:`collect`'s answer in ``RUN/provenance.json`` (one entry per
session: a resumed run has several) and in each checkpoint it writes; ``twist --version``
prints :func:`version_line`.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import twist


def git_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout twist's own source files are in, or None
    (installed from a wheel, git missing, not a checkout). A checkout that merely contains the
    installed package (a virtualenv inside another repository) does not count."""
    here = Path(twist.__file__).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here.parent, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / "src" / "twist" / "__init__.py").resolve() != here:
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def collect(argv: list[str] | None = None) -> dict[str, Any]:
    """This process's provenance record (plain JSON types: it goes into checkpoints, which are
    loaded with ``weights_only``)."""
    git = git_commit()
    return {
        "twist": twist.__version__,
        "git_commit": git["commit"] if git else None,
        "git_dirty": git["dirty"] if git else None,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def version_line() -> str:
    """What ``twist --version`` prints: twist's version (and commit when run from a checkout),
    and the versions it runs with."""
    git = git_commit()
    commit = f" (git {git['commit'][:12]}{', modified' if git['dirty'] else ''})" if git else ""
    return (f"twist {twist.__version__}{commit}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
            f"Python {platform.python_version()}")

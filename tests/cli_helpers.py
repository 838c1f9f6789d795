"""What the tests that run ``twist train`` in a child process share: the command line and the
child's environment (unbuffered, so that a test reading stderr line by line sees each line when
it is written; one thread, so that two such children fit on a 2-core machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def train_command(data: str, out: Path, overrides: list[str], *args: str) -> list[str]:
    """``python -m twist train DATA --out OUT ARGS... --set K=V ...``."""
    cmd = [sys.executable, "-m", "twist", "train", data, "--out", str(out), *args]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

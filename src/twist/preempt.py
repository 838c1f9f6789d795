"""Pre-emption: a stop signal ends training at the next step boundary, with a checkpoint.

Cluster schedulers (SLURM, Kubernetes) pre-empt a job by sending SIGTERM and kill it for good a
little later; SLURM can also send SIGUSR1 ahead of time (``#SBATCH --signal=B:USR1@120``).
Python's default reaction to SIGTERM is to die at once, losing every step since the last
checkpoint. :class:`StopSignals` replaces that reaction, for as long as a training session runs,
with a handler that only records the signal; the training loops ask :meth:`StopSignals.requested`
after each optimiser step, write their mid-epoch checkpoint when it says yes and end with
:meth:`StopSignals.stop`, which raises :class:`Preempted` (the command line exits with 143, the
status a process killed by SIGTERM has, so schedulers and scripts read it the same way).

Several processes: the signal may reach some ranks and not others (or at different steps), so
the flag is agreed by an all-reduce at every step boundary (only when there is more than one
process): all ranks stop after the same step and write one consistent checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import NoReturn

import torch

from twist import distributed as tdist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a scheduler expects from a process it asked to stop


class Preempted(Exception):
    """Training stopped on a stop signal after writing a checkpoint; re-running the same command
    resumes exactly where it stopped."""


class StopSignals:
    """Record SIGTERM / SIGUSR1 instead of dying, while the ``with`` block runs.

    The previous handlers are restored on exit. Handlers can only be installed from the main
    thread; elsewhere (training started from a worker thread) nothing is installed and
    :meth:`requested` stays False, so the signals keep their previous effect.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None  # the signal number, set by the handler (the only mutable state)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not set from Python (embedding program); SIG_DFL is the closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether a stop signal reached this process or, with several processes, any of them
        (an all-reduce: call it at the same step boundary on every rank)."""
        here = self.received is not None
        if tdist.world_size() <= 1:
            return here
        return not tdist.all_true(not here, device)

    def stop(self, where: str) -> NoReturn:
        """Raise :class:`Preempted` once the checkpoint is written; every rank waits for rank 0's
        files first, so no process exits (and gets the others killed) while it writes."""
        tdist.barrier()
        name = signal.Signals(self.received).name if self.received else "a stop signal (on another process)"
        raise Preempted(f"pre-empted: {name} received; stopped after {where} with a checkpoint written. "
                        f"Re-run the same command to resume")

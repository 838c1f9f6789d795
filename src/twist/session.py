"""A training session in a run folder: its lock, its provenance, its status, its stop signals.

``twist train`` wraps a whole run (both stages) in one :class:`TrainingSession`:

- on entry it starts recording stop signals (:mod:`twist.preempt`) in every process;
- process 0, before it writes anything to the folder, takes the folder's lock
  (:mod:`twist.runlock`: a second process fails and changes nothing), then
  :meth:`TrainingSession.start` appends this session's provenance to ``RUN/provenance.json``
  and writes ``RUN/status.json`` with state ``running``;
- on exit it writes the final state and releases the lock.

``RUN/status.json`` is how a re-queued job (or a person) tells how the last session ended:

=============  ==========================================================================
``running``    a process is training now, or one died without a word (kill -9, lost node,
               power): then ``train.lock`` is not held (``flock`` dies with its process)
``done``       every epoch trained; re-running changes nothing
``preempted``  stopped on SIGTERM / SIGUSR1 after writing a checkpoint (exit status 143)
``interrupted`` stopped by Ctrl-C (exit status 130)
``failed``     stopped by an error (``message`` says which; exit status 1 or 2)
=============  ==========================================================================

Both files are replaced atomically (:func:`twist.io.write_text_atomic`).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from twist.io import write_text_atomic
from twist.preempt import Preempted, StopSignals
from twist.provenance import collect
from twist.runlock import RunLock

STATUS_NAME = "status.json"
PROVENANCE_NAME = "provenance.json"


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_status(folder: str | Path) -> dict[str, Any] | None:
    """``RUN/status.json`` as a dict, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class TrainingSession:
    """See the module docstring. ``stop`` is the session's :class:`~twist.preempt.StopSignals`;
    ``provenance`` this session's record (None until :meth:`start`, and on processes other
    than 0)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.stop = StopSignals()
        self.lock = RunLock(self.folder)
        self.provenance: dict[str, Any] | None = None

    def __enter__(self) -> "TrainingSession":
        self.stop.__enter__()
        return self

    def start(self) -> None:
        """Process 0, after :meth:`RunLock.acquire`: record provenance and state ``running``."""
        self.provenance = collect()
        path = self.folder / PROVENANCE_NAME
        try:
            sessions = json.loads(path.read_text(encoding="utf-8")).get("sessions", [])
        except (OSError, ValueError, AttributeError):
            sessions = []
        _write_json(path, {"sessions": [*sessions, self.provenance]})
        self._status("running")

    def _status(self, state: str, message: str | None = None) -> None:
        record = {"state": state, "pid": self.provenance["pid"], "host": self.provenance["host"],
                  "started": self.provenance["started"],
                  "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if message:
            record["message"] = message
        _write_json(self.folder / STATUS_NAME, record)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.__exit__(exc_type, exc, tb)
        try:
            if self.provenance is not None:
                state = ("done" if exc_type is None else "preempted" if issubclass(exc_type, Preempted)
                         else "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
                try:
                    self._status(state, None if exc is None else " ".join(str(exc).split()) or exc_type.__name__)
                except OSError:
                    pass  # a full disk must not hide the error that ended the run
        finally:
            self.lock.release()

"""Status messages of the command line: Python's ``logging``, configured once by ``twist``.

The library only logs (``logging.getLogger(__name__)`` in each module) and never configures
logging, so a program that imports twist decides where its messages go. The command line calls
:func:`configure_logging` once: messages of the ``twist`` loggers go to stderr as
``twist: message`` (``twist: warning: message`` from warnings up). Process 0 shows INFO and up
(``-v``: DEBUG too, ``-q``: warnings and errors only); the other processes of a distributed run
show warnings and errors only, prefixed with their rank, so a torchrun log is not N copies of
the same lines.
"""

from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "twist-cli"


class _Formatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = "twist: " if rank == 0 else f"twist (rank {rank}): "

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = self.prefix + level + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (test harnesses and
    callers that redirect stderr after logging was configured see the messages)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(verbosity: int = 0, rank: int | None = None) -> None:
    """Send the ``twist`` loggers' messages to stderr. ``verbosity``: -1 quiet (warnings and
    errors), 0 normal (info), 1 verbose (debug). ``rank`` defaults to ``$RANK`` (torchrun);
    ranks other than 0 show warnings and errors only. Calling it again replaces the set-up."""
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
    logger = logging.getLogger("twist")
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter(rank))
    logger.addHandler(handler)
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))

"""One training process per run folder: an advisory lock file, ``RUN/train.lock``.

Two ``twist train`` processes writing the same folder would interleave their metrics lines and
overwrite each other's checkpoints. The first one to start holds an exclusive ``flock`` on
``RUN/train.lock`` (and writes its pid and host into it) until it exits; a second one fails at
once with a message naming the holder and changes nothing in the folder. The kernel drops a
``flock`` when its process dies, however it dies (SIGKILL, power loss of the holder's machine
on most network file systems), so a lock file left behind by a dead process never blocks: only
a live holder does. The file is removed when the holder exits normally.

POSIX only (``fcntl``); where it is missing (Windows) no lock is taken.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = "train.lock"


class RunFolderInUse(RuntimeError):
    """Another live process is training in this run folder."""


class RunLock:
    """``acquire()`` / ``release()`` the run folder's lock (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderInUse`; an OSError when the folder cannot
        hold the file (the caller reports it as an unwritable folder)."""
        if fcntl is None or self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").split()
                os.close(fd)
                who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                raise RunFolderInUse(f"run folder {self.path.parent} is in use: {who} is training in it "
                                     f"(lock {self.path}); wait for it to end, or choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            # the previous holder may have removed the file between our open and our flock: then
            # we hold a lock on a deleted file and must lock the one now at the path instead
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so that nobody can lock the
        removed file believing it is the folder's lock)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

"""File descriptors prepared for a fork chain, and the chain's one-line reports.

A fork chain (holder, workload, exec probe) opens everything its children need before
forking: after fork, a multi-threaded parent's child may only make plain syscalls.
Every fd is moved to 3 or above, because a daemonised controller may run with 0-2
closed and the children's dup2() onto stdio must never overwrite one of ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class FdSet:
    """fds opened for one fork chain, closed together; all >= 3 and close-on-exec."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        """Keep `fd` (moved to 3 or above)."""
        if fd < 3:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = high
        self.fds.append(fd)
        return fd

    def open_fd(self, path: str | Path, flags: int, mode: int = 0o600) -> int:
        """os.open with O_CLOEXEC, kept in the set."""
        return self.add(os.open(path, flags | os.O_CLOEXEC, mode))

    def pipe(self) -> tuple[int, int]:
        """An O_CLOEXEC pipe (read end, write end)."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        return self.add(read_fd), self.add(write_fd)

    def close_one(self, fd: int) -> None:
        """Close one fd early (e.g. the parent's copy of a pipe's write end)."""
        self.fds.remove(fd)
        os.close(fd)

    def close(self) -> None:
        """Close every fd still open."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def report(fd: int, message: str) -> None:
    """Write one message to a report pipe (child side; async-signal-safe enough)."""
    # One write below PIPE_BUF is atomic; a vanished reader (EPIPE) is not our problem.
    with contextlib.suppress(OSError):
        os.write(fd, message.encode(errors="replace"))

"""The instance lock: one writer of an instance's state at a time.

The lock is `flock(LOCK_EX)` on a file of its own, `<state-dir>/<instance>/lock`, never on
the state file: the state file is replaced by rename on every write, and a lock on a
replaced inode protects nothing.

Why `flock`: the kernel drops it when the last descriptor of the open file goes away, so
a holder that crashes or is killed cannot leave a stale lock behind. What the file
*contains* is only for humans and messages: the holder writes
`{"pid", "startTime", "command", "since"}` after taking the lock, so a refused second
controller can say who is in the way. The content of a released or crashed holder stays
in the file; it is "stale" simply because the flock is free, and the next holder
overwrites it. Start time is recorded next to the pid because pids are reused.

One case needs the content to be read with care: the flock is held, but the recorded
holder is dead. Then some other process inherited the locked descriptor (a fork without
exec: the descriptor is close-on-exec, so exec'd children never get it). The message says
so and, when it can find them through `/proc/*/fdinfo`, names the processes holding it.

The lock file is never deleted: a process waiting on an unlinked inode would "win" a lock
that a new opener of the path does not see.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from reconciler.errors import LockedError, StateError
from reconciler.state.procinfo import process_alive, process_start_time

# How often a waiting acquire() retries. flock has no timed wait; polling a non-blocking
# attempt against a deadline keeps the wait bounded and interruptible.
_POLL_INTERVAL = 0.05
_COMMAND_MAX = 200
_MAX_NAMED_HOLDERS = 5


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _default_command() -> str:
    """How this process was started, short enough for a one-line message."""
    argv = list(sys.argv) or ["?"]
    name = os.path.basename(argv[0])
    if name == "__main__.py":  # `python -m reconciler`: name the package, not the file
        name = os.path.basename(os.path.dirname(argv[0])) or name
    command = " ".join([name, *argv[1:]])
    return command if len(command) <= _COMMAND_MAX else command[: _COMMAND_MAX - 3] + "..."


def _describe(record: dict[str, Any]) -> str:
    """`pid 1234 (reconciler run) since 2024-...` from a holder record."""
    text = f"pid {record.get('pid', '?')}"
    if record.get("command"):
        text += f" ({record['command']})"
    if record.get("since"):
        text += f" since {record['since']}"
    return text


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _processes_holding(st: os.stat_result) -> list[int]:
    """Best effort: pids with a descriptor that holds an flock on the file `st` describes.

    Only used to explain a refusal, so every error (a process exiting mid-scan, a
    descriptor we may not inspect) is skipped rather than reported.
    """
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                fd_st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (fd_st.st_dev, fd_st.st_ino) != (st.st_dev, st.st_ino):
                    continue
                # fdinfo lists the locks owned by this open file description, so a process
                # that merely has the file open (a waiting contender) is not named.
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    if any(line.startswith("lock:") for line in f):
                        found.append(pid)
                        break
            except OSError:
                continue
        if len(found) >= _MAX_NAMED_HOLDERS:
            break
    return found


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder record in lock file `path`, or None if absent, empty or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    return _parse_holder(text)


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def _record_alive(record: dict[str, Any]) -> bool:
    start = record.get("startTime")
    return isinstance(start, int) and process_alive(record["pid"], start)


class InstanceLock:
    """Exclusive, non-blocking `flock` on `path`; a context manager.

    `wait` is how many seconds `acquire()` keeps retrying before it raises `LockedError`.
    `instance` names the instance in messages (default: the lock file's directory name).
    `command` is recorded for other processes' messages (default: this process's argv).
    """

    def __init__(
        self,
        path: Path,
        *,
        instance: str | None = None,
        command: str | None = None,
        wait: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self.instance = instance if instance is not None else self.path.parent.name
        self.command = command if command is not None else _default_command()
        self.wait = wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, *, wait: float | None = None) -> None:
        """Take the lock, retrying for `wait` seconds (default: the constructor's `wait`).

        Raises `LockedError` naming the holder when the lock stays taken.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held by this object")
        deadline = time.monotonic() + (self.wait if wait is None else wait)
        while True:
            fd = self._open()
            try:
                outcome = self._try_flock(fd)
                if outcome == "locked":
                    self._write_record(fd)
                    self._fd = fd
                    return
                error = None if outcome == "replaced" else self._locked_error(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if error is None:
                continue  # the path was swapped under us: lock the new file instead
            if time.monotonic() >= deadline:
                raise error
            time.sleep(_POLL_INTERVAL)

    def release(self) -> None:
        """Drop the lock (a no-op if not held). The file stays; see the module docstring."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Clear our record first so `holder()` of a released lock reads "nobody".
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def holder(self) -> dict[str, Any] | None:
        """The live holder's record (`pid`, `startTime`, `command`, `since`), or None.

        Reads the file only, so it never disturbs a contender; a record whose process is
        gone (a crashed holder) reads as None.
        """
        record = read_holder(self.path)
        if record is None or not _record_alive(record):
            return None
        return record

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_CLOEXEC: a workload we spawn must never inherit (and so keep) the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise StateError(
                f"cannot open lock file {self.path}: {e.strerror}; "
                "check that the state directory is writable by this user"
            ) from e
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask
        return fd

    def _try_flock(self, fd: int) -> Literal["locked", "busy", "replaced"]:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return "busy"
            raise StateError(f"cannot lock {self.path}: {e.strerror}") from e
        # If the path was replaced between open() and flock() (someone deleted the file),
        # our lock is on an orphaned inode that nobody else will ever look at.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return "replaced"
        return "locked"

    def _write_record(self, fd: int) -> None:
        pid = os.getpid()
        record = {
            "pid": pid,
            "startTime": process_start_time(pid),
            "command": self.command,
            "since": _now_rfc3339(),
        }
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as e:
            raise StateError(
                f"cannot write lock file {self.path}: {e.strerror}; check free space and "
                "permissions of the state directory"
            ) from e

    def _locked_error(self, fd: int) -> LockedError:
        """Explain who holds the lock, in one line."""
        try:
            record = _parse_holder(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
        except OSError:
            record = None
        where = f'instance "{self.instance}" is locked'
        if record is not None and _record_alive(record):
            return LockedError(f"{where} by {_describe(record)}; stop it first, or wait")
        # The flock is held but no live process claims it: an inherited descriptor, or a
        # holder that has not written its record yet.
        holders = _processes_holding(os.fstat(fd))
        by = ", ".join(f"pid {p} ({_comm(p)})" for p in holders)
        if record is not None:
            gone = f"recorded holder {_describe(record)} has exited"
            who = (
                f"{by} still holds {self.path}"
                if by
                else f"find it with: lslocks | grep {self.path}"
            )
            return LockedError(
                f"{where}, held by an inherited descriptor: {gone}; {who}; stop that process"
            )
        if by:
            return LockedError(f"{where} by {by} (no holder record yet); stop it first, or wait")
        return LockedError(
            f"{where} by another process (no holder recorded in {self.path}); "
            "stop it first, or wait"
        )

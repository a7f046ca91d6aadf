"""Capture files for workload stdout/stderr: where they live, how they stay bounded, how
they are read back.

A workload writes its output *itself*: its fds 1 and 2 are one file opened by the
controller with O_APPEND before the fork, so output reaches the disk even while no
controller runs, and a restarted controller loses nothing. Layout:

    <state-dir>/<instance>/logs/<env>/<process>.log     current output (both streams)
    <state-dir>/<instance>/logs/<env>/<process>.log.1   the previous part, after rotation
    <state-dir>/<instance>/logs/<env>/<process>.exit    exit record (written by the shim,
                                                         see reconciler.kernel.processes)

Bounded by rotation, *copy-truncate* style (what logrotate calls `copytruncate`): the
writer's fd cannot be re-pointed at a new file, so the reader side copies the file to
`.1` (atomically replacing the old `.1`) and truncates the original to zero. O_APPEND
makes the writer's next write land at the new end (offset 0), never past it, so no
sparse hole appears. The price is a tiny window: bytes appended between the end of the
copy and the truncate are lost. We copy again whatever arrived during the first copy, so
the window is one `ftruncate` long. At most `2 * max_bytes` per process stay on disk.

`read_logs` yields the rotated part first, then the current file; with `follow=True` it
keeps polling the current file (a user-facing `tail -f`, not synchronisation), notices a
truncate (rotation) or a replaced file, and continues without losing the bytes the
rotation moved to `.1`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
LOG_SUFFIX = ".log"
ROTATED_SUFFIX = ".1"
_CHUNK = 64 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def env_log_dir(instance_dir: Path, env: str) -> Path:
    """`<instance_dir>/logs/<env>`, where `instance_dir` is `<state-dir>/<instance>`."""
    return Path(instance_dir) / "logs" / env


def log_path(log_dir: Path, process: str) -> Path:
    """The capture file of one process: `<log_dir>/<process>.log`."""
    return Path(log_dir) / f"{process}{LOG_SUFFIX}"


def rotated_path(path: Path) -> Path:
    """Where `rotate_if_needed` keeps the previous part of `path`: `<path>.1`."""
    return path.with_name(path.name + ROTATED_SUFFIX)


def logged_processes(log_dir: Path) -> list[str]:
    """Names of the processes that have a capture file in `log_dir`, sorted."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    return sorted(n[: -len(LOG_SUFFIX)] for n in names if n.endswith(LOG_SUFFIX))


def open_for_append(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Rotate `path` if it is too big, then open it O_APPEND (created 0600); return the fd.

    The fd is close-on-exec: whoever hands it to a workload dups it onto fds 1 and 2.
    Parent directories are created 0700 (logs may hold secrets a workload printed).
    """
    path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    rotate_if_needed(path, max_bytes=max_bytes)
    return os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, _FILE_MODE
    )


def rotate_if_needed(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Copy-truncate `path` into `<path>.1` once it holds at least `max_bytes`.

    True if it rotated. Safe while a writer appends (see the module docstring for the
    one-`ftruncate` window in which appended bytes are lost).
    """
    try:
        if os.stat(path).st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    rotated = rotated_path(path)
    temp = rotated.with_name(f".{rotated.name}.{os.getpid()}.tmp")
    with open(path, "rb") as source, open(temp, "wb") as target:
        os.fchmod(target.fileno(), _FILE_MODE)
        _copy_to_end(source, target)
        # Whatever the writer appended during the copy: copy it too, then truncate
        # at once. Only bytes written between this read and the truncate are lost.
        _copy_to_end(source, target)
        os.truncate(path, 0)
        target.flush()
        os.fsync(target.fileno())
    os.replace(temp, rotated)
    return True


def _copy_to_end(source: BinaryIO, target: BinaryIO) -> None:
    while chunk := source.read(_CHUNK):
        target.write(chunk)


# --------------------------------------------------------------------------- reading


class _Tail:
    """Read position in one capture file; survives rotation (copy-truncate) and replacement.

    A rotation is recognised by a new `.1` (every rotation makes a new inode there), not
    by the file having shrunk: by the next look the writer may have refilled it past our
    offset. Two rotations between two looks lose the older one's unread tail.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.rotated: tuple[int, int] | None = None
        self.partial = b""

    def start(self) -> bytes:
        """Everything there is now: the rotated part, then the current file."""
        data = b""
        with contextlib.suppress(FileNotFoundError), open(rotated_path(self.path), "rb") as old:
            self.rotated = _identity(old.fileno())
            data = old.read()
        return data + self.poll()

    def poll(self) -> bytes:
        """The bytes appended since the last call (handles rotation and replacement)."""
        data = self._rotated_tail()
        try:
            with open(self.path, "rb") as handle:
                identity = _identity(handle.fileno())
                shrunk = os.fstat(handle.fileno()).st_size < self.offset
                if self.identity is not None and (identity != self.identity or shrunk):
                    self.offset = 0  # replaced, or truncated by someone else
                self.identity = identity
                handle.seek(self.offset)
                data += handle.read()
                self.offset = handle.tell()
        except FileNotFoundError:
            pass
        return data

    def _rotated_tail(self) -> bytes:
        """After a rotation: what we had not read yet, now at our offset in `.1`."""
        try:
            with open(rotated_path(self.path), "rb") as old:
                identity = _identity(old.fileno())
                if identity == self.rotated:
                    return b""
                self.rotated = identity
                old.seek(self.offset)
                tail = old.read()
        except FileNotFoundError:
            return b""
        self.offset = 0  # the current file restarted from empty
        return tail

    def lines(self, data: bytes, *, final: bool) -> list[str]:
        """Complete lines of `partial + data` (with their newline); keeps the rest.

        `final`: also return an unterminated last line (end of a non-follow read).
        """
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        out = [line.decode(errors="replace") + "\n" for line in complete]
        if final and self.partial:
            out.append(self.partial.decode(errors="replace"))
            self.partial = b""
        return out


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def read_logs(path: Path, *, follow: bool = False, interval: float = 0.25) -> Iterator[str]:
    """Lines of one capture file (rotated part first); with `follow`, never ends.

    Lines keep their trailing newline; a last line without one is yielded as is when not
    following (when following, it is held back until its newline arrives).
    """
    for _, line in read_many({"": path}, follow=follow, interval=interval):
        yield line


def read_many(
    paths: Mapping[str, Path], *, follow: bool = False, interval: float = 0.25
) -> Iterator[tuple[str, str]]:
    """(name, line) for several capture files: each file's content in turn, then, with
    `follow`, new lines from any of them as they come (polled every `interval` seconds).
    """
    tails = {name: _Tail(path) for name, path in paths.items()}
    for name, tail in tails.items():
        for line in tail.lines(tail.start(), final=not follow):
            yield name, line
    while follow:
        produced = False
        for name, tail in tails.items():
            for line in tail.lines(tail.poll(), final=False):
                produced = True
                yield name, line
        if not produced:
            # A user-facing `tail -f` loop, not synchronisation: nothing waits on it.
            time.sleep(interval)

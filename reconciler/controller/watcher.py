"""The directory watcher: inotify on the manifests directory, read by the trigger loop.

It answers one question - "did something a manifest could live in change, and is that
file whole again?" - and hands out `Change(path, settled)` values (the controller feeds
a `Debouncer`). It never reads a file and never says *what* changed: the reconcile
re-reads the whole directory anyway.

What counts (contract section 2): `*.yaml`, `*.yml` and `*.json` files, recursively, and
directories (a moved-in directory may hold manifests), but nothing hidden (any path
component starting with `.`: `.git`, an editor's `.x.yaml.swx`), and no file the loader
skips either (`#x#`, `*~`, `*.swp`, `*.swx`, `*.tmp`). Opening and reading files is
deliberately *not* in the inotify mask: the reconcile reads every manifest, and a
watcher that reacted to that would trigger itself forever.

Settled or not (see `debounce`): a rename into place (`IN_MOVED_TO`) and a close after
writing (`IN_CLOSE_WRITE`) leave the file whole; a create, a modify, an attribute
change, a delete or a rename away may be the first half of a save.

Why raw inotify rather than watchdog: watchdog hands every event through three threads,
wakes its dispatcher every second while idle, and holds a rename's `IN_MOVED_FROM` for up
to half a second to pair it with its `IN_MOVED_TO` - which delayed an editor's atomic
save by that much whenever the pairing raced. Here there is no thread at all: the
controller's trigger loop polls `fileno()` together with its other sources and calls
`read()` when it is readable. Pairing is not needed: each half of a rename is judged by
its own name.

Directories: every non-hidden directory of the tree has a watch (a new or moved-in
directory gets watches for its whole subtree when its event is read; a removed or
moved-away one loses them). The directory itself can disappear (`rm -r`, a `mv` of the
whole tree, a checkout that replaces it): its watch dies with it, so the parent is
watched too (only events about the manifests directory's own name count), and
`ensure_watching()` re-creates the watches whenever the directory exists under a new
inode. A missing directory is reported by the reconcile ("does not exist"), never taken
to mean "nothing declared". An inotify queue overflow (events lost) reports the whole
directory as changed and re-checks every watch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from reconciler.errors import ReconcilerError
from reconciler.manifests.loader import SUFFIXES

log = structlog.get_logger("reconciler.controller")

# <sys/inotify.h>
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

# Everything that can change what the directory declares; not opened / closed-unwritten.
_TREE_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_PARENT_MASK = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
_SETTLED = IN_CLOSE_WRITE | IN_MOVED_TO
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name
_READ_SIZE = 64 * 1024
_IGNORED_ENDINGS = ("~", ".swp", ".swx", ".tmp")


@dataclass(frozen=True)
class Change:
    """A relevant event: `path` changed; `settled`: the event leaves the file whole."""

    path: str
    settled: bool


def is_relevant(path: str, *, root: str, is_directory: bool) -> bool:
    """True if an event about `path` (under `root`) can change what the manifests declare."""
    relative = os.path.relpath(path, root)
    if relative == ".":
        return True  # the directory itself (deleted, moved away)
    if relative.startswith(".."):
        return False
    parts = relative.split(os.sep)
    if any(part.startswith(".") for part in parts):
        return False
    if is_directory:
        return True
    # The loader's own rule (manifests.loader.discover): editor and backup files.
    name = parts[-1]
    if name.startswith("#") or name.endswith(_IGNORED_ENDINGS):
        return False
    return name.endswith(SUFFIXES)


class _Inotify:
    """The three libc calls, with errors as OSError."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm.restype = ctypes.c_int

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), what)
        return result

    def init(self) -> int:
        return self._check(int(self._init1(_IN_NONBLOCK | _IN_CLOEXEC)), "inotify_init1")

    def add(self, fd: int, path: str, mask: int) -> int:
        return self._check(int(self._add(fd, os.fsencode(path), mask)), path)

    def remove(self, fd: int, wd: int) -> None:
        self._rm(fd, wd)  # EINVAL: the kernel already dropped it (IN_IGNORED pending)


class ManifestWatcher:
    """Watches `root` recursively (and its parent for the directory's own fate).

    Not a thread: poll `fileno()` and call `read()` when it is readable. `read()` and
    `ensure_watching()` may be called from different threads.
    """

    def __init__(self, *, root: Path) -> None:
        self.root = str(Path(root).absolute())
        self._parent = os.path.dirname(self.root)
        self._name = os.path.basename(self.root)
        self._inotify = _Inotify()
        self._fd = -1
        self._lock = threading.Lock()
        self._dirs: dict[int, str] = {}  # wd -> watched directory of the tree
        self._parent_wd: int | None = None
        self._tree_inode: tuple[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the inotify instance and make the watches that can be made now."""
        try:
            self._fd = self._inotify.init()
            with self._lock:
                self._watch_parent()
                self._schedule_tree()
        except OSError as exc:
            self.stop()
            raise ReconcilerError(
                f"cannot watch {self.root}: {exc.strerror or exc}; if the inotify limits "
                "are reached, raise fs.inotify.max_user_watches / max_user_instances"
            ) from exc

    def fileno(self) -> int:
        """The inotify descriptor: readable when `read()` has something."""
        return self._fd

    def stop(self) -> None:
        """Close the inotify instance (every watch goes with it)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self._dirs.clear()
            self._parent_wd = self._tree_inode = None

    # ------------------------------------------------------------------ watches

    def ensure_watching(self) -> bool:
        """(Re)create the watches if the directory exists under a new inode.

        Returns True when the directory is being watched. Cheap (a stat): the controller
        calls it after each batch and at each resync.
        """
        with self._lock:
            try:
                if self._parent_wd is None:
                    self._watch_parent()
                return self._schedule_tree()
            except OSError as exc:
                # Removed again between stat and inotify_add_watch, or out of watches: the
                # next call (the next batch or resync) retries.
                log.warning("watch.failed", path=self.root, error=str(exc))
                return False

    def _watch_parent(self) -> None:
        if self._fd >= 0 and os.path.isdir(self._parent):
            self._parent_wd = self._inotify.add(self._fd, self._parent, _PARENT_MASK)

    def _schedule_tree(self) -> bool:
        try:
            st = os.stat(self.root)
            identity = (st.st_dev, st.st_ino) if os.path.isdir(self.root) else None
        except OSError:
            identity = None
        if identity is not None and identity == self._tree_inode:
            return True
        self._drop_tree()
        if identity is None or self._fd < 0:
            return False
        self._watch_subtree(self.root)
        self._tree_inode = identity
        log.info("watch.started", path=self.root, directories=len(self._dirs))
        return True

    def _watch_subtree(self, top: str) -> None:
        """A watch on `top` and every non-hidden directory below it (symlinks not followed,
        as the loader's walk does); a directory that vanished meanwhile is skipped."""
        # The root may itself be a symlink (followed, as the loader follows it); below it
        # nothing is followed.
        first = IN_DONT_FOLLOW if top != self.root else 0
        try:
            self._dirs[self._inotify.add(self._fd, top, _TREE_MASK | first)] = top
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return
            raise
        for directory, subdirs, _files in os.walk(top, followlinks=False):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for name in subdirs:
                path = os.path.join(directory, name)
                try:
                    wd = self._inotify.add(self._fd, path, _TREE_MASK | IN_DONT_FOLLOW)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        continue
                    raise
                self._dirs[wd] = path

    def _unwatch_subtree(self, top: str) -> None:
        prefix = top + os.sep
        for wd, path in list(self._dirs.items()):
            if path == top or path.startswith(prefix):
                del self._dirs[wd]
                self._inotify.remove(self._fd, wd)

    def _drop_tree(self) -> None:
        if self._tree_inode is None and not self._dirs:
            return
        for wd in list(self._dirs):
            self._inotify.remove(self._fd, wd)
        self._dirs.clear()
        self._tree_inode = None
        log.warning("watch.lost", path=self.root)

    # ------------------------------------------------------------------ events

    def read(self) -> list[Change]:
        """Every relevant change queued so far (never blocks; empty when none)."""
        changes: list[Change] = []
        with self._lock:
            while self._fd >= 0:
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._parse(data, changes)
        return changes

    def _parse(self, data: bytes, changes: list[Change]) -> None:
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            name = os.fsdecode(raw.rstrip(b"\0"))
            self._event(wd, mask, name, changes)

    def _event(self, wd: int, mask: int, name: str, changes: list[Change]) -> None:
        if mask & IN_Q_OVERFLOW:
            # Events were lost: anything may have changed, and directories may have come
            # or gone without us adding or dropping their watches.
            log.warning("watch.overflow", path=self.root)
            self._tree_inode = None
            with contextlib.suppress(OSError):
                self._schedule_tree()
            changes.append(Change(self.root, settled=False))
            return
        if wd == self._parent_wd:
            if mask & IN_IGNORED:
                self._parent_wd = None  # the parent itself went away
            elif name == self._name:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    with contextlib.suppress(OSError):
                        self._schedule_tree()
                changes.append(Change(self.root, settled=False))
            return
        directory = self._dirs.get(wd)
        if directory is None:
            return  # a watch dropped while its events were queued
        if mask & IN_IGNORED:
            del self._dirs[wd]  # its directory is gone
            return
        if not name:  # the watched directory itself
            if mask & _GONE:
                if directory == self.root:
                    self._drop_tree()
                changes.append(Change(directory, settled=False))
            return
        path = os.path.join(directory, name)
        is_directory = bool(mask & IN_ISDIR)
        if not is_relevant(path, root=self.root, is_directory=is_directory):
            return
        if is_directory:
            if mask & (IN_CREATE | IN_MOVED_TO):
                with contextlib.suppress(OSError):
                    self._watch_subtree(path)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self._unwatch_subtree(path)
            # A new directory may still be filling up; files that were already complete
            # when their watch came are read by the reconcile this batch triggers.
            changes.append(Change(path, settled=bool(mask & IN_MOVED_TO)))
            return
        changes.append(Change(path, settled=bool(mask & _SETTLED)))

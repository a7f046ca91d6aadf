"""The directory watcher: inotify (via watchdog) on the manifests directory.

It answers one question - "did something a manifest could live in change?" - and hands
the path to a callback (the controller feeds a `Debouncer`). It never reads a file and
never says *what* changed: the reconcile re-reads the whole directory anyway.

What counts (contract section 2): `*.yaml`, `*.yml` and `*.json` files, recursively, and
directories (a moved-in directory may hold manifests), but nothing hidden (any path
component starting with `.`: `.git`, an editor's `.x.yaml.swx`), and no file the loader
skips either (`#x#`, `*~`, `*.swp`, `*.swx`, `*.tmp`). Event kinds: created, modified,
attributes changed, closed after writing, deleted, moved. Editor save patterns therefore
show up as events about the real name: write-to-temp + rename arrives as a move whose
*destination* is relevant; truncate + write as several modifies; both end in one batch
after the debouncer's quiet period.

Opening and reading files is deliberately *not* watched: the reconcile reads every
manifest, and a watcher that reacted to that would trigger itself forever. The filter
is applied in the inotify mask, so those events never even reach this process.

The directory itself can disappear (`rm -r`, a `mv` of the whole tree, a checkout that
replaces it). Its inotify watch dies with it and would not come back when the directory
is created again, so the parent directory is watched too (not recursively; only events
about the manifests directory's own name count), and `ensure_watching()` re-creates the
recursive watch whenever the directory exists under a new inode. A missing directory is
reported by the reconcile ("does not exist"), never taken to mean "nothing declared".
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from reconciler.errors import ReconcilerError
from reconciler.manifests.loader import SUFFIXES

log = structlog.get_logger("reconciler.controller")

# Everything that can change what the directory declares; not opened / closed-unwritten.
_TREE_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
_PARENT_EVENTS: list[type[FileSystemEvent]] = [
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,  # the name reappearing as a file is worth a reconcile's error too
    FileDeletedEvent,
    FileMovedEvent,
]
_RELEVANT_TYPES = frozenset({"created", "modified", "attrib", "closed", "deleted", "moved"})
_IGNORED_ENDINGS = ("~", ".swp", ".swx", ".tmp")

OnChange = Callable[[str], None]


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


def _text(path: bytes | str) -> str:
    return os.fsdecode(path)


class _TreeHandler(FileSystemEventHandler):
    """Events under the manifests directory: pass relevant paths on."""

    def __init__(self, *, root: str, on_change: OnChange) -> None:
        self._root = root
        self._on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT_TYPES:
            return
        # A directory's "modified" only says something inside changed; the child's own
        # event says whether that something matters (a hidden temp file does not).
        if event.is_directory and event.event_type == "modified":
            return
        paths = [_text(event.src_path)]
        if event.event_type == "moved" and event.dest_path:
            paths.append(_text(event.dest_path))
        for path in paths:
            if is_relevant(path, root=self._root, is_directory=event.is_directory):
                self._on_change(path)
                return


class _ParentHandler(FileSystemEventHandler):
    """Events in the parent directory: only those naming the manifests directory count."""

    def __init__(self, *, root: str, on_change: OnChange) -> None:
        self._root = root
        self._on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {_text(event.src_path)}
        if event.dest_path:
            paths.add(_text(event.dest_path))
        if self._root in paths:
            self._on_change(self._root)


class ManifestWatcher:
    """Watches `root` recursively (and its parent for the directory's own fate).

    `on_change(path)` is called on the watchdog thread for every relevant event; it must
    be quick and must not block (the controller records the path and wakes its ticker).
    """

    def __init__(self, *, root: Path, on_change: OnChange) -> None:
        self.root = str(Path(root).absolute())
        self._on_change = on_change
        self._observer = Observer()
        self._observer.daemon = True  # never keep a stopping process alive
        self._lock = threading.Lock()
        self._tree: ObservedWatch | None = None
        self._tree_inode: tuple[int, int] | None = None
        self._parent: ObservedWatch | None = None

    def start(self) -> None:
        """Start the observer thread and the watches that can be made now."""
        self._observer.start()
        parent = os.path.dirname(self.root)
        try:
            if os.path.isdir(parent):
                self._parent = self._observer.schedule(
                    _ParentHandler(root=self.root, on_change=self._on_change),
                    parent,
                    recursive=False,
                    event_filter=_PARENT_EVENTS,
                )
            self._schedule_tree()
        except OSError as exc:
            raise ReconcilerError(
                f"cannot watch {self.root}: {exc.strerror or exc}; if the inotify limits "
                "are reached, raise fs.inotify.max_user_watches / max_user_instances"
            ) from exc

    def ensure_watching(self) -> bool:
        """(Re)create the recursive watch if the directory exists under a new inode.

        Returns True when the directory is being watched. Call it after the parent
        reported the directory's name, and now and then (the resync tick): cheap, one stat.
        """
        try:
            return self._schedule_tree()
        except OSError as exc:
            # Removed again between stat and inotify_add_watch, or out of watches: the
            # next call (the next batch or resync) retries.
            log.warning("watch.failed", path=self.root, error=str(exc))
            return False

    def _schedule_tree(self) -> bool:
        with self._lock:
            try:
                st = os.stat(self.root)
                identity = (st.st_dev, st.st_ino) if os.path.isdir(self.root) else None
            except OSError:
                identity = None
            if identity is not None and identity == self._tree_inode:
                return True
            self._drop_tree()
            if identity is None:
                return False
            self._tree = self._observer.schedule(
                _TreeHandler(root=self.root, on_change=self._on_change),
                self.root,
                recursive=True,
                event_filter=_TREE_EVENTS,
            )
            self._tree_inode = identity
            log.info("watch.started", path=self.root)
            return True

    def _drop_tree(self) -> None:
        if self._tree is None:
            return
        # KeyError/OSError: its emitter already stopped itself when the directory went away.
        with contextlib.suppress(KeyError, OSError):
            self._observer.unschedule(self._tree)
        self._tree, self._tree_inode = None, None
        log.warning("watch.lost", path=self.root)

    def stop(self, *, timeout: float = 2.0) -> None:
        """Stop watching; waits at most `timeout` seconds for the observer thread."""
        if not self._observer.is_alive():
            return
        self._observer.stop()
        self._observer.join(timeout)

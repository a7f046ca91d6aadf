"""Triggers: everything that turns the outside world into a key on the queue, in one thread.

The sources, multiplexed by one epoll (`selectors`), so that an idle controller sleeps in
a single system call until something happens or its next timer is due - it never wakes
up just to look:

- the manifests directory (`watcher`, inotify): paths in the `Debouncer`; its batch,
  once the burst is over, becomes a key;
- process exits (`exits`, pidfds in an epoll): a key at once;
- the resync timer (every `resync` seconds, +-`jitter`, so that many controllers never
  beat in step): `on_resync()`, then a key;
- the git poll timer (git mode): `on_fetch()`, then a key;
- `wake()` from another thread (an eventfd): the timers and the stop flag are looked at
  again.

The loop's only timeout is the earliest of: the debouncer's deadline, the next resync,
the next git poll. Everything it does is quick (no I/O beyond reading the descriptors
and a stat): the reconcile itself runs on the controller's worker.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from reconciler.controller.debounce import Debouncer
from reconciler.controller.exits import ExitWatcher
from reconciler.controller.watcher import ManifestWatcher

log = structlog.get_logger("reconciler.controller")

Clock = Callable[[], float]


class Waker:
    """An eventfd another thread writes to, to end the trigger loop's wait."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        """The eventfd: readable after `wake()`."""
        return self._fd

    def wake(self) -> None:
        """Make the descriptor readable (cheap; safe from any thread and signal handler)."""
        with contextlib.suppress(OSError):  # closed at stop, or the counter is saturated
            os.eventfd_write(self._fd, 1)

    def drain(self) -> None:
        """Consume the wake-ups so far."""
        with contextlib.suppress(OSError):  # BlockingIOError: there were none
            os.eventfd_read(self._fd)

    def close(self) -> None:
        """Release the descriptor."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


@dataclass(frozen=True)
class Timers:
    """The periodic triggers (seconds)."""

    resync: float
    jitter: float = 0.1
    git_interval: float | None = None  # None: not in git mode


class Triggers:
    """The trigger thread (see the module docstring)."""

    def __init__(
        self,
        *,
        timers: Timers,
        debouncer: Debouncer,
        exits: ExitWatcher,
        watcher: ManifestWatcher | None,
        enqueue: Callable[[], None],
        on_resync: Callable[[], None],
        on_fetch: Callable[[], None],
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._timers = timers
        self._debouncer = debouncer
        self._exits = exits
        self._watcher = watcher
        self._enqueue = enqueue
        self._on_resync = on_resync
        self._on_fetch = on_fetch
        self._clock = clock
        self._rng = rng or random.Random()
        self._waker = Waker()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler-triggers", daemon=True)

    def start(self) -> None:
        """Start the thread (the watcher, if any, must be started already)."""
        self._thread.start()

    def stop(self, *, timeout: float = 2.0) -> None:
        """End the thread; waits at most `timeout` seconds for it."""
        self._stopping.set()
        self._waker.wake()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._waker.close()

    @property
    def running(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def wake(self) -> None:
        """Look at the timers and the stop flag again now."""
        self._waker.wake()

    def files_pending(self) -> bool:
        """True while file events are collected and their batch is not handed out yet."""
        return self._debouncer.pending()

    # ------------------------------------------------------------------ the loop

    def _next_resync(self) -> float:
        spread = self._timers.jitter
        return self._clock() + self._timers.resync * self._rng.uniform(1 - spread, 1 + spread)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._waker.fileno(), selectors.EVENT_READ, self._waker.drain)
            selector.register(self._exits.fileno(), selectors.EVENT_READ, self._exits.handle_ready)
            if self._watcher is not None:
                selector.register(self._watcher.fileno(), selectors.EVENT_READ, self._read_files)
            self._loop(selector)

    def _loop(self, selector: selectors.BaseSelector) -> None:
        next_resync = self._next_resync()
        interval = self._timers.git_interval
        next_fetch = None if interval is None else self._clock() + interval
        while not self._stopping.is_set():
            now = self._clock()
            if next_fetch is not None and interval is not None and now >= next_fetch:
                log.debug("git.poll_due")
                self._on_fetch()
                self._enqueue()
                next_fetch = now + interval
            batch = self._debouncer.ready()
            if batch:
                if self._watcher is not None:
                    self._watcher.ensure_watching()
                log.info("files.changed", count=len(batch), paths=sorted(batch)[:10])
                self._enqueue()
            if now >= next_resync:
                if self._watcher is not None:
                    self._watcher.ensure_watching()
                log.debug("resync.due")
                self._on_resync()
                self._enqueue()
                next_resync = self._next_resync()
            wake = next_resync if next_fetch is None else min(next_resync, next_fetch)
            pending = self._debouncer.deadline()
            if pending is not None:
                wake = min(wake, pending)
            for key, _ in selector.select(timeout=max(wake - self._clock(), 0.0)):
                callback: Callable[[], object] = key.data
                callback()

    def _read_files(self) -> None:
        assert self._watcher is not None
        for change in self._watcher.read():
            self._debouncer.add(change.path, settled=change.settled)

"""Debouncing: turn a burst of file events into one batch, after the burst is over.

Saving a file is rarely one event. Editors write a temp file and rename it over the
original (create, modify..., close, move), or truncate and write in several chunks
(modify, modify, close); `git checkout` touches dozens of files at once. Reconciling on
the first event would read a half-written file - or a truncated, empty one, which
declares nothing and so would look like "this environment was deleted".

So events are only *collected*: the batch becomes ready once `delay` seconds passed since
the LAST event (a quiet period), and a burst of any length yields one batch. `max_wait`
caps the wait from the FIRST event, so a file that is written to continuously (a log
someone put in the wrong directory) still flushes now and then instead of never.

Pure: no threads or timers of its own. Time comes from an injectable clock, and the
owner asks `ready()` when `deadline()` has come. A lock makes `add` safe to call from
the watcher's thread while another thread polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]


class Debouncer:
    """Collects paths; `ready()` returns them once the burst is over (see module docstring)."""

    def __init__(
        self, *, delay: float = 0.2, max_wait: float = 2.0, clock: Clock = time.monotonic
    ) -> None:
        if delay < 0 or max_wait < delay:
            raise ValueError(f"need 0 <= delay <= max_wait, got {delay=} {max_wait=}")
        self.delay = delay
        self.max_wait = max_wait
        self._clock = clock
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._first: float | None = None  # time of the first event of the pending batch
        self._last: float | None = None  # time of the latest event

    def add(self, path: str) -> None:
        """Record an event about `path` now."""
        now = self._clock()
        with self._lock:
            self._paths.add(path)
            if self._first is None:
                self._first = now
            self._last = now

    def deadline(self) -> float | None:
        """When the pending batch becomes ready (clock time), or None if nothing is pending."""
        with self._lock:
            return self._deadline_locked()

    def _deadline_locked(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.delay, self._first + self.max_wait)

    def pending(self) -> bool:
        """True while events are collected but not yet handed out."""
        with self._lock:
            return self._first is not None

    def ready(self) -> frozenset[str]:
        """The batch if its quiet period (or max wait) is over, else an empty set.

        A returned batch is cleared: the next event starts a new one.
        """
        now = self._clock()
        with self._lock:
            deadline = self._deadline_locked()
            if deadline is None or now < deadline:
                return frozenset()
            batch = frozenset(self._paths)
            self._paths.clear()
            self._first = self._last = None
            return batch

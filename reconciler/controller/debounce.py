"""Debouncing: turn a burst of file events into one batch, after the burst is over.

Saving a file is rarely one event. Editors write a temp file and rename it over the
original (create, modify..., close, move), or truncate and write in several chunks
(modify, modify, close); `git checkout` touches dozens of files at once. Reconciling on
the first event would read a half-written file - or a truncated, empty one, which
declares nothing and so would look like "this environment was deleted".

So events are only *collected*, and the batch becomes ready after a quiet period since
the LAST event. How long that period is depends on what the events said:

- **settled** events leave their file whole: a rename into place (the atomic save), a
  close after writing, an attribute change. When every path of the batch is settled,
  only `settle` seconds (a few tens of milliseconds) must pass: long enough to collect
  the rest of a burst (`git checkout`, `cp -r`), short enough that an atomic save is
  reconciled almost at once.
- **unsettled** events may be the first half of something: a create or a modify (the
  writer has not closed the file yet), a delete or a rename away (editors that keep a
  backup move the original aside, then write the new file). While any path's latest
  event was unsettled, the longer `delay` applies, as it always did.

A path's latest event decides: `modify ... close` ends settled, `rename away ... create
... close` too. `max_wait` caps the wait from the FIRST event, so a file that is written
to continuously (a log someone put in the wrong directory) still flushes now and then
instead of never.

Pure: no threads or timers of its own. Time comes from an injectable clock, and the
owner asks `ready()` when `deadline()` has come. A lock makes `add` safe to call from
one thread while another polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]


class Debouncer:
    """Collects paths; `ready()` returns them once the burst is over (see module docstring)."""

    def __init__(
        self,
        *,
        settle: float | None = None,
        delay: float = 0.2,
        max_wait: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        """`settle` defaults to `delay` (every event waits the full quiet period)."""
        settle = delay if settle is None else settle
        if not 0 <= settle <= delay <= max_wait:
            raise ValueError(
                f"need 0 <= settle <= delay <= max_wait, got {settle=} {delay=} {max_wait=}"
            )
        self.settle = settle
        self.delay = delay
        self.max_wait = max_wait
        self._clock = clock
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._unsettled: set[str] = set()  # paths whose latest event may be a half
        self._first: float | None = None  # time of the first event of the pending batch
        self._last: float | None = None  # time of the latest event

    def add(self, path: str, *, settled: bool = False) -> None:
        """Record an event about `path` now; `settled`: it left the file whole."""
        now = self._clock()
        with self._lock:
            self._paths.add(path)
            if settled:
                self._unsettled.discard(path)
            else:
                self._unsettled.add(path)
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
        quiet = self.delay if self._unsettled else self.settle
        return min(self._last + quiet, self._first + self.max_wait)

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
            self._unsettled.clear()
            self._first = self._last = None
            return batch

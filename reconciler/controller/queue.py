"""The work queue: keys waiting to be reconciled, each at most once, one at a time.

Semantics (those of client-go's workqueue, which controller-runtime builds on):

- **Dedup.** A key is either absent, *waiting* (in the queue) or *in flight* (handed out
  by `get`, not yet `done`). Adding a waiting key does nothing: one reconcile re-reads
  everything, so two queued copies would do the same work twice.
- **One in flight per key.** Adding a key that is in flight marks it *dirty*: it is not
  handed out again (so two workers never reconcile the same key at once), but `done`
  puts it back in the queue, because whatever triggered the add may have happened after
  the running reconcile read its inputs.
- **Delayed requeue.** `add_after(key, delay)` adds the key once `delay` has passed. A key
  with several pending delays keeps the earliest; a plain `add` makes it due now.
- **Backoff.** `failure(key)` requeues the key after `base * 2**n` seconds (n = failures
  so far, capped at `max_delay`); `success(key)` forgets the count. A key that keeps
  failing is retried ever more slowly instead of spinning, and other keys are unaffected.

Time comes from an injectable clock (monotonic seconds), so tests drive a fake one and
call `get(timeout=0)`; nothing in the queue ever sleeps for a fixed time. A waiter wakes
when a key is added, a delay expires, the queue shuts down, or its timeout passes; a
worker that waits with `timeout=None` costs nothing while idle (no periodic wake-up:
`shutdown` is what ends its wait).

Usage, per worker:

    key = queue.get(timeout=None)
    if key is None: ...            # shut down (or, with a timeout, timed out)
    try:
        ok = reconcile(key)
    finally:
        queue.success(key) if ok else queue.failure(key)
        queue.done(key)
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """Per-key retry delays: `base * 2**failures`, never more than `max_delay` seconds."""

    base: float = 1.0
    max_delay: float = 60.0

    def delay(self, failures: int) -> float:
        """The delay before retry number `failures + 1` (`failures` >= 0)."""
        # Cap the exponent too: 2**failures grows without bound for a key failing for days.
        return min(self.base * float(2 ** min(failures, 62)), self.max_delay)


class WorkQueue:
    """A thread-safe, deduplicating work queue of string keys (see the module docstring)."""

    def __init__(self, *, clock: Clock = time.monotonic, backoff: Backoff | None = None) -> None:
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[str] = deque()  # waiting keys, FIFO
        self._dirty: set[str] = set()  # keys that must be (re)processed: waiting or re-run
        self._in_flight: set[str] = set()
        self._due: dict[str, float] = {}  # delayed keys -> earliest due time
        self._delayed: list[tuple[float, int, str]] = []  # heap; stale entries skipped
        self._sequence = 0  # tie-breaker: equal due times keep insertion order
        self._failures: dict[str, int] = {}
        self._shutting_down = False

    # -- adding ----------------------------------------------------------------------

    def add(self, key: str) -> None:
        """Make `key` due now (a no-op if it is already waiting)."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: str, delay: float) -> None:
        """Add `key` once `delay` seconds have passed (now if `delay` <= 0)."""
        with self._cond:
            if self._shutting_down:
                return
            if delay <= 0:
                self._add_locked(key)
                return
            if key in self._dirty:
                return  # waiting, or re-run as soon as it is done: sooner than asked
            due = self._clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._sequence += 1
            heapq.heappush(self._delayed, (due, self._sequence, key))
            # A waiter may be sleeping until a later deadline: let it recompute.
            self._cond.notify_all()

    def _add_locked(self, key: str) -> None:
        if self._shutting_down:
            return
        # Due now supersedes any pending delay (its heap entry is skipped as stale).
        self._due.pop(key, None)
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._in_flight:
            return  # `done` puts it back
        self._ready.append(key)
        self._cond.notify()

    # -- taking ----------------------------------------------------------------------

    def get(self, *, timeout: float | None) -> str | None:
        """The next due key, waiting at most `timeout` seconds (None: until there is one);
        None on timeout or shutdown.

        The key is in flight until `done(key)`.
        """
        with self._cond:
            deadline = None if timeout is None else self._clock() + max(timeout, 0.0)
            while True:
                if self._shutting_down:
                    return None
                now = self._clock()
                self._promote_due(now)
                if self._ready:
                    key = self._ready.popleft()
                    self._dirty.discard(key)
                    self._in_flight.add(key)
                    return key
                if deadline is not None and now >= deadline:
                    return None
                wake = deadline
                if self._delayed:
                    due = self._delayed[0][0]
                    wake = due if wake is None else min(wake, due)
                self._cond.wait(None if wake is None else max(wake - now, 0.0))

    def _promote_due(self, now: float) -> None:
        """Move delayed keys whose time has come into the ready queue."""
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != due:
                continue  # superseded by an earlier delay or a plain add
            del self._due[key]
            self._add_locked(key)

    def done(self, key: str) -> None:
        """Finish processing `key`; if it was added meanwhile, it is queued again."""
        with self._cond:
            self._in_flight.discard(key)
            if key in self._dirty and not self._shutting_down:
                self._ready.append(key)
                self._cond.notify()

    # -- backoff ---------------------------------------------------------------------

    def failure(self, key: str) -> float:
        """Record a failed reconcile of `key` and requeue it with backoff; returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = self._backoff.delay(failures)
        self.add_after(key, delay)
        return delay

    def success(self, key: str) -> None:
        """Record a successful reconcile of `key`: its next failure starts at `base` again."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        """Consecutive failures of `key` so far."""
        with self._cond:
            return self._failures.get(key, 0)

    # -- lifecycle and introspection -------------------------------------------------

    def shutdown(self) -> None:
        """Stop handing out keys: every `get` returns None from now on; adds are ignored."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    @property
    def shutting_down(self) -> bool:
        """True once `shutdown` was called."""
        with self._cond:
            return self._shutting_down

    def depth(self) -> int:
        """Keys waiting now or later (not counting those in flight and not re-added)."""
        with self._cond:
            waiting = {key for key in self._dirty if key not in self._in_flight}
            return len(waiting | set(self._due))

    def next_due(self) -> float | None:
        """When the earliest delayed key becomes due (clock time), or None."""
        with self._cond:
            return min(self._due.values(), default=None)

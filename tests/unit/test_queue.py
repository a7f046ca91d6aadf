"""The work queue: dedup, one in flight per key, delayed requeue, backoff.

A fake clock drives time; `get(timeout=0)` never blocks, so nothing here sleeps. The one
concurrency test uses real threads and the real clock, with deadlines, not sleeps.
"""

from __future__ import annotations

import threading
import time

import pytest

from reconciler.controller.queue import Backoff, WorkQueue
from tests.unit.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def queue(clock: FakeClock) -> WorkQueue:
    return WorkQueue(clock=clock, backoff=Backoff(base=1.0, max_delay=60.0))


def drain(queue: WorkQueue) -> list[str]:
    """Every key due now, each marked done (as a worker would)."""
    keys = []
    while (key := queue.get(timeout=0)) is not None:
        keys.append(key)
        queue.done(key)
    return keys


# --------------------------------------------------------------------------- dedup


def test_a_waiting_key_is_not_duplicated(queue: WorkQueue) -> None:
    queue.add("Environment/a")
    queue.add("Environment/b")
    queue.add("Environment/a")
    assert queue.depth() == 2
    assert drain(queue) == ["Environment/a", "Environment/b"]


def test_empty_queue_get_times_out_without_blocking(queue: WorkQueue) -> None:
    assert queue.get(timeout=0) is None


def test_key_added_while_in_flight_is_handed_out_again_once_after_done(
    queue: WorkQueue,
) -> None:
    queue.add("all")
    assert queue.get(timeout=0) == "all"
    queue.add("all")
    queue.add("all")  # many triggers during the reconcile: one re-run
    assert queue.get(timeout=0) is None, "a key in flight must not be handed out twice"
    queue.done("all")
    assert queue.get(timeout=0) == "all"
    queue.done("all")
    assert queue.get(timeout=0) is None


def test_key_not_added_while_in_flight_is_not_rerun(queue: WorkQueue) -> None:
    queue.add("all")
    assert queue.get(timeout=0) == "all"
    queue.done("all")
    assert queue.get(timeout=0) is None
    assert queue.depth() == 0


def test_other_keys_run_while_one_is_in_flight(queue: WorkQueue) -> None:
    queue.add("Environment/a")
    queue.add("Environment/b")
    assert queue.get(timeout=0) == "Environment/a"
    queue.add("Environment/a")
    assert queue.get(timeout=0) == "Environment/b"


# --------------------------------------------------------------------------- delays


def test_delayed_key_becomes_due_after_its_delay(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add_after("all", 5.0)
    assert queue.get(timeout=0) is None
    clock.advance(4.999)
    assert queue.get(timeout=0) is None
    clock.advance(0.001)
    assert queue.get(timeout=0) == "all"


def test_delayed_keys_come_out_in_due_order(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add_after("c", 3.0)
    queue.add_after("a", 1.0)
    queue.add_after("b", 2.0)
    queue.add("now")
    clock.advance(10)
    assert drain(queue) == ["now", "a", "b", "c"]


def test_equal_due_times_keep_insertion_order(queue: WorkQueue, clock: FakeClock) -> None:
    for key in ("x", "y", "z"):
        queue.add_after(key, 1.0)
    clock.advance(1.0)
    assert drain(queue) == ["x", "y", "z"]


def test_a_key_delayed_twice_keeps_the_earliest_time(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add_after("all", 10.0)
    queue.add_after("all", 2.0)
    queue.add_after("all", 30.0)
    clock.advance(2.0)
    assert drain(queue) == ["all"]
    clock.advance(30.0)
    assert drain(queue) == [], "the superseded delays must not run it again"


def test_plain_add_supersedes_a_pending_delay(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add_after("all", 10.0)
    queue.add("all")
    assert drain(queue) == ["all"]
    clock.advance(10.0)
    assert drain(queue) == []


def test_zero_delay_is_a_plain_add(queue: WorkQueue) -> None:
    queue.add_after("all", 0)
    assert queue.get(timeout=0) == "all"


def test_delay_expiring_while_in_flight_reruns_after_done(
    queue: WorkQueue, clock: FakeClock
) -> None:
    queue.add("all")
    assert queue.get(timeout=0) == "all"
    queue.add_after("all", 1.0)
    clock.advance(1.0)
    assert queue.get(timeout=0) is None
    queue.done("all")
    assert queue.get(timeout=0) == "all"


def test_next_due_and_depth(queue: WorkQueue, clock: FakeClock) -> None:
    assert queue.next_due() is None
    queue.add_after("a", 3.0)
    queue.add("b")
    assert queue.next_due() == clock.now + 3.0
    assert queue.depth() == 2


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_per_failure_up_to_the_cap(queue: WorkQueue, clock: FakeClock) -> None:
    delays = []
    queue.add("all")
    for _ in range(9):
        key = queue.get(timeout=0)
        assert key == "all"
        delays.append(queue.failure(key))
        queue.done(key)
        assert queue.get(timeout=0) is None, "a failed key must wait for its backoff"
        clock.advance(delays[-1] - 0.001)
        assert queue.get(timeout=0) is None
        clock.advance(0.001)
        # Not drained here: the next loop iteration gets it.
        assert queue.depth() == 1
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert queue.failures("all") == 9


def test_success_resets_backoff(queue: WorkQueue, clock: FakeClock) -> None:
    queue.add("all")
    for expected in (1, 2, 4):
        key = queue.get(timeout=0)
        assert key is not None
        assert queue.failure(key) == expected
        queue.done(key)
        clock.advance(expected)
    key = queue.get(timeout=0)
    assert key == "all"
    queue.success(key)
    queue.done(key)
    assert queue.failures("all") == 0
    queue.add("all")
    key = queue.get(timeout=0)
    assert key == "all"
    assert queue.failure(key) == 1


def test_backoff_is_per_key(queue: WorkQueue, clock: FakeClock) -> None:
    for key in ("a", "a", "a"):
        queue.failure(key)
    assert queue.failure("b") == 1
    assert queue.failures("a") == 3


def test_backoff_delay_is_capped_for_huge_failure_counts() -> None:
    backoff = Backoff(base=1.0, max_delay=60.0)
    assert backoff.delay(0) == 1.0
    assert backoff.delay(10_000) == 60.0


def test_an_add_during_backoff_runs_at_once(queue: WorkQueue, clock: FakeClock) -> None:
    """A file event must not wait out the backoff of a failing reconcile: it may be the fix."""
    queue.add("all")
    key = queue.get(timeout=0)
    assert key is not None
    queue.failure(key)
    queue.failure(key)  # pretend it failed twice: the pending retry is 2s away
    queue.done(key)
    queue.add("all")
    assert queue.get(timeout=0) == "all"


# --------------------------------------------------------------------------- shutdown


def test_shutdown_stops_handing_out_keys(queue: WorkQueue) -> None:
    queue.add("all")
    queue.shutdown()
    assert queue.shutting_down
    assert queue.get(timeout=0) is None
    queue.add("more")
    assert queue.get(timeout=0) is None


def test_shutdown_wakes_a_blocked_get() -> None:
    queue = WorkQueue()
    got: list[str | None] = ["unset"]
    started = threading.Event()

    def worker() -> None:
        started.set()
        got[0] = queue.get(timeout=30)

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(5)
    queue.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive(), "shutdown must wake a waiting get"
    assert got == [None]


def test_add_wakes_a_blocked_get() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    thread = threading.Thread(target=lambda: got.append(queue.get(timeout=30)))
    thread.start()
    queue.add("all")
    thread.join(timeout=5)
    assert got == ["all"]


def _blocked_get(queue: WorkQueue) -> tuple[threading.Thread, list[str | None]]:
    """A thread waiting in `get(timeout=None)`: no deadline, as the controller's worker."""
    got: list[str | None] = []
    thread = threading.Thread(target=lambda: got.append(queue.get(timeout=None)), daemon=True)
    thread.start()
    return thread, got


def test_a_get_without_timeout_waits_for_a_key() -> None:
    queue = WorkQueue()
    thread, got = _blocked_get(queue)
    queue.add("all")
    thread.join(timeout=5)
    assert got == ["all"]


def test_a_get_without_timeout_ends_at_shutdown() -> None:
    queue = WorkQueue()
    thread, got = _blocked_get(queue)
    queue.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive() and got == [None]


def test_a_get_without_timeout_wakes_for_a_delayed_key() -> None:
    queue = WorkQueue()  # the real clock: the delay must expire by itself
    thread, got = _blocked_get(queue)
    queue.add_after("all", 0.05)
    thread.join(timeout=5)
    assert got == ["all"]


def test_a_get_without_timeout_returns_a_key_due_now_at_once(queue: WorkQueue) -> None:
    queue.add("all")
    assert queue.get(timeout=None) == "all"


# --------------------------------------------------------------------------- threads


def test_two_threads_never_hold_the_same_key_at_once() -> None:
    """Workers hammer a few keys while producers re-add them; no key is ever doubly held."""
    queue = WorkQueue()
    keys = [f"Environment/e{i}" for i in range(3)]
    holding: set[str] = set()
    guard = threading.Lock()
    violations: list[str] = []
    processed = [0]
    stop = threading.Event()

    def worker() -> None:
        while True:
            key = queue.get(timeout=5)
            if key is None:
                return
            with guard:
                if key in holding:
                    violations.append(key)
                holding.add(key)
            # Give the other worker a chance to (wrongly) take the same key.
            for _ in range(50):
                queue.add(key)
            with guard:
                holding.discard(key)
                processed[0] += 1
            queue.done(key)

    def producer() -> None:
        while not stop.is_set():
            for key in keys:
                queue.add(key)

    workers = [threading.Thread(target=worker) for _ in range(4)]
    producers = [threading.Thread(target=producer) for _ in range(2)]
    for thread in workers + producers:
        thread.start()
    deadline = time.monotonic() + 10
    while processed[0] < 2000 and time.monotonic() < deadline:
        with guard:
            if violations:
                break
        time.sleep(0.01)  # polling a counter with a deadline, not synchronising
    stop.set()
    for thread in producers:
        thread.join(timeout=5)
    queue.shutdown()
    for thread in workers:
        thread.join(timeout=5)
    assert not violations, f"keys held by two workers at once: {violations[:5]}"
    assert processed[0] >= 2000, f"only {processed[0]} keys processed in 10s"
    assert not any(t.is_alive() for t in workers + producers)

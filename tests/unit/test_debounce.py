"""The debouncer (quiet periods, burst collapse, max wait) and the watcher's event filter.

Time is a fake clock: nothing here sleeps. Durations are binary fractions (0.25, 0.125)
so that the clock arithmetic is exact.
"""

from __future__ import annotations

import os

import pytest

from reconciler.controller.debounce import Debouncer
from reconciler.controller.watcher import is_relevant
from tests.unit.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50.0)


@pytest.fixture
def debouncer(clock: FakeClock) -> Debouncer:
    return Debouncer(delay=0.25, max_wait=2.0, clock=clock)


def test_nothing_pending_is_never_ready(debouncer: Debouncer, clock: FakeClock) -> None:
    assert debouncer.deadline() is None
    assert not debouncer.pending()
    clock.advance(100)
    assert debouncer.ready() == frozenset()


def test_batch_is_ready_after_the_quiet_period(debouncer: Debouncer, clock: FakeClock) -> None:
    debouncer.add("/m/web.yaml")
    assert debouncer.pending()
    assert debouncer.deadline() == clock.now + 0.25
    clock.advance(0.125)
    assert debouncer.ready() == frozenset()
    clock.advance(0.0625)
    assert debouncer.ready() == frozenset()
    clock.advance(0.0625)
    assert debouncer.ready() == {"/m/web.yaml"}
    assert not debouncer.pending()
    assert debouncer.ready() == frozenset(), "a batch is handed out once"


def test_quiet_period_counts_from_the_last_event(debouncer: Debouncer, clock: FakeClock) -> None:
    """A burst (editor: create temp, write, close, rename) is one batch, after its end."""
    for path in ("/m/.web.yaml.tmp", "/m/web.yaml", "/m/web.yaml", "/m/db.yaml"):
        debouncer.add(path)
        clock.advance(0.1875)  # each event within the quiet period of the previous one
        assert debouncer.ready() == frozenset(), "must not flush in the middle of a burst"
    clock.advance(0.0625)
    assert debouncer.ready() == {"/m/.web.yaml.tmp", "/m/web.yaml", "/m/db.yaml"}


def test_events_after_a_flush_start_a_new_batch(debouncer: Debouncer, clock: FakeClock) -> None:
    debouncer.add("/m/a.yaml")
    clock.advance(0.25)
    assert debouncer.ready() == {"/m/a.yaml"}
    debouncer.add("/m/b.yaml")
    assert debouncer.ready() == frozenset()
    clock.advance(0.25)
    assert debouncer.ready() == {"/m/b.yaml"}


def test_a_continuous_stream_still_flushes_at_max_wait(
    debouncer: Debouncer, clock: FakeClock
) -> None:
    first = clock.now
    flushed_at = None
    for _ in range(100):
        debouncer.add("/m/busy.yaml")
        clock.advance(0.125)  # never quiet for 0.25s
        if debouncer.ready():
            flushed_at = clock.now
            break
    assert flushed_at is not None, "a constant stream must flush"
    assert flushed_at - first == 2.0


def test_deadline_is_the_earlier_of_quiet_period_and_max_wait(
    debouncer: Debouncer, clock: FakeClock
) -> None:
    start = clock.now
    debouncer.add("/m/a.yaml")
    clock.advance(1.875)
    debouncer.add("/m/a.yaml")
    assert debouncer.deadline() == start + 2.0


def test_zero_delay_flushes_immediately(clock: FakeClock) -> None:
    debouncer = Debouncer(delay=0.0, max_wait=0.0, clock=clock)
    debouncer.add("/m/a.yaml")
    assert debouncer.ready() == {"/m/a.yaml"}


def test_invalid_settings_are_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        Debouncer(delay=1.0, max_wait=0.5, clock=clock)
    with pytest.raises(ValueError):
        Debouncer(delay=-1.0, max_wait=1.0, clock=clock)
    with pytest.raises(ValueError):
        Debouncer(settle=0.5, delay=0.25, max_wait=1.0, clock=clock)
    with pytest.raises(ValueError):
        Debouncer(settle=-0.125, delay=0.25, max_wait=1.0, clock=clock)


# --------------------------------------------------------------------------- settled events
#
# The contract changed deliberately here: an event that leaves its file whole (a rename
# into place, a close after writing) only needs the short `settle` quiet period; the
# long `delay` still applies while any path's latest event may be the first half of a
# save. Unmarked events (`add(path)`) keep the old behaviour, tested above.


@pytest.fixture
def fast(clock: FakeClock) -> Debouncer:
    return Debouncer(settle=0.03125, delay=0.25, max_wait=2.0, clock=clock)


def test_settle_defaults_to_delay(clock: FakeClock) -> None:
    debouncer = Debouncer(delay=0.25, max_wait=2.0, clock=clock)
    debouncer.add("/m/web.yaml", settled=True)
    assert debouncer.deadline() == clock.now + 0.25


def test_an_atomic_save_is_ready_after_the_short_quiet_period(
    fast: Debouncer, clock: FakeClock
) -> None:
    fast.add("/m/web.yaml", settled=True)  # renamed into place
    assert fast.deadline() == clock.now + 0.03125
    clock.advance(0.015625)
    assert fast.ready() == frozenset()
    clock.advance(0.015625)
    assert fast.ready() == {"/m/web.yaml"}


def test_a_burst_of_settled_events_is_still_one_batch(fast: Debouncer, clock: FakeClock) -> None:
    """`git checkout`, `cp -r`: many files, each closed after writing, microseconds apart."""
    for name in ("a", "b", "c"):
        fast.add(f"/m/{name}.yaml", settled=True)
        clock.advance(0.015625)
        assert fast.ready() == frozenset()
    clock.advance(0.015625)
    assert fast.ready() == {"/m/a.yaml", "/m/b.yaml", "/m/c.yaml"}


def test_an_unsettled_path_keeps_the_long_quiet_period(fast: Debouncer, clock: FakeClock) -> None:
    """A file still being written (modified, not closed) holds the whole batch back."""
    fast.add("/m/a.yaml")  # modified, still open
    fast.add("/m/b.yaml", settled=True)
    assert fast.deadline() == clock.now + 0.25
    clock.advance(0.125)
    assert fast.ready() == frozenset(), "a half-written a.yaml must not be read"
    clock.advance(0.125)
    assert fast.ready() == {"/m/a.yaml", "/m/b.yaml"}


def test_the_latest_event_of_a_path_decides(fast: Debouncer, clock: FakeClock) -> None:
    """Truncate and write (modify, modify, close): whole once closed."""
    fast.add("/m/web.yaml")
    fast.add("/m/web.yaml")
    assert fast.deadline() == clock.now + 0.25
    fast.add("/m/web.yaml", settled=True)
    assert fast.deadline() == clock.now + 0.03125
    clock.advance(0.03125)
    assert fast.ready() == {"/m/web.yaml"}


def test_a_delete_waits_for_the_long_quiet_period(fast: Debouncer, clock: FakeClock) -> None:
    """An editor that keeps a backup moves the original away, then writes the new file:
    reading in between would see the environment as deleted."""
    fast.add("/m/web.yaml")  # moved away (or deleted)
    clock.advance(0.125)
    assert fast.ready() == frozenset()
    fast.add("/m/web.yaml")  # created again
    fast.add("/m/web.yaml", settled=True)  # closed after writing
    clock.advance(0.03125)
    assert fast.ready() == {"/m/web.yaml"}


def test_settled_events_do_not_extend_past_max_wait(fast: Debouncer, clock: FakeClock) -> None:
    start = clock.now
    while clock.now - start < 2.0:
        fast.add("/m/busy.yaml", settled=True)
        clock.advance(0.015625)
        if fast.ready():
            break
    assert clock.now - start == 2.0


def test_a_flush_forgets_what_was_unsettled(fast: Debouncer, clock: FakeClock) -> None:
    fast.add("/m/a.yaml")
    clock.advance(0.25)
    assert fast.ready() == {"/m/a.yaml"}
    fast.add("/m/b.yaml", settled=True)
    assert fast.deadline() == clock.now + 0.03125


# --------------------------------------------------------------------------- event filter

ROOT = "/etc/reconciler/manifests"


@pytest.mark.parametrize(
    ("relative", "is_directory", "expected"),
    [
        ("web.yaml", False, True),
        ("web.yml", False, True),
        ("web.json", False, True),
        ("team/sub/web.yaml", False, True),
        ("team", True, True),  # a directory moved in may hold manifests
        (".", True, True),  # the directory itself (deleted, moved away)
        ("README.md", False, False),
        (".web.yaml", False, False),
        (".web.yaml.swp", False, False),
        (".git/config", False, False),
        (".git", True, False),
        ("team/.hidden/web.yaml", False, False),
        ("web.yaml~", False, False),
        ("web.yaml.swp", False, False),
        ("web.yaml.tmp", False, False),
        ("#web.yaml#", False, False),
        ("4913", False, False),  # vim's write test file
    ],
)
def test_relevant_paths(relative: str, is_directory: bool, expected: bool) -> None:
    path = os.path.normpath(os.path.join(ROOT, relative))
    assert is_relevant(path, root=ROOT, is_directory=is_directory) is expected


def test_paths_outside_the_root_are_not_relevant() -> None:
    assert not is_relevant("/etc/reconciler/other.yaml", root=ROOT, is_directory=False)

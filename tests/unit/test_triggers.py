"""The trigger thread and its sources, for real: inotify on a temporary directory, pidfds
of our own child processes, real timers. No root needed.

Every wait has a deadline (`threading.Event.wait(timeout)` on what the callback sets);
nothing sleeps to synchronise.
"""

from __future__ import annotations

import select
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.controller.debounce import Debouncer
from reconciler.controller.exits import ExitWatcher
from reconciler.controller.triggers import Timers, Triggers, Waker
from reconciler.controller.watcher import ManifestWatcher
from reconciler.kernel.types import ProcessRef
from reconciler.state.procinfo import process_start_time

DEADLINE = 5.0


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()  # our own child, by its Popen handle
    proc.wait(timeout=DEADLINE)


def ref_of(proc: subprocess.Popen[bytes]) -> ProcessRef:
    start = process_start_time(proc.pid)
    assert start is not None
    return ProcessRef(pid=proc.pid, start_time=start)


def readable(fd: int, timeout: float = 0.0) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


class Counter:
    """A callback that counts its calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self._event = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
        self._event.set()

    def wait(self, timeout: float = DEADLINE) -> bool:
        called = self._event.wait(timeout)
        self._event.clear()
        return called


# --------------------------------------------------------------------------- exits


def test_an_exit_makes_the_descriptor_readable_and_is_reported_once(
    child: subprocess.Popen[bytes],
) -> None:
    exited = Counter()
    watcher = ExitWatcher(on_exit=exited)
    ref = ref_of(child)
    try:
        watcher.watch([ref])
        assert watcher.watched == 1
        assert not readable(watcher.fileno())
        assert watcher.handle_ready() == 0 and exited.calls == 0
        child.kill()
        assert readable(watcher.fileno(), DEADLINE)
        assert watcher.handle_ready() == 1
        assert exited.calls == 1 and watcher.watched == 0
        child.wait(timeout=DEADLINE)
        watcher.watch([ref])  # still recorded (a failing env): not reported again
        assert exited.calls == 1
    finally:
        watcher.stop()


def test_a_process_gone_before_it_is_watched_is_an_exit_too() -> None:
    exited = Counter()
    watcher = ExitWatcher(on_exit=exited)
    try:
        proc = subprocess.Popen(["true"])
        proc.wait(timeout=DEADLINE)
        watcher.watch([ProcessRef(pid=proc.pid, start_time=1)])
        assert exited.calls == 1
        watcher.watch([ProcessRef(pid=proc.pid, start_time=1)])
        assert exited.calls == 1, "reported once"
    finally:
        watcher.stop()


def test_the_waker_wakes_a_poll() -> None:
    waker = Waker()
    try:
        assert not readable(waker.fileno())
        waker.wake()
        waker.wake()
        assert readable(waker.fileno())
        waker.drain()
        assert not readable(waker.fileno())
    finally:
        waker.close()


# --------------------------------------------------------------------------- the thread


class Rig:
    """A Triggers instance over a temporary manifests directory, with counting callbacks."""

    def __init__(self, root: Path, *, resync: float = 3600.0) -> None:
        self.root = root
        self.enqueued = Counter()
        self.resyncs = Counter()
        self.exits = ExitWatcher(on_exit=self.enqueued)
        self.watcher = ManifestWatcher(root=root)
        self.debouncer = Debouncer(settle=0.01, delay=0.05, max_wait=1.0)
        self.triggers = Triggers(
            timers=Timers(resync=resync, jitter=0.0),
            debouncer=self.debouncer,
            exits=self.exits,
            watcher=self.watcher,
            enqueue=self.enqueued,
            on_resync=self.resyncs,
            on_fetch=lambda: None,
        )

    def start(self) -> None:
        self.watcher.start()
        self.triggers.start()

    def stop(self) -> None:
        self.triggers.stop(timeout=DEADLINE)
        self.watcher.stop()
        self.exits.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    root = tmp_path / "manifests"
    root.mkdir()
    made = Rig(root)
    made.start()
    yield made
    made.stop()


def test_an_atomic_save_becomes_one_key(rig: Rig) -> None:
    temp = rig.root / ".web.yaml.tmp"
    temp.write_text("x\n")
    temp.rename(rig.root / "web.yaml")
    assert rig.enqueued.wait(), "the save was not turned into a key"
    assert rig.enqueued.calls == 1
    assert not rig.debouncer.pending()


def test_a_process_exit_becomes_a_key(rig: Rig, child: subprocess.Popen[bytes]) -> None:
    rig.exits.watch([ref_of(child)])
    child.kill()
    assert rig.enqueued.wait(), "the exit was not turned into a key"


def test_the_resync_timer_fires_repeatedly(tmp_path: Path) -> None:
    rig = Rig(tmp_path, resync=0.05)
    rig.start()
    try:
        for _ in range(3):
            assert rig.resyncs.wait(), "no resync"
            assert rig.enqueued.wait(), "a resync enqueues a key"
    finally:
        rig.stop()


def test_stop_ends_an_idle_thread(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.start()
    assert rig.triggers.running
    rig.stop()
    assert not rig.triggers.running
    assert rig.enqueued.calls == 0

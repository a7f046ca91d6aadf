"""Process exits as triggers: a pidfd per recorded holder and workload, in one epoll.

The controller is level-triggered: an exit only enqueues a reconcile, which re-reads
everything and applies the restart policy. Without this, a crashed workload would wait
for the next resync (30 s by default) to be noticed.

A pidfd refers to one process for its whole life (pid reuse cannot fool it); after
opening one we re-check the recorded start time, so we never watch a stranger that got
the recorded pid while we were down.

No thread of its own: the pidfds sit in one epoll instance, and an epoll descriptor is
itself pollable, so the controller's trigger loop waits on `fileno()` next to its other
sources and calls `handle_ready()` when it is readable. An idle controller therefore
never wakes up for exits that did not happen.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterable

import structlog

from reconciler.kernel.types import ProcessRef
from reconciler.state.model import StateDocument
from reconciler.state.procinfo import process_alive

log = structlog.get_logger("reconciler.controller")


def recorded_processes(state: StateDocument) -> set[ProcessRef]:
    """Every holder and running workload the state file records."""
    refs: set[ProcessRef] = set()
    for record in state.environments.values():
        if record.holder is not None:
            refs.add(record.holder.ref)
        for workload in record.processes.values():
            if workload.pid is not None and workload.start_time is not None:
                refs.add(ProcessRef(pid=workload.pid, start_time=workload.start_time))
    return refs


class ExitWatcher:
    """Calls `on_exit()` (from the thread that calls `handle_ready`) whenever a watched
    process ends."""

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self._on_exit = on_exit
        self._epoll = select.epoll()
        self._fds: dict[ProcessRef, int] = {}
        self._refs: dict[int, ProcessRef] = {}
        # Reported once each: a failing env keeps recording a dead holder, and triggering
        # on it at every reconcile would bypass the queue's failure back-off.
        self._reported: set[ProcessRef] = set()
        self._mutex = threading.Lock()

    def fileno(self) -> int:
        """The epoll descriptor: readable when a watched process has ended."""
        return self._epoll.fileno()

    def stop(self) -> None:
        """Close every pidfd and the epoll instance."""
        with self._mutex:
            for fd in self._refs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            self._refs.clear()
            self._epoll.close()

    def watch(self, refs: Iterable[ProcessRef]) -> None:
        """Watch exactly `refs` from now on (new ones added, stale ones dropped)."""
        wanted = set(refs)
        gone = False
        with self._mutex:
            for ref in [r for r in self._fds if r not in wanted]:
                self._forget(ref)
            for ref in wanted - set(self._fds) - self._reported:
                if not self._add(ref):
                    self._reported.add(ref)
                    gone = True
            self._reported &= wanted
        if gone:  # it ended before we could watch it: that is an exit too
            self._on_exit()

    @property
    def watched(self) -> int:
        """How many processes are being watched."""
        return len(self._fds)

    def _add(self, ref: ProcessRef) -> bool:
        """Watch `ref`; False when it is no longer running."""
        try:
            fd = os.pidfd_open(ref.pid)
        except OSError:
            return False
        if not process_alive(ref.pid, ref.start_time):
            os.close(fd)
            return False
        self._fds[ref] = fd
        self._refs[fd] = ref
        self._epoll.register(fd, select.EPOLLIN)
        return True

    def _forget(self, ref: ProcessRef) -> None:
        fd = self._fds.pop(ref)
        self._refs.pop(fd, None)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        os.close(fd)

    def handle_ready(self) -> int:
        """Report the processes that ended (never blocks); returns how many did."""
        exited = []
        with self._mutex:
            try:
                ready = self._epoll.poll(0)
            except (OSError, ValueError):
                return 0  # closed under us at stop
            for fd, _ in ready:
                ref = self._refs.get(fd)
                if ref is not None:
                    exited.append(ref)
                    self._forget(ref)
                    self._reported.add(ref)
        for ref in exited:
            log.info("process.exited", pid=ref.pid)
        if exited:
            self._on_exit()
        return len(exited)

"""The controller behind `reconciler run`: triggers -> work queue -> reconcile -> state file.

Threads, and the one thing each does:

- **triggers** (`triggers`): one epoll over the manifests directory's inotify descriptor,
  the pidfds of every recorded process and a wake-up eventfd, with the earliest timer
  (debounce deadline, resync, git poll) as its only timeout. A debounced file batch, an
  exit, a due resync becomes a key. Nothing else.
- **worker**: takes keys off the queue and reconciles, one at a time. Only this thread
  touches the kernel drivers and the state document.
- **main**: owns the signals. SIGTERM/SIGINT stop the queue; the worker finishes the
  reconcile in flight and the controller exits 0, leaving every environment running.
  SIGHUP asks for a resync now.
- the health monitor's threads (`health.monitor`): probes and the policy pass.

Idle means asleep: every thread blocks without a timeout (or until its next real
deadline), so a controller with nothing to do costs the resync and the policy pass and
nothing else.

Latency: an editor's atomic save (a rename into place) or a close after writing is
reconciled after `debounce_settle` seconds of quiet (25 ms); other events (a create, a
modify, a delete: possibly the first half of a save) wait `debounce` (200 ms), and a
stream of events flushes at least every `debounce_max` seconds (`debounce`).

Keys. The queue is keyed (`Environment/<name>`, `Network/<name>` are the intended
granularity), but today every key is served by one `reconcile()` of the whole instance
(`ALL`): it converges the whole desired set with one observation pass, which is cheaper
than one pass per object and makes "re-read everything" literally true. The engine
isolates failures per object, so one failing environment never blocks the others; a
reconcile with any failure is retried with per-key exponential backoff (1s doubling to
60s), while a file event or the resync still runs it at once.

The instance lock is held for the controller's whole life: a second `run`, or an `apply`
meanwhile, is refused with the holder's pid. The state document is loaded once, then
carried from save to save (the store refuses a document that was not the last one
written). On a first start the empty document is written before anything is created, so
the state file exists whenever an object of this instance does.

At startup a missing or corrupt state file is refused when this instance owns
live objects, because an empty inventory would forget them; `--recover` starts from an
empty document instead and lets the engine adopt what is live (addresses from eth0,
netns pins, holders found in the env's cgroup), then reports what it adopted.

Orphans - kernel objects carrying this instance's ownership proof that the inventory does
not list, which is what a `kill -9` between creating an object and recording it leaves -
are collected after the first reconcile, after any reconcile that failed or crashed (the
only other way this controller can leave one), on SIGHUP, and with a resync at most
every `orphan_interval` seconds (5 min: a collection re-lists every link and cgroup of
the instance, and while nothing fails there is nothing new to find), against the
inventory that reconcile returned (`engine.orphans`). Never while a manifest fails to
load: what a broken file declares is unknown, and a parse error must never delete
anything.

Metrics (`controller.metrics`) are kept always and served only with `--metrics-addr`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Protocol

import structlog

from reconciler.controller.debounce import Debouncer
from reconciler.controller.exits import ExitWatcher, recorded_processes
from reconciler.controller.metrics import ListenAddress, Metrics, MetricsServer
from reconciler.controller.queue import Backoff, Clock, WorkQueue
from reconciler.controller.triggers import Timers, Triggers
from reconciler.controller.watcher import ManifestWatcher
from reconciler.engine.apply import Drivers
from reconciler.engine.desired import Desired
from reconciler.engine.orphans import Collected, collect_orphans, owned_objects
from reconciler.engine.reconcile import ReconcileResult, reconcile
from reconciler.errors import ReconcilerError, StateError
from reconciler.health.monitor import HealthMonitor, HealthSettings
from reconciler.kernel.logfiles import log_path, rotate_if_needed
from reconciler.kernel.netns import pinned_names
from reconciler.manifests.loader import LoadResult
from reconciler.sources import Fetched
from reconciler.sources.git import GitSource
from reconciler.sources.sync import SyncRefused, fetch_and_load, record_applied, record_refusal
from reconciler.state.events import EventLog
from reconciler.state.lock import InstanceLock
from reconciler.state.model import SourceRecord, StateDocument
from reconciler.state.store import StateCorruptError, StateStore
from reconciler.state.suspend import is_suspended

log = structlog.get_logger("reconciler.controller")

ALL = "all"
"""The key that reconciles the whole instance (file events, resync, startup)."""

_ERROR_LINE = re.compile(r"^(?P<where>.+?:\d+): (?P<kind>[A-Z][A-Za-z]*)/(?P<name>[a-z0-9-]+): ")


class ControllerRuntime(Protocol):
    """What the controller needs from the command line's `Runtime` (kept a Protocol so
    that the controller layer does not import the cli layer above it)."""

    @property
    def store(self) -> StateStore: ...

    @property
    def events(self) -> EventLog: ...

    def drivers(self) -> Drivers: ...

    def load_manifests(self, paths: list[Path] | None = None) -> LoadResult: ...

    def desired(self, result: LoadResult) -> Desired: ...

    def source(self) -> SourceRecord: ...


@dataclass(frozen=True)
class Settings:
    """How the controller paces itself."""

    instance: str
    manifests: Path
    resync: float = 30.0  # seconds between full resyncs (before jitter)
    jitter: float = 0.1  # resync is spread over +-10%
    debounce: float = 0.2  # quiet period after the last file event that may be a half
    debounce_settle: float = 0.025  # ... when every file is whole (renamed in, closed)
    debounce_max: float = 2.0  # a continuous stream of events still flushes this often
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, max_delay=60.0))
    recover: bool = False
    stop_timeout: float = 120.0  # how long a stop waits for the reconcile in flight
    orphan_interval: float = 300.0  # a resync collects orphans at most this often
    metrics_address: ListenAddress | None = None  # serve Prometheus metrics here
    git: GitSource | None = None  # desired state from a repository instead of --manifests
    git_interval: float = 60.0  # seconds between fetches of `git`


class Controller:
    """`reconciler run`: call `run()` from the main thread; it returns after a signal."""

    def __init__(
        self,
        runtime: ControllerRuntime,
        settings: Settings,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue = WorkQueue(clock=clock, backoff=settings.backoff)
        self._debouncer = Debouncer(
            settle=settings.debounce_settle,
            delay=settings.debounce,
            max_wait=settings.debounce_max,
            clock=clock,
        )
        self._watcher = ManifestWatcher(root=settings.manifests)
        self._stopping = threading.Event()
        self._wakeup = threading.Event()  # wakes the main thread: a stop, or the worker ended
        self._lock: InstanceLock | None = None
        self._drivers: Drivers | None = None
        self._state = StateDocument(instance=settings.instance)
        self._on_disk = False  # the state file exists and holds self._state
        self._replace_corrupt = False  # --recover over a corrupt file: set it aside once
        self._adoptable: set[str] | None = None  # --recover: netns pins live at startup
        self._reported_errors: frozenset[str] = frozenset()
        self._reported_failure: str | None = None
        self._changed = False  # the last reconcile planned changes (for the log level)
        self._deferred_since: float | None = None  # worker only: see _should_defer
        self._gc_due = threading.Event()  # collect orphans after the next reconcile
        self._gc_due.set()  # ... the first one: what a crash of the last run left
        self._collected_at: float | None = None  # when orphans were last collected
        self._git_failed = False
        self._fetch_due = threading.Event()  # git mode: fetch before the next reconcile
        self._fetch_due.set()
        self._fetched: tuple[Fetched, LoadResult] | None = None  # git mode: last good commit
        self._exits = ExitWatcher(on_exit=lambda: self._queue.add(ALL))
        self._triggers = Triggers(
            timers=Timers(
                resync=settings.resync,
                jitter=settings.jitter,
                git_interval=None if settings.git is None else settings.git_interval,
            ),
            debouncer=self._debouncer,
            exits=self._exits,
            watcher=self._watcher if settings.git is None else None,
            enqueue=lambda: self._queue.add(ALL),
            on_resync=self._on_resync,
            on_fetch=self._fetch_due.set,
            clock=clock,
            rng=self._rng,
        )
        self._monitor: HealthMonitor | None = None  # probes and policy, once started
        self.metrics = Metrics()
        self.metrics.track_queue(self._queue.depth)
        self._metrics_server: MetricsServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or `request_stop`), stop cleanly.

        Raises ReconcilerError when it cannot start (locked, state unusable, no
        manifests directory, not root); the lock is released in every case.
        """
        self._start()
        restore = self._install_signals()
        worker = threading.Thread(target=self._work_loop, name="reconciler-worker", daemon=True)
        try:
            if self._settings.git is None:
                self._watcher.start()
            self._monitor = HealthMonitor(
                instance=self._settings.instance,
                drivers=self._require_drivers(),
                state=lambda: self._state,
                events=self._runtime.events,
                request_reconcile=lambda: self._queue.add(ALL),
                instance_dir=self._runtime.store.dir,
                # Poked after every reconcile instead of re-reading the state every second.
                settings=HealthSettings(tick=None),
            )
            self._monitor.start()
            worker.start()
            self._triggers.start()
            self._queue.add(ALL)  # converge once at startup, whatever the triggers say
            log.info(
                "controller.started",
                instance=self._settings.instance,
                manifests=str(self._settings.manifests),
                resync=self._settings.resync,
                pid=os.getpid(),
            )
            self._wait(worker)
        finally:
            self.request_stop()
            self._triggers.stop(timeout=2.0)
            self._watcher.stop()
            self._exits.stop()
            if self._monitor is not None:
                self._monitor.stop()
            restore()
            self._close_metrics()
            self._release()
        log.info("controller.stopped", instance=self._settings.instance)

    def request_stop(self) -> None:
        """Ask the controller to stop: no new reconcile starts; the one in flight finishes."""
        self._stopping.set()
        self._queue.shutdown()
        self._triggers.wake()
        self._wakeup.set()

    def _on_resync(self) -> None:
        """Triggers thread: a resync is due; orphans go with it every `orphan_interval`."""
        last = self._collected_at
        if last is None or self._clock() - last >= self._settings.orphan_interval:
            self._gc_due.set()

    def _wait(self, worker: threading.Thread) -> None:
        """Block (main thread, signals delivered) until the worker is done after a stop.

        A wait without a timeout: on POSIX a signal interrupts it, its handler runs here,
        and a stop request sets the event the wait is for.
        """
        self._wakeup.wait()
        if not self._stopping.is_set():
            raise ReconcilerError(
                "the controller's worker stopped unexpectedly; see the log above "
                "(environments are untouched; restart `reconciler run`)"
            )
        worker.join(timeout=self._settings.stop_timeout)
        if worker.is_alive():
            # Never wait forever: the state file is written atomically and every driver
            # is idempotent, so leaving mid-reconcile is as safe as a crash, and the next
            # start converges.
            log.error("controller.stop_timeout", seconds=self._settings.stop_timeout)

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # embedded (tests): the owner calls request_stop()
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }

        def restore() -> None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("signal.received", signal=name, action="resync")
            self._gc_due.set()
            self._queue.add(ALL)
            return
        if self._stopping.is_set():
            log.warning("signal.received", signal=name, action="already stopping")
            return
        log.info("signal.received", signal=name, action="stop after the reconcile in flight")
        self.request_stop()

    # ------------------------------------------------------------------ startup

    def _start(self) -> None:
        """Lock, open the drivers, load the state; everything that may refuse to start."""
        self._lock = self._runtime.store.lock(command="reconciler run")
        self._lock.acquire()
        try:
            self._drivers = self._runtime.drivers()
            self._load_state()
            manifests = self._settings.manifests
            if self._settings.git is None:
                if not manifests.is_dir():
                    raise ReconcilerError(
                        f"manifests directory {manifests} does not exist; create it or pass "
                        "--manifests DIR (a missing directory never means 'delete everything')"
                    )
                self._check_state_dir_outside(manifests)
            address = self._settings.metrics_address
            if address is not None:
                self._metrics_server = self.metrics.serve(address)
                log.info("metrics.serving", address=str(address), port=self._metrics_server.port)
        except BaseException:
            self._close_metrics()
            self._release()
            raise

    def _check_state_dir_outside(self, manifests: Path) -> None:
        """Refuse a state dir the manifests loader and watcher would see.

        Inside the manifests directory, `state.json` would be read as a manifest, and
        every status write would be a file event that triggers another reconcile. A
        hidden directory (`manifests/.state`) is fine: both skip hidden paths.
        """
        state_dir = self._runtime.store.dir.absolute()
        try:
            inside = state_dir.relative_to(manifests.absolute())
        except ValueError:
            return
        if not any(part.startswith(".") for part in inside.parts):
            raise ReconcilerError(
                f"state directory {state_dir} is inside the manifests directory {manifests}: "
                "the state file would be read as a manifest and every status write would "
                "trigger a reconcile; choose a --state-dir outside it"
            )

    def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def _load_state(self) -> None:
        store, settings = self._runtime.store, self._settings
        problem: str | None = None
        try:
            loaded = store.load()
        except StateCorruptError as exc:
            if not settings.recover:
                raise
            loaded, problem = None, exc.reason
            # "missing" (state.json gone, backup present) needs no setting aside.
            self._replace_corrupt = exc.reason != "missing"
        # A newer version or another instance's file (StateError) is never recovered over.
        if loaded is not None:
            if settings.recover:
                log.info("recover.skipped", reason="the state file is readable")
            self._state, self._on_disk = loaded, True
            return
        owned = owned_objects(instance=settings.instance, drivers=self._require_drivers())
        if not settings.recover:
            if owned:
                raise StateError(
                    f"state file {store.path} is missing but {len(owned)} objects owned by "
                    f"instance {settings.instance!r} exist (e.g. {owned[0]}); start with "
                    "`reconciler run --recover` to rebuild the inventory from them"
                )
            # A first start: nothing recorded, nothing owned. Write the empty inventory
            # before creating anything, so that a crash during the first reconcile leaves
            # a state file next to what it made: the restart adopts or collects those
            # objects instead of refusing to start over "owned objects, no state file".
            self._state = store.save(
                StateDocument(instance=settings.instance), summary="initialised"
            )
            self._on_disk = True
            return
        self._adoptable = pinned_names()
        log.warning(
            "recover.started",
            state_file=str(store.path),
            problem=problem or "missing",
            owned=len(owned),
        )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _require_drivers(self) -> Drivers:
        if self._drivers is None:
            raise RuntimeError("controller used before _start()")
        return self._drivers

    # ------------------------------------------------------------------ worker

    def _work_loop(self) -> None:
        """Worker thread: one reconcile at a time until the queue shuts down."""
        try:
            self._serve_queue()
        finally:
            self._wakeup.set()  # the main thread tells a stop from a crash

    def _serve_queue(self) -> None:
        while True:
            key = self._queue.get(timeout=None)  # asleep until a key or the shutdown
            if key is None:
                return
            if self._should_defer(key):
                log.debug("reconcile.deferred", reason="file events still settling")
                self._queue.done(key)
                continue
            ok = False
            try:
                ok = self._reconcile(key)
            finally:
                if ok:
                    self._queue.success(key)
                else:
                    delay = self._queue.failure(key)
                    log.info("reconcile.retry", key=key, seconds=delay)
                self._queue.done(key)

    def _should_defer(self, key: str) -> bool:
        """True when files are being written right now: skip this turn.

        A resync or a retry may come due in the middle of a burst of file events, and
        reading the files then could see a half-written one. The burst's own batch
        enqueues ALL once it is over, so nothing is lost by skipping. Deferring stops
        after `debounce_max`, so that a directory written to without pause (a log file
        named *.yaml) still gets reconciled every few seconds instead of never.
        """
        if key != ALL or not self._triggers.files_pending():
            self._deferred_since = None
            return False
        now = self._clock()
        if self._deferred_since is None:
            self._deferred_since = now
            return True
        if now - self._deferred_since < self._settings.debounce_max:
            return True
        self._deferred_since = None
        return False

    def _reconcile(self, key: str) -> bool:
        """One reconcile of the whole instance, whatever `key` is; True when all converged."""
        reconcile_id = uuid.uuid4().hex[:8]
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(reconcile_id=reconcile_id, key=key):
            try:
                ok = self._reconcile_once()
                if self._monitor is not None:
                    self._monitor.poke()  # a new state document: re-plan the probes now
            except ReconcilerError as exc:
                ok = False
                self._report_failure(exc.message)
            except Exception as exc:
                # A bug must not end the controller: report it, back off, retry. Kernel
                # objects made so far are adopted by the retry (every driver is idempotent).
                ok = False
                log.error("reconcile.crashed", error=repr(exc), traceback=traceback.format_exc())
                self._report_failure(f"internal error: {exc!r} (see the controller's log)")
            if not ok:
                self._gc_due.set()  # what it made before failing may be unrecorded
            elapsed = time.monotonic() - started
            self.metrics.observe_reconcile(seconds=elapsed, ok=ok)
            seconds = round(elapsed, 3)
            # A resync that found nothing to do is the common case: keep it out of the
            # info log, or an idle controller writes a line every 30 seconds forever.
            level = log.info if self._changed or not ok else log.debug
            level("reconcile.finished", ok=ok, seconds=seconds)
        return ok

    def _reconcile_once(self) -> bool:
        self._changed = False
        runtime = self._runtime
        git = self._settings.git
        if git is None:
            result = runtime.load_manifests()
            self._report_manifest_errors(result)
            source = runtime.source()
        else:
            loaded = self._load_git(git)
            if loaded is None:
                return not self._git_failed
            result, source = loaded
        desired = runtime.desired(result)
        # Health first: a quarantine the policy loop decided must be in the isolation the
        # plan compares with the kernel.
        current = self._monitor.annotate(self._state) if self._monitor else self._state
        outcome = reconcile(
            instance=self._settings.instance,
            drivers=self._require_drivers(),
            events=runtime.events,
            desired=desired,
            state=current,
            source=source,
        )
        if self._monitor is not None:
            outcome = replace(outcome, state=self._monitor.annotate(outcome.state))
        if git is not None and self._fetched is not None:
            record_applied(
                events=runtime.events,
                before=self._state.source,
                source=git,
                fetched=self._fetched[0],
            )
        self._save(outcome)
        self._exits.watch(recorded_processes(self._state))
        self._rotate_logs()
        wakeup = outcome.requeue_after
        if wakeup is not None:  # a process back-off expires then
            self._queue.add_after(ALL, wakeup + 0.05)
        self._reported_failure = None
        self.metrics.observe_result(outcome)
        self.metrics.observe_state(self._state)
        if self._gc_due.is_set():
            self._collect_orphans(desired, result)
        if self._adoptable is not None:
            self._report_adopted()
        failed = [f"{o.kind}/{o.name}" for o in outcome.outcomes if not o.ok]
        failed += [f"Environment/{n}" for n in sorted(outcome.plan.address_failures)]
        summary = {k: n for k, n in outcome.plan.summary().items() if n}
        self._changed = bool(summary)
        if failed:
            log.warning("reconcile.incomplete", failed=failed, **summary)
        elif summary:
            log.info("reconcile.converged", **summary)
        # Manifest errors are not retried with backoff: only an edit can fix them, and an
        # edit is a file event.
        return outcome.ok

    def _load_git(self, git: GitSource) -> tuple[LoadResult, SourceRecord] | None:
        """The repository's manifests (fetched when a poll is due), or None: nothing to apply.

        Suspended: nothing happens. A refused fetch or commit is recorded on the source and
        changes nothing else (guarded prune); `_git_failed` makes the queue back off.
        """
        self._git_failed = False
        if is_suspended(self._runtime.store.dir):
            log.debug("git.suspended")
            return None
        fetched_now = self._fetch_due.is_set() or self._fetched is None
        if fetched_now:
            self._fetch_due.clear()
            try:
                self._fetched = fetch_and_load(
                    git, previous=self._state.source, load=self._runtime.load_manifests
                )
            except SyncRefused as refused:
                self._git_failed = True
                log.warning("git.refused", error=refused.message)
                self._state = record_refusal(
                    store=self._runtime.store,
                    events=self._runtime.events,
                    state=self._state,
                    source=git,
                    refused=refused,
                    on_disk=self._on_disk,
                )
                self._on_disk = True
                self._fetched = None
                return None
        assert self._fetched is not None
        fetched, result = self._fetched
        # Between polls keep the recorded fetch time: a resync must not rewrite the state.
        keep_time = None if fetched_now else (self._state.source.last_fetch_time or None)
        return result, git.applied(fetched, now=keep_time, previous=self._state.source)

    def _rotate_logs(self) -> None:
        """Keep every workload's capture file bounded (a stat per process when small)."""
        root = self._require_drivers().log_root
        for env, record in self._state.environments.items():
            for name in record.processes:
                with contextlib.suppress(OSError):
                    rotate_if_needed(log_path(root / env, name))

    def _save(self, outcome: ReconcileResult) -> None:
        store = self._runtime.store
        counts = outcome.plan.summary()
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no changes"
        if self._replace_corrupt:
            self._state = store.save(
                outcome.state, summary=f"recover: {summary}", replace_corrupt=True
            )
            self._replace_corrupt = False
        else:
            previous = self._state if self._on_disk else None
            saved = store.save_if_changed(outcome.state, previous=previous, summary=summary)
            self._state = saved.document
        self._on_disk = True

    def _collect_orphans(self, desired: Desired, result: LoadResult) -> None:
        """Remove owned objects the inventory does not list (see the module docstring)."""
        if result.errors:
            log.debug("orphans.deferred", reason="a manifest failed to load")
            return  # still due: collected after the first reconcile with clean manifests
        self._gc_due.clear()
        self._collected_at = self._clock()
        errors: list[Collected] = []
        removed = collect_orphans(
            instance=self._settings.instance,
            drivers=self._require_drivers(),
            state=self._state,
            keep_environments=set(desired.environments),
            keep_networks=set(desired.networks),
            errors=errors,
        )
        self._emit_collected(removed, failed=False)
        if removed:
            self.metrics.orphans_collected.inc(len(removed))
        self._emit_collected(errors, failed=True)
        if errors:
            self._gc_due.set()  # try again after the next reconcile

    def _emit_collected(self, items: list[Collected], *, failed: bool) -> None:
        """A log line and an event per collected orphan (or per failure to collect one)."""
        for item in items:
            if failed:
                log.warning("orphan.failed", kind=item.kind, name=item.name, error=item.what)
            else:
                log.warning("orphan.collected", kind=item.kind, name=item.name, what=item.what)
            self._runtime.events.emit(
                type="Warning" if failed else "Normal",
                reason="OrphanCollectionFailed" if failed else "OrphanCollected",
                kind=item.kind,
                name=item.name,
                message=item.what,
            )

    # ------------------------------------------------------------------ reporting

    def _report_manifest_errors(self, result: LoadResult) -> None:
        """An `InvalidManifest` event per error line, when the set of errors changes.

        Level-triggered reconciles see the same broken file on every resync; repeating
        its event every 30 seconds would bury everything else in the events log.
        """
        errors = frozenset(result.errors)
        if errors == self._reported_errors:
            return
        for line in sorted(errors - self._reported_errors):
            match = _ERROR_LINE.match(line)
            kind, name = (match["kind"], match["name"]) if match else ("Manifest", line)
            if not match:
                name = line.split(":", 1)[0]
            log.warning("manifest.invalid", error=line)
            self._runtime.events.emit(
                type="Warning", reason="InvalidManifest", kind=kind, name=name, message=line
            )
        if not errors:
            log.info("manifest.valid")
        self._reported_errors = errors

    def _report_failure(self, message: str) -> None:
        """A reconcile that could not run at all (no directory, state unwritable, a bug)."""
        log.warning("reconcile.failed", error=message)
        if message == self._reported_failure:
            return  # the same failure on every retry: one event is enough
        self._reported_failure = message
        self._runtime.events.emit(
            type="Warning",
            reason="ReconcileFailed",
            kind="Manifests",
            name=str(self._settings.manifests),
            message=message,
        )

    def _report_adopted(self) -> None:
        """--recover: one `Adopted` event per environment whose live netns was taken over."""
        pinned, self._adoptable = self._adoptable or set(), None
        for name, record in sorted(self._state.environments.items()):
            if record.netns not in pinned:
                continue
            holder = f"holder pid {record.holder.pid}" if record.holder else "no holder"
            message = (
                f"adopted live environment: netns {record.netns} (inode {record.netns_inode}), "
                f"address {record.address or 'none'}, {holder}"
            )
            log.warning("recover.adopted", env=name, message=message)
            self._runtime.events.emit(
                type="Normal", reason="Adopted", kind="Environment", name=name, message=message
            )

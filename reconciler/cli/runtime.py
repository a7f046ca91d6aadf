"""What every command needs: options, the state store, the drivers, the manifests.

Commands stay thin: they ask the `Runtime` for what they need, and everything expensive
(drivers open netlink sockets, discover cgroup mounts) is built on first use only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import structlog

from reconciler.engine.apply import Drivers
from reconciler.engine.desired import Desired, build_desired
from reconciler.errors import ReconcilerError
from reconciler.kernel.devices import resolve_block_device
from reconciler.manifests.crosscheck import crosscheck
from reconciler.manifests.loader import LoadResult, load_paths
from reconciler.state.events import EventLog
from reconciler.state.model import SourceRecord, StateDocument
from reconciler.state.store import StateStore


@dataclass
class Options:
    """The global options (contract section 3)."""

    manifests: Path
    state_dir: Path
    instance: str
    log_format: str
    verbose: bool = False


@dataclass
class Runtime:
    """Lazily built collaborators for one command invocation."""

    options: Options
    _drivers: Drivers | None = field(default=None, init=False)

    @cached_property
    def store(self) -> StateStore:
        """The instance's state store."""
        return StateStore(self.options.state_dir, self.options.instance)

    @cached_property
    def events(self) -> EventLog:
        """The instance's events log, next to the state file."""
        return EventLog(self.store.dir / "events.jsonl")

    def drivers(self) -> Drivers:
        """Open the kernel drivers (needs root)."""
        if self._drivers is None:
            if os.geteuid() != 0:
                raise ReconcilerError(
                    "this command changes or reads kernel objects: run it as root"
                )
            from reconciler.kernel.cgroups import open_cgroup_driver
            from reconciler.kernel.firewall import FirewallDriver
            from reconciler.kernel.holder import ForkingHolderDriver
            from reconciler.kernel.netlink import NetlinkDriver
            from reconciler.kernel.processes import ForkingProcessDriver

            self._drivers = Drivers(
                network=NetlinkDriver(),
                cgroups=open_cgroup_driver(instance=self.options.instance),
                holders=ForkingHolderDriver(),
                firewall=FirewallDriver(instance=self.options.instance),
                processes=ForkingProcessDriver(),
                log_root=self.store.dir / "logs",
            )
        return self._drivers

    def close(self) -> None:
        """Release sockets."""
        if self._drivers is not None:
            self._drivers.network.close()

    def load_manifests(self, paths: list[Path] | None = None) -> LoadResult:
        """Load and cross-check manifests (default: the manifests directory)."""
        targets = paths or [self.options.manifests]
        for target in targets:
            if not target.exists():
                raise ReconcilerError(
                    f"manifests path {target} does not exist; create it or pass --manifests DIR "
                    "(a missing directory never means 'delete everything')"
                )
        result = load_paths(targets)
        return crosscheck(result, resolve_device=resolve_block_device)

    def desired(self, result: LoadResult) -> Desired:
        """The desired state from a load result."""
        return build_desired(result, resolve_device=resolve_block_device)

    def source(self) -> SourceRecord:
        """Where desired state comes from (the directory, for now)."""
        return SourceRecord(
            kind="directory", path=str(self.options.manifests.resolve()), revision=None
        )

    def load_state(self) -> StateDocument:
        """The recorded state, or a fresh document when there is none yet."""
        return self.store.load() or StateDocument(instance=self.options.instance)


def configure_logging(*, log_format: str, verbose: bool) -> None:
    """structlog to stderr: JSON (default off a terminal) or console."""
    import logging

    level = logging.INFO if verbose else logging.WARNING
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

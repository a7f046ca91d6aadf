"""What every command needs: options, the state store, the drivers, the manifests.

Commands stay thin: they ask the `Runtime` for what they need, and everything expensive
is built on first use only: drivers open netlink sockets and discover cgroup mounts, and
even *importing* the engine, the kernel drivers or pydantic costs tens of milliseconds
each, paid at every start of a short command. So this module imports them where they are
used: `reconciler validate` never loads a kernel driver, `--help` not even pydantic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler import logging_setup
from reconciler.errors import ReconcilerError

if TYPE_CHECKING:
    from reconciler.engine.apply import Drivers
    from reconciler.engine.desired import Desired
    from reconciler.manifests.loader import LoadResult
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
        from reconciler.state.store import StateStore

        return StateStore(self.options.state_dir, self.options.instance)

    @cached_property
    def events(self) -> EventLog:
        """The instance's events log, next to the state file."""
        from reconciler.state.events import EventLog

        return EventLog(self.store.dir / "events.jsonl")

    def drivers(self) -> Drivers:
        """Open the kernel drivers (needs root)."""
        # Whatever runs behind the drivers (engine, health, controller) may log through
        # structlog imported directly: it must have our settings before its first line.
        logging_setup.sync()
        if self._drivers is None:
            if os.geteuid() != 0:
                raise ReconcilerError(
                    "this command changes or reads kernel objects: run it as root"
                )
            from reconciler.engine.apply import Drivers
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
            logging_setup.sync()  # the drivers' own modules may have imported structlog
        return self._drivers

    def close(self) -> None:
        """Release sockets, the nftables context and the holders' forker process."""
        if self._drivers is not None:
            self._drivers.network.close()
            self._drivers.firewall.close()
            self._drivers.holders.close()

    def load_manifests(self, paths: list[Path] | None = None) -> LoadResult:
        """Load and cross-check manifests (default: the manifests directory)."""
        from reconciler.kernel.devices import resolve_block_device
        from reconciler.manifests.crosscheck import crosscheck
        from reconciler.manifests.loader import load_paths

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
        from reconciler.engine.desired import build_desired
        from reconciler.kernel.devices import resolve_block_device

        return build_desired(result, resolve_device=resolve_block_device)

    def source(self) -> SourceRecord:
        """Where desired state comes from (the directory, for now)."""
        from reconciler.state.model import SourceRecord

        return SourceRecord(
            kind="directory", path=str(self.options.manifests.resolve()), revision=None
        )

    def load_state(self) -> StateDocument:
        """The recorded state, or a fresh document when there is none yet."""
        from reconciler.state.model import StateDocument

        return self.store.load() or StateDocument(instance=self.options.instance)


def configure_logging(*, log_format: str, verbose: bool) -> None:
    """structlog to stderr: JSON (default off a terminal) or console (see logging_setup)."""
    logging_setup.configure(log_format=log_format, verbose=verbose)

"""Prometheus metrics of `reconciler run`, served on `--metrics-addr HOST:PORT`.

Everything lives on the controller's own `CollectorRegistry` (never prometheus_client's
global one), so two controllers in one process - tests - never share a counter, and the
scrape shows only what is documented here:

| metric | type | meaning |
|---|---|---|
| `reconciler_reconciles_total` | counter | reconciles run (whatever triggered them) |
| `reconciler_reconcile_errors_total` | counter | reconciles that did not converge everything |
| `reconciler_reconcile_duration_seconds` | histogram | wall time of one reconcile |
| `reconciler_queue_depth` | gauge | keys waiting in the work queue (now or delayed) |
| `reconciler_drift_repairs_total{kind}` | counter | objects repaired because the kernel drifted |
| `reconciler_environments{phase}` | gauge | recorded environments per phase (every phase listed) |
| `reconciler_orphans_collected_total` | counter | orphaned kernel objects removed |

The endpoint is off by default. Metrics say which environments exist and when they fail,
so a non-loopback listen address is refused unless the user says so explicitly
(`--metrics-allow-remote`); a hostname counts as loopback only if every address it
resolves to is one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from reconciler.engine.plan import Action
from reconciler.engine.reconcile import ReconcileResult
from reconciler.errors import ReconcilerError
from reconciler.state.model import Phase, StateDocument

PHASES: tuple[str, ...] = get_args(Phase)
KINDS = ("Environment", "Network")
# From a no-op resync (milliseconds) to a large first converge (tens of seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsAddressError(ReconcilerError):
    """`--metrics-addr` is malformed, or not loopback without `--metrics-allow-remote`."""

    exit_code = 2  # a usage error


@dataclass(frozen=True)
class ListenAddress:
    """Where the metrics endpoint listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str, *, allow_remote: bool) -> ListenAddress:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) as a ListenAddress; refuses what is unsafe or wrong."""
    where = f"--metrics-addr {text!r}"
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise MetricsAddressError(
            f"{where}: expected HOST:PORT, e.g. 127.0.0.1:9100 (an empty host would listen "
            "on every interface)"
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise MetricsAddressError(f"{where}: the port must be a number from 1 to 65535")
    address = ListenAddress(host=host, port=int(port_text))
    if not allow_remote and not _is_loopback(address):
        raise MetricsAddressError(
            f"{where}: {host} is not a loopback address, so anyone who can reach it could "
            f"read the metrics; listen on 127.0.0.1:{address.port}, or pass "
            "--metrics-allow-remote to serve them beyond this host"
        )
    return address


def _is_loopback(address: ListenAddress) -> bool:
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        pass  # a hostname: what it resolves to decides
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MetricsAddressError(
            f"--metrics-addr {address}: cannot resolve {address.host!r} ({exc}); "
            "use an IP address such as 127.0.0.1"
        ) from None
    found = {str(info[4][0]) for info in infos}
    # Strip an IPv6 zone ("fe80::1%eth0") before parsing.
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


class MetricsServer:
    """A running endpoint; `close()` stops it."""

    def __init__(self, server: WSGIServer, address: ListenAddress) -> None:
        self._server = server
        self.address = address

    @property
    def port(self) -> int:
        """The port actually bound."""
        port: int = self._server.server_address[1]
        return port

    def close(self) -> None:
        """Stop serving and release the socket."""
        self._server.shutdown()
        self._server.server_close()


class Metrics:
    """The controller's metrics, on a registry of their own (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.reconciles = Counter("reconciler_reconciles", "Reconciles run.", registry=registry)
        self.reconcile_errors = Counter(
            "reconciler_reconcile_errors",
            "Reconciles that did not converge every object.",
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "reconciler_reconcile_duration_seconds",
            "Wall time of one reconcile.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "reconciler_queue_depth", "Keys waiting in the work queue.", registry=registry
        )
        self.drift_repairs = Counter(
            "reconciler_drift_repairs",
            "Objects repaired because the kernel no longer matched.",
            ["kind"],
            registry=registry,
        )
        self.environments = Gauge(
            "reconciler_environments",
            "Recorded environments by phase.",
            ["phase"],
            registry=registry,
        )
        self.orphans_collected = Counter(
            "reconciler_orphans_collected",
            "Orphaned kernel objects (owned, not in the inventory) removed.",
            registry=registry,
        )
        # Labelled series exist only once touched: touch them all, so that a dashboard
        # sees 0 rather than "no data" for a phase nothing is in.
        for kind in KINDS:
            self.drift_repairs.labels(kind=kind)
        for phase in PHASES:
            self.environments.labels(phase=phase).set(0)

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from `depth()` at every scrape."""
        self.queue_depth.set_function(lambda: float(depth()))

    def observe_reconcile(self, *, seconds: float, ok: bool) -> None:
        """One reconcile finished (or crashed) after `seconds`."""
        self.reconciles.inc()
        self.reconcile_duration.observe(seconds)
        if not ok:
            self.reconcile_errors.inc()

    def observe_result(self, result: ReconcileResult) -> None:
        """Count the drift repairs of a reconcile that ran to the end."""
        for outcome in result.outcomes:
            if not outcome.ok or outcome.action not in (Action.UPDATE, Action.RECREATE):
                continue
            change = result.plan.get(outcome.kind, outcome.name)
            if change is not None and any(r.startswith("drift:") for r in change.reasons):
                self.drift_repairs.labels(kind=outcome.kind).inc()

    def observe_state(self, state: StateDocument) -> None:
        """Environments per phase, as recorded."""
        counts = dict.fromkeys(PHASES, 0)
        for record in state.environments.values():
            counts[record.phase] = counts.get(record.phase, 0) + 1
        for phase, count in counts.items():
            self.environments.labels(phase=phase).set(count)

    def serve(self, address: ListenAddress) -> MetricsServer:
        """Serve `/metrics` on `address` from a daemon thread."""
        try:
            server: Any
            server, _thread = start_http_server(
                address.port, addr=address.host, registry=self.registry
            )
        except OSError as exc:
            raise ReconcilerError(
                f"cannot serve metrics on {address}: {exc.strerror or exc}; choose another "
                "--metrics-addr (is another process using that port?)"
            ) from exc
        return MetricsServer(server, address)

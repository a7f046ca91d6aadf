"""`reconciler release NAME`: lift an environment's quarantine and give its network back.

A quarantine (policy `onViolation: quarantine`) lasts until the environment's manifest
changes or until this command. Two cases, told apart by the instance lock:

- **no controller runs** (the lock is free): the quarantine is cleared in the state file
  under the lock, the isolation rules are re-applied without it at once, and a `Released`
  event is written;
- **a controller runs** (`reconciler run` holds the lock for its whole life): the state is
  its to write, so the command leaves a request in
  `<state-dir>/<instance>/release-requests/NAME`, which the controller's health monitor
  takes on its next policy pass (every few seconds); the command waits for that, up to
  `--wait` seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from reconciler.cli.common import user_errors
from reconciler.errors import LockedError, ReconcilerError

if TYPE_CHECKING:  # imported by the command itself: start-up is paid by every command
    from reconciler.cli.runtime import Runtime

_POLL = 0.1  # seconds between looks at the request file: a user waiting, not a sync


@click.command()
@click.argument("name")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="With a controller running: how long to wait for it to take the request.",
)
@click.pass_obj
@user_errors
def release(runtime: Runtime, name: str, wait: float) -> None:
    """Lift the quarantine of environment NAME and restore its network."""
    state = runtime.load_state()
    if name not in state.environments:
        raise ReconcilerError(
            f"unknown environment {name!r} in instance {runtime.options.instance!r}; "
            "see `reconciler status`"
        )
    lock = runtime.store.lock(command="reconciler release")
    try:
        lock.acquire()
    except LockedError:
        _request(runtime, name, wait)
        return
    try:
        _release_now(runtime, name)
    finally:
        lock.release()


def _request(runtime: Runtime, name: str, wait: float) -> None:
    """A controller holds the lock: hand the release to its health monitor."""
    from reconciler.health.actions import release_pending, request_release

    request_release(runtime.store.dir, name)
    deadline = time.monotonic() + wait
    while release_pending(runtime.store.dir, name) and time.monotonic() < deadline:
        time.sleep(_POLL)
    if release_pending(runtime.store.dir, name):
        click.echo(
            f"Environment/{name}: release requested; the running controller lifts the "
            "quarantine on its next policy pass (see `reconciler events`)"
        )
    else:
        click.echo(f"Environment/{name}: release taken by the running controller")


def _release_now(runtime: Runtime, name: str) -> None:
    """No controller: clear the quarantine in the state and re-apply the isolation rules."""
    from reconciler.engine.isolation import isolation_spec
    from reconciler.health.actions import release_dir
    from reconciler.health.monitor import health_conditions, quarantined_in

    # A request left for a controller that has since stopped is answered here.
    (release_dir(runtime.store.dir) / name).unlink(missing_ok=True)
    state = runtime.load_state()
    record = state.environments.get(name)
    if record is None:
        raise ReconcilerError(f"environment {name!r} disappeared; see `reconciler status`")
    if record.quarantine is None:
        click.echo(f"Environment/{name}: not quarantined (nothing to do)")
        return
    updated = state.clone()
    target = updated.environments[name]
    target.quarantine = None
    target.conditions = health_conditions(target.conditions, probes=target.probes, quarantine=None)
    instance = runtime.options.instance
    runtime.drivers().firewall.ensure(
        isolation_spec(instance=instance, state=updated, quarantined=quarantined_in(updated))
    )
    runtime.store.save(updated, summary=f"release {name}")
    runtime.events.emit(
        type="Normal",
        reason="Released",
        kind="Environment",
        name=name,
        message="quarantine lifted: `reconciler release`",
    )
    click.echo(f"Environment/{name}: released")

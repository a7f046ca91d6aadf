"""The `reconciler` command line (contract section 3).

One function per command; each asks the `Runtime` for what it needs, calls one engine
function and renders the result. Every `ReconcilerError` becomes one line on stderr and
its exit code; usage errors exit 2 (click's convention); nothing prints a traceback.

Start-up is paid by every command, so each imports what it uses inside its body: `--help`
loads click and nothing else, `validate` the manifest models but no engine or driver,
`apply` the engine and drivers but not the controller, health loop, git or metrics code
(tests/unit/test_cli_imports.py holds these lines).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from reconciler.cli.common import fail, report_outcome, save_state, user_errors
from reconciler.cli.run_command import run
from reconciler.cli.runtime import Options, Runtime, configure_logging
from reconciler.errors import ReconcilerError

if TYPE_CHECKING:
    from reconciler.engine.desired import Desired
    from reconciler.manifests.loader import LoadResult
    from reconciler.state.model import StateDocument

P = ParamSpec("P")
R = TypeVar("R")
# No "-": it separates instance and environment in netns names (`<instance>-<env>`), so
# instance `dev` with env `x-web` and instance `dev-x` with env `web` can never collide.
INSTANCE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")


def _instance(ctx: click.Context, param: click.Parameter, value: str) -> str:
    del ctx, param
    if not INSTANCE_PATTERN.match(value):
        raise click.BadParameter(
            f"{value!r}: use 1-32 lowercase letters, digits and '_' (no '-': it separates "
            "instance and environment in netns names, e.g. ci_42-payments)"
        )
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": None})
@click.option(
    "-m",
    "--manifests",
    envvar="RECONCILER_MANIFESTS",
    default="/etc/reconciler/manifests",
    type=click.Path(path_type=Path),
    show_default=True,
    help="Manifests directory.",
)
@click.option(
    "--state-dir",
    envvar="RECONCILER_STATE_DIR",
    default="/var/lib/reconciler",
    type=click.Path(path_type=Path),
    show_default=True,
    help="Where state and events live.",
)
@click.option(
    "--instance",
    envvar="RECONCILER_INSTANCE",
    default="reconciler",
    show_default=True,
    callback=_instance,
    help="Scopes every owned object (cgroup parent, names, tags).",
)
@click.option(
    "--log-format",
    envvar="RECONCILER_LOG_FORMAT",
    type=click.Choice(["json", "console"]),
    default=None,
    help="Default: console on a terminal, else json.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every change (info level).")
@click.version_option(package_name="reconciler")
@click.pass_context
def cli(
    ctx: click.Context,
    manifests: Path,
    state_dir: Path,
    instance: str,
    log_format: str | None,
    verbose: bool,
) -> None:
    """Converge this host to the environments declared in YAML manifests."""
    fmt = log_format or ("console" if sys.stderr.isatty() else "json")
    configure_logging(log_format=fmt, verbose=verbose)
    runtime = Runtime(
        Options(
            manifests=manifests,
            state_dir=state_dir,
            instance=instance,
            log_format=fmt,
            verbose=verbose,
        )
    )
    ctx.obj = runtime
    ctx.call_on_close(runtime.close)


def _report_manifest_errors(result: LoadResult) -> None:
    for line in result.errors:
        click.echo(line, err=True)


# --------------------------------------------------------------------------- validate / schema


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.pass_obj
@user_errors
def validate(runtime: Runtime, paths: tuple[Path, ...]) -> None:
    """Parse and validate manifests; print file:line: message per error."""
    result = runtime.load_manifests(list(paths) or None)
    if result.errors:
        _report_manifest_errors(result)
        sys.exit(1)
    click.echo(f"{len(result.manifests)} manifests valid in {len(result.files)} files")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the manifest kinds."""
    from reconciler.manifests.schema import manifest_schema

    click.echo(json.dumps(manifest_schema(), indent=2))


# --------------------------------------------------------------------------- plan / apply


def _desired(runtime: Runtime) -> tuple[LoadResult, Desired]:
    result = runtime.load_manifests()
    _report_manifest_errors(result)
    return result, runtime.desired(result)


@cli.command()
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0: no changes, 2: changes, 1: error.")
@click.pass_obj
@user_errors
def plan(runtime: Runtime, output: str, detailed_exitcode: bool) -> None:
    """Show what apply would change; touches nothing."""
    from reconciler.cli.render import plan_text
    from reconciler.engine.reconcile import plan_for

    result, desired = _desired(runtime)
    state = runtime.load_state()
    planned, _ = plan_for(
        instance=runtime.options.instance, drivers=runtime.drivers(), desired=desired, state=state
    )
    if output == "json":
        click.echo(json.dumps(planned.to_json(), indent=2))
    else:
        click.echo(plan_text(planned))
    for name, reason in sorted(planned.address_failures.items()):
        click.echo(f"error: Environment/{name}: {reason}", err=True)
    if result.errors or planned.address_failures:
        sys.exit(1)
    if detailed_exitcode and planned.has_changes:
        sys.exit(2)


@cli.command()
@click.pass_obj
@user_errors
def apply(runtime: Runtime) -> None:
    """Converge once, then exit (1 if anything failed)."""
    from reconciler.engine.reconcile import reconcile

    result, desired = _desired(runtime)
    with runtime.store.lock(command="reconciler apply"):
        state = runtime.load_state()
        outcome = reconcile(
            instance=runtime.options.instance,
            drivers=runtime.drivers(),
            events=runtime.events,
            desired=desired,
            state=state,
            source=runtime.source(),
        )
        save_state(runtime, outcome.state, previous=state, plan=outcome.plan)
    failed = report_outcome(outcome)
    if failed or result.errors:
        sys.exit(1)


# --------------------------------------------------------------------------- status


@cli.command()
@click.argument("names", nargs=-1)
@click.option(
    "-o", "--output", type=click.Choice(["table", "wide", "json", "yaml"]), default="table"
)
@click.pass_obj
@user_errors
def status(runtime: Runtime, names: tuple[str, ...], output: str) -> None:
    """Environments and networks, as recorded and as live."""
    from reconciler.cli.render import status_tables
    from reconciler.cli.status import build_status
    from reconciler.engine.orphans import owned_objects

    state = _state_or_orphans(runtime, owned_objects)
    unknown = [n for n in names if n not in state.environments]
    doc = build_status(runtime, state, list(names))
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    elif output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)
    else:
        click.echo(status_tables(doc, wide=output == "wide"))
    if unknown:
        fail(f"unknown environment(s): {', '.join(unknown)} (see `reconciler status`)")


def _state_or_orphans(runtime: Runtime, owned: Callable[..., list[str]]) -> StateDocument:
    """The state; when it is missing or corrupt but owned objects exist, a clear error."""
    from reconciler.state.model import StateDocument

    try:
        loaded = runtime.store.load()
    except ReconcilerError as exc:
        raise ReconcilerError(f"{exc}") from None
    if loaded is not None:
        return loaded
    found = owned(instance=runtime.options.instance, drivers=runtime.drivers())
    if found:
        raise ReconcilerError(
            f"state file {runtime.store.path} is missing but {len(found)} objects owned by "
            f"instance {runtime.options.instance!r} exist (e.g. {found[0]}); "
            "run `reconciler run --recover` to rebuild the inventory from them"
        )
    return StateDocument(instance=runtime.options.instance)


# --------------------------------------------------------------------------- destroy


@cli.command()
@click.argument("names", nargs=-1)
@click.pass_obj
@user_errors
def destroy(runtime: Runtime, names: tuple[str, ...]) -> None:
    """Tear down the named environments, or everything this instance owns."""
    from reconciler.engine.apply import apply_plan
    from reconciler.engine.desired import Desired
    from reconciler.engine.plan import Action, Change, Plan

    with runtime.store.lock(command="reconciler destroy"):
        state = runtime.load_state()
        targets = list(names) or sorted(state.environments)
        for name in names:
            if name not in state.environments:
                click.echo(f"Environment/{name}: not found (nothing to do)", err=True)
        changes = [
            Change("Environment", n, Action.DELETE, ("destroy",))
            for n in targets
            if n in state.environments
        ]
        if not names:
            changes += [
                Change("Network", n, Action.DELETE, ("destroy",)) for n in sorted(state.networks)
            ]
        drivers = runtime.drivers()
        new_state, outcomes = apply_plan(
            instance=runtime.options.instance,
            drivers=drivers,
            events=runtime.events,
            state=state,
            desired=Desired(),
            plan=Plan(changes=tuple(changes)),
        )
        if not names and not new_state.environments:
            from reconciler.engine.orphans import collect_orphans

            for orphan in collect_orphans(
                instance=runtime.options.instance, drivers=drivers, state=new_state
            ):
                click.echo(f"{orphan.kind}/{orphan.name}: {orphan.what}")
                runtime.events.emit(
                    type="Normal",
                    reason="OrphanCollected",
                    kind=orphan.kind,
                    name=orphan.name,
                    message=orphan.what,
                )
            drivers.cgroups.remove_parent()
        if runtime.store.exists() or changes:
            runtime.store.save_if_changed(new_state, previous=state, summary="destroy")
    failed = [o for o in outcomes if not o.ok]
    for item in outcomes:
        if item.ok:
            click.echo(f"{item.kind}/{item.name}: destroyed")
        else:
            click.echo(f"{item.kind}/{item.name}: failed: {item.message}", err=True)
    if failed:
        sys.exit(1)


# --------------------------------------------------------------------------- events


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise click.BadParameter(f"{text!r}: use a duration like 30s, 10m, 2h, 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
    return timedelta(**{unit: int(match[1])})


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("--since", "since", default=None, help="Only events newer than this (30s, 10m, 2h).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
@user_errors
def events(runtime: Runtime, follow: bool, since: str | None, output: str) -> None:
    """Reconcile results, drift repairs, failures."""
    cutoff = None
    if since:
        cutoff = (datetime.now(UTC) - _duration(since)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if follow:
        for event in runtime.events.follow(since=cutoff):
            _print_event(event, output)
        return
    for event in runtime.events.read(since=cutoff):
        _print_event(event, output)


def _print_event(event: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(json.dumps(event, separators=(",", ":")))
        return
    count = event.get("count", 1)
    repeated = f" (x{count})" if isinstance(count, int) and count > 1 else ""
    click.echo(
        f"{event.get('time')}  {event.get('type'):<7}  {event.get('reason'):<15}  "
        f"{event.get('kind')}/{event.get('name')}: {event.get('message')}{repeated}"
    )


cli.add_command(run)
from reconciler.cli.exec_command import exec_, logs  # noqa: E402

cli.add_command(exec_)
cli.add_command(logs)
from reconciler.cli.sync_command import resume, suspend, sync  # noqa: E402

cli.add_command(sync)
cli.add_command(suspend)
cli.add_command(resume)
from reconciler.cli.release_command import release  # noqa: E402

cli.add_command(release)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="reconciler")

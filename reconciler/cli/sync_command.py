"""`reconciler sync`, `suspend` and `resume`: a git repository as the source of truth.

`sync --git-url URL [--git-ref REF] [--git-path DIR] [--git-verify-keyring FILE]` takes
the instance lock, brings the instance's checkout (`<state-dir>/<instance>/git`) to the
commit REF resolves to (`reconciler.sources.git`), loads the manifests under DIR and
applies them exactly as `apply` does. The state's `source` then records `kind: git`, the
URL without credentials, the ref, the path, and `revision`: the commit applied.

A revision is applied whole or not at all (guarded prune). When the fetch fails, the ref
is unknown, the path is missing, the signature is refused, or any manifest of the commit
fails to parse or validate, nothing is planned: every environment stays as last applied,
`source` keeps `revision` at the last applied commit and records `lastAttemptedRevision`,
`lastFetchTime` and `lastError`, a `SyncFailed` warning event is written, and the command
exits 1. Manifest errors read `rev abc1234: DIR/file.yaml:LINE: message`. A path that
exists but declares nothing (say, only a README) is a valid, empty declaration: it
prunes everything, because that is what the commit says.

`suspend` and `resume` set `source.suspended` in the state. While it is set, `sync` (and
the controller's git polling) changes nothing and says so; environments keep running as
they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from reconciler.cli.common import report_outcome, save_state, user_errors
from reconciler.errors import ManifestError
from reconciler.sources import SourceError

if TYPE_CHECKING:  # the git source and the engine are imported by the commands that use them
    from reconciler.cli.runtime import Runtime


# --------------------------------------------------------------------------- option checks


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    del ctx, param
    from reconciler.sources.git import normalize_url

    try:
        normalize_url(value, cwd=Path.cwd())
    except SourceError as exc:
        raise click.BadParameter(exc.message) from None
    return value


def _check_ref(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    del ctx, param
    from reconciler.sources.git import classify_ref

    if value is not None:
        try:
            classify_ref(value)
        except SourceError as exc:
            raise click.BadParameter(exc.message) from None
    return value


def _check_path(ctx: click.Context, param: click.Parameter, value: str) -> str:
    del ctx, param
    from reconciler.sources.git import normalize_repo_path

    try:
        return normalize_repo_path(value)
    except SourceError as exc:
        raise click.BadParameter(exc.message) from None


# --------------------------------------------------------------------------- sync


@click.command()
@click.option(
    "--git-url",
    required=True,
    metavar="URL",
    callback=_check_url,
    help="Repository: https://, ssh://, host:path, file:// or a local path.",
)
@click.option(
    "--git-ref",
    metavar="REF",
    callback=_check_ref,
    help="Tag, branch or commit sha.  [default: the remote's default branch]",
)
@click.option(
    "--git-path",
    metavar="DIR",
    default=".",
    show_default=True,
    callback=_check_path,
    help="Manifests folder inside the repository.",
)
@click.option(
    "--git-verify-keyring",
    metavar="FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Require the commit to be signed by a key in this exported public keyring.",
)
@click.pass_obj
@user_errors
def sync(
    runtime: Runtime,
    git_url: str,
    git_ref: str | None,
    git_path: str,
    git_verify_keyring: Path | None,
) -> None:
    """Fetch a git repository once and apply its manifests (exit 1 if anything failed)."""
    from reconciler.engine.reconcile import reconcile
    from reconciler.sources.git import GitSource
    from reconciler.sources.sync import (
        CHECKOUT_DIR,
        SyncRefused,
        fetch_and_load,
        record_applied,
        record_refusal,
    )
    from reconciler.state.suspend import is_suspended

    source = GitSource(
        url=git_url,
        checkout_dir=runtime.store.dir / CHECKOUT_DIR,
        ref=git_ref,
        path=git_path,
        keyring=git_verify_keyring.absolute() if git_verify_keyring else None,
    )
    drivers = runtime.drivers()  # not root: say so before fetching anything
    with runtime.store.lock(command="reconciler sync"):
        state = runtime.load_state()
        if is_suspended(runtime.store.dir):
            click.echo("sync suspended; run `reconciler resume` to apply the repository again")
            return
        try:
            fetched, result = fetch_and_load(
                source, previous=state.source, load=runtime.load_manifests
            )
        except SyncRefused as refused:
            record_refusal(
                store=runtime.store,
                events=runtime.events,
                state=state,
                source=source,
                refused=refused,
                on_disk=runtime.store.exists(),
            )
            if refused.lines:
                raise ManifestError(refused.lines) from None
            raise
        click.echo(f"{source.display_url} {source.display_ref}: revision {fetched.revision}")
        outcome = reconcile(
            instance=runtime.options.instance,
            drivers=drivers,
            events=runtime.events,
            desired=runtime.desired(result),
            state=state,
            source=source.applied(fetched, previous=state.source),
        )
        save_state(runtime, outcome.state, previous=state, plan=outcome.plan)
        record_applied(events=runtime.events, before=state.source, source=source, fetched=fetched)
    if report_outcome(outcome, nothing="The host matches the repository."):
        raise SystemExit(1)


# --------------------------------------------------------------------------- suspend / resume


@click.command()
@click.pass_obj
@user_errors
def suspend(runtime: Runtime) -> None:
    """Pause syncing: `sync` and the controller leave everything as it is."""
    _set_suspended(runtime, suspended=True)


@click.command()
@click.pass_obj
@user_errors
def resume(runtime: Runtime) -> None:
    """Resume syncing after `suspend`."""
    _set_suspended(runtime, suspended=False)


def _set_suspended(runtime: Runtime, *, suspended: bool) -> None:
    from reconciler.sources.sync import EVENT_KIND
    from reconciler.state.suspend import set_suspended

    word = "suspended" if suspended else "resumed"
    # No lock: a running controller holds it for good; the flag file is atomic.
    if not set_suspended(runtime.store.dir, suspended=suspended):
        click.echo(f"sync already {word}; nothing changed")
        return
    source = runtime.load_state().source
    runtime.events.emit(
        type="Normal",
        reason="SyncSuspended" if suspended else "SyncResumed",
        kind=EVENT_KIND if source.kind == "git" else "Manifests",
        name=(source.url if source.kind == "git" else source.path) or "-",
        message=f"sync {word}",
    )
    if suspended:
        click.echo("sync suspended; environments keep running as they are; `reconciler resume`")
    else:
        click.echo("sync resumed; the next `reconciler sync` applies the repository")

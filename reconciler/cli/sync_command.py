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

import click

from reconciler.cli.common import report_outcome, save_state, user_errors
from reconciler.cli.runtime import Runtime
from reconciler.engine.reconcile import reconcile
from reconciler.errors import ManifestError
from reconciler.manifests.loader import LoadResult
from reconciler.sources import Fetched, SourceError
from reconciler.sources.git import (
    GitSource,
    classify_ref,
    normalize_repo_path,
    normalize_url,
)
from reconciler.state.model import StateDocument

CHECKOUT_DIR = "git"
"""The instance's checkout, under `<state-dir>/<instance>/`."""
EVENT_KIND = "GitRepository"


# --------------------------------------------------------------------------- option checks


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    del ctx, param
    try:
        normalize_url(value, cwd=Path.cwd())
    except SourceError as exc:
        raise click.BadParameter(exc.message) from None
    return value


def _check_ref(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    del ctx, param
    if value is not None:
        try:
            classify_ref(value)
        except SourceError as exc:
            raise click.BadParameter(exc.message) from None
    return value


def _check_path(ctx: click.Context, param: click.Parameter, value: str) -> str:
    del ctx, param
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
        if state.source.suspended:
            click.echo("sync suspended; run `reconciler resume` to apply the repository again")
            return
        fetched, result = _fetch_and_load(runtime, source, state)
        click.echo(f"{source.display_url} {source.display_ref}: revision {fetched.revision}")
        outcome = reconcile(
            instance=runtime.options.instance,
            drivers=drivers,
            events=runtime.events,
            desired=runtime.desired(result),
            state=state,
            source=source.applied(fetched),
        )
        save_state(runtime, outcome.state, previous=state, plan=outcome.plan)
        if state.source.revision != fetched.revision or state.source.url != source.display_url:
            runtime.events.emit(
                type="Normal",
                reason="Synced",
                kind=EVENT_KIND,
                name=source.display_url,
                message=f"applied revision {fetched.revision} ({source.display_ref}, "
                f"path {source.path})",
            )
    if report_outcome(outcome, nothing="The host matches the repository."):
        raise SystemExit(1)


def _fetch_and_load(
    runtime: Runtime, source: GitSource, state: StateDocument
) -> tuple[Fetched, LoadResult]:
    """The commit's manifests, all valid; otherwise record the failure and raise."""
    try:
        fetched = source.fetch()
        result = runtime.load_manifests([fetched.root])
    except SourceError as exc:
        _record_failure(runtime, source, state, error=exc.message, revision=exc.revision)
        raise
    if result.errors:
        lines = source.manifest_errors(fetched, result.errors)
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        _record_failure(
            runtime, source, state, error=f"{lines[0]}{more}", revision=fetched.revision
        )
        raise ManifestError(
            [*lines, f"error: revision {fetched.short} not applied; nothing changed"]
        )
    return fetched, result


def _record_failure(
    runtime: Runtime,
    source: GitSource,
    state: StateDocument,
    *,
    error: str,
    revision: str | None,
) -> None:
    """Keep everything as applied; only the source's attempt fields change."""
    new_state = state.model_copy(deep=True)
    new_state.source = source.failed(state.source, error=error, revision=revision)
    previous = state if runtime.store.exists() else None
    runtime.store.save_if_changed(new_state, previous=previous, summary="sync failed")
    runtime.events.emit(
        type="Warning",
        reason="SyncFailed",
        kind=EVENT_KIND,
        name=source.display_url,
        message=new_state.source.last_error or "sync failed",
    )


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
    word = "suspended" if suspended else "resumed"
    with runtime.store.lock(command=f"reconciler {'suspend' if suspended else 'resume'}"):
        state = runtime.load_state()
        if state.source.suspended == suspended:
            click.echo(f"sync already {word}; nothing changed")
            return
        new_state = state.model_copy(deep=True)
        new_state.source.suspended = suspended
        previous = state if runtime.store.exists() else None
        runtime.store.save_if_changed(new_state, previous=previous, summary=f"sync {word}")
        source = new_state.source
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

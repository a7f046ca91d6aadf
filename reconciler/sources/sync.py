"""One sync attempt of a git source, shared by `reconciler sync` and `reconciler run`.

Guarded: a failed fetch, a refused signature, a missing path, or a commit with any invalid
manifest is refused whole. The caller then records only the attempt (`lastError`,
`lastAttemptedRevision`, `lastFetchTime`) and keeps every environment as last applied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reconciler.errors import ReconcilerError
from reconciler.manifests.loader import LoadResult
from reconciler.sources import Fetched, SourceError
from reconciler.sources.git import GitSource
from reconciler.state.events import EventLog
from reconciler.state.model import SourceRecord, StateDocument
from reconciler.state.store import StateStore

EVENT_KIND = "GitRepository"
CHECKOUT_DIR = "git"  # <state-dir>/<instance>/git: the instance's clean checkout


class SyncRefused(ReconcilerError):
    """The attempt was refused; `record` is the state's new `source`, `lines` the report."""

    def __init__(self, message: str, *, record: SourceRecord, lines: list[str]) -> None:
        super().__init__(message)
        self.record = record
        self.lines = lines


def fetch_and_load(
    source: GitSource,
    *,
    previous: SourceRecord,
    load: Callable[[list[Path]], LoadResult],
) -> tuple[Fetched, LoadResult]:
    """The commit's manifests, all valid; otherwise SyncRefused."""
    try:
        fetched = source.fetch()
        result = load([fetched.root])
    except SourceError as exc:
        record = source.failed(previous, error=exc.message, revision=exc.revision)
        raise SyncRefused(exc.message, record=record, lines=[]) from exc
    if result.errors:
        lines = source.manifest_errors(fetched, result.errors)
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        record = source.failed(previous, error=f"{lines[0]}{more}", revision=fetched.revision)
        lines.append(f"error: revision {fetched.short} not applied; nothing changed")
        raise SyncRefused(lines[0], record=record, lines=lines)
    return fetched, result


def record_refusal(
    *,
    store: StateStore,
    events: EventLog,
    state: StateDocument,
    source: GitSource,
    refused: SyncRefused,
    on_disk: bool,
) -> StateDocument:
    """Keep everything as applied; only the source's attempt fields change. Returns the
    written document (the caller continues from it)."""
    new_state = state.clone()
    new_state.source = refused.record
    saved = store.save_if_changed(
        new_state, previous=state if on_disk else None, summary="sync failed"
    )
    events.emit(
        type="Warning",
        reason="SyncFailed",
        kind=EVENT_KIND,
        name=source.display_url,
        message=refused.record.last_error or "sync failed",
    )
    return saved.document


def record_applied(
    *, events: EventLog, before: SourceRecord, source: GitSource, fetched: Fetched
) -> None:
    """A `Synced` event when a new revision (or another repository) was applied."""
    if before.revision == fetched.revision and before.url == source.display_url:
        return
    events.emit(
        type="Normal",
        reason="Synced",
        kind=EVENT_KIND,
        name=source.display_url,
        message=f"applied revision {fetched.revision} ({source.display_ref}, path {source.path})",
    )

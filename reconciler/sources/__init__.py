"""Sources: where the desired state comes from, and at which revision.

A source turns "where the manifests live" into a directory on this host holding exactly
the files to load, plus the revision they came from:

- `DirectorySource` (`sources.directory`): the `--manifests` directory as it is now; no
  revision.
- `GitSource` (`sources.git`): a commit of a git repository, checked out into a private
  working tree under the state directory; the revision is the commit sha.

`fetch()` returns a `Fetched` or raises a `SourceError`. A `SourceError` means "the
desired state is unknown right now" (unreachable repository, unknown ref, missing path,
refused signature), which is never the same as "nothing is desired": callers must not
plan, and above all must not prune, from a failed fetch (architecture rule 2, guarded
prune). They record the failure on the state's `source` instead (`GitSource.failed`),
keeping `revision` at the last applied commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ReconcilerError


@dataclass(frozen=True)
class Fetched:
    """What a source produced: the directory to load manifests from, and its revision."""

    root: Path
    revision: str | None = None

    @property
    def short(self) -> str:
        """The revision abbreviated for messages (`abc1234`), or "" without one."""
        return short_revision(self.revision)


class SourceError(ReconcilerError):
    """The source could not produce a desired state; nothing may be planned from it.

    `revision` is the commit the failure concerns when it was resolved (a refused
    signature, a missing --git-path), None when the fetch itself failed.
    """

    def __init__(self, message: str, *, revision: str | None = None) -> None:
        super().__init__(message)
        self.revision = revision


def short_revision(revision: str | None) -> str:
    """`abc1234` for a commit sha: what git itself shows by default."""
    return (revision or "")[:7]


__all__ = ["Fetched", "SourceError", "short_revision"]

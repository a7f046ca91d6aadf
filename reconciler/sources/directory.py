"""The directory source: the `--manifests` directory, read as it is right now.

It has no revision: the files are the truth at the moment they are read. Its only rule is
the guarded prune: a missing directory is an error, never "nothing is desired".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.sources import Fetched, SourceError
from reconciler.state.model import SourceRecord


@dataclass(frozen=True)
class DirectorySource:
    """Manifests from a directory (or a single file) on this host."""

    path: Path

    def fetch(self) -> Fetched:
        """The directory itself; raises SourceError when it does not exist."""
        if not self.path.exists():
            raise SourceError(
                f"manifests path {self.path} does not exist; create it or pass --manifests DIR "
                "(a missing directory never means 'delete everything')"
            )
        return Fetched(root=self.path)

    def record(self) -> SourceRecord:
        """The state's `source` for this directory."""
        return SourceRecord(kind="directory", path=str(self.path.resolve()), revision=None)

"""The events log: an append-only JSON-lines file of what happened, for `reconciler events`.

One object per line, the contract's shape:
`{"time", "type": "Normal|Warning", "reason", "kind", "name", "message"}` plus `count`,
`firstTime` when identical events were folded. The file lives next to the state file
(`events.jsonl`); past `MAX_BYTES` it is rotated to `events.jsonl.1` (one generation).
Appends are single `write` calls on an O_APPEND descriptor, so concurrent writers never
interleave within a line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from reconciler.state.conditions import now_rfc3339

MAX_BYTES = 4 * 1024 * 1024
EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    """One thing that happened to one object."""

    time: str
    type: EventType
    reason: str
    kind: str
    name: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """The contract's event object."""
        return asdict(self)


class EventLog:
    """Append and read the events file of one instance."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, *, type: EventType, reason: str, kind: str, name: str, message: str) -> Event:
        """Append one event (and rotate the file when it grew past MAX_BYTES)."""
        event = Event(
            time=now_rfc3339(), type=type, reason=reason, kind=kind, name=name, message=message
        )
        line = json.dumps(event.to_json(), separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rotate_if_large()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return event

    def _rotate_if_large(self) -> None:
        try:
            if self.path.stat().st_size >= MAX_BYTES:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass

    def read(self, *, since: str | None = None) -> Iterator[dict[str, Any]]:
        """Events in order, oldest first (rotated file first), optionally from `since` on."""
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                if isinstance(event, dict) and (
                    since is None or str(event.get("time", "")) >= since
                ):
                    yield event

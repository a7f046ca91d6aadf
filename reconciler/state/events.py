"""The events log: an append-only JSON-lines file of what happened, for `reconciler events`.

One object per line, the contract's shape (section 5) plus three keys:

    {"time": "<last seen>", "type": "Normal|Warning", "reason": "...", "kind": "...",
     "name": "...", "message": "...", "id": "<12 hex>", "count": 3, "firstTime": "<first>"}

**Folding.** A level-triggered controller sees the same thing again and again (a holder
killed every minute by a buggy workload, the same error on every retry). Kubernetes folds
such repeats into one event with a count, and so do we: an event identical to an earlier
one (same type, reason, kind, name and message) seen less than `FOLD_WINDOW` seconds after
that one's last occurrence is not a new event but *the same event seen again*. The log
stays append-only: the repeat is written as a new line with the same `id`, `count` + 1, the
original `firstTime` and `time` = now, and readers keep only the last line of each id
(`read()` does that). So a crash between two writes can lose a count, never an event, and
never leaves a half-rewritten file.

The writer remembers the last event of each identity in memory (bounded, entries older
than the window dropped), seeded from the tail of the file on first use: a restarted
controller, or a one-shot `apply` run every minute by cron, folds into what the previous
process wrote.

**Size.** Past `MAX_BYTES` the file is rotated to `events.jsonl.1` (one generation), so the
log never holds more than about twice that. An event folded across a rotation has lines in
both files; `read()` reads the rotated file first, so the newest line still wins.

Appends are single `write` calls on an O_APPEND descriptor, so concurrent writers never
interleave within a line.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

MAX_BYTES = 4 * 1024 * 1024
FOLD_WINDOW = 600.0  # seconds: a repeat later than this after the last one is a new event
FOLD_CACHE_MAX = 4096  # identities remembered for folding; the oldest are forgotten first
_TAIL_BYTES = 256 * 1024  # how much of the file seeds the fold cache
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
EventType = Literal["Normal", "Warning"]
Now = Callable[[], datetime]
FoldKey = tuple[str, str, str, str, str]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime(_TIME_FORMAT)


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.strptime(str(text), _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass(frozen=True)
class Event:
    """One thing that happened to one object (seen `count` times, first at `first_time`)."""

    time: str  # RFC3339, when it was last seen
    type: EventType
    reason: str
    kind: str
    name: str
    message: str
    id: str = ""
    count: int = 1
    first_time: str = ""

    @property
    def fold_key(self) -> FoldKey:
        """What makes two events "the same event seen again"."""
        return (self.type, self.reason, self.kind, self.name, self.message)

    def to_json(self) -> dict[str, Any]:
        """The contract's event object, plus `id`, `count` and `firstTime`."""
        return {
            "time": self.time,
            "type": self.type,
            "reason": self.reason,
            "kind": self.kind,
            "name": self.name,
            "message": self.message,
            "id": self.id,
            "count": self.count,
            "firstTime": self.first_time or self.time,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event | None:
        """The event a log line holds, or None if the line is not one of ours."""
        kind = data.get("type")
        if kind not in ("Normal", "Warning") or not isinstance(data.get("time"), str):
            return None
        count = data.get("count", 1)
        return cls(
            time=data["time"],
            type=kind,
            reason=str(data.get("reason", "")),
            kind=str(data.get("kind", "")),
            name=str(data.get("name", "")),
            message=str(data.get("message", "")),
            id=str(data.get("id", "")),
            count=count if isinstance(count, int) and count > 0 else 1,
            first_time=str(data.get("firstTime") or data["time"]),
        )


def _parse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line (power cut), or the cut-off start of a tail read
        if isinstance(event, dict):
            yield event


def collapse(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last line of each event id, in the order of those last lines.

    A folded event therefore sits where it was last seen, as in `kubectl get events`.
    Lines without an id (written before folding existed) are all kept.
    """
    latest: dict[object, dict[str, Any]] = {}
    for position, event in enumerate(events):
        key: object = event.get("id") or ("line", position)
        latest.pop(key, None)  # re-inserting moves it to the end
        latest[key] = event
    return list(latest.values())


class EventLog:
    """Append (folding repeats) and read the events file of one instance."""

    def __init__(
        self, path: Path, *, fold_window: float = FOLD_WINDOW, now: Now = _utc_now
    ) -> None:
        self.path = path
        self.fold_window = fold_window
        self._now = now
        self._lock = threading.Lock()
        self._folds: dict[FoldKey, Event] | None = None  # None: not seeded from the file yet

    @property
    def rotated_path(self) -> Path:
        """The previous generation of the file."""
        return self.path.with_name(self.path.name + ".1")

    # ------------------------------------------------------------------ writing

    def emit(self, *, type: EventType, reason: str, kind: str, name: str, message: str) -> Event:
        """Record one event, folded into an identical recent one; returns what was written."""
        with self._lock:
            now = self._now()
            stamp = _stamp(now)
            folds = self._fold_cache()
            fresh = Event(
                time=stamp, type=type, reason=reason, kind=kind, name=name, message=message
            )
            previous = folds.pop(fresh.fold_key, None)
            if previous is not None and self._within_window(previous, now):
                event = replace(previous, time=stamp, count=previous.count + 1)
            else:
                event = replace(fresh, id=secrets.token_hex(6), first_time=stamp)
            folds[event.fold_key] = event  # (re)inserted last: the newest identity
            self._forget_old(folds, now)
            self._append(event)
            return event

    def _within_window(self, previous: Event, now: datetime) -> bool:
        last = _parse_time(previous.time)
        # A clock stepped backwards makes the age negative: not "recent", start afresh.
        return last is not None and 0 <= (now - last).total_seconds() <= self.fold_window

    def _forget_old(self, folds: dict[FoldKey, Event], now: datetime) -> None:
        """Bound the cache: drop identities past the window, then the oldest beyond the cap."""
        while folds:
            oldest_key = next(iter(folds))
            oldest = folds[oldest_key]
            if len(folds) <= FOLD_CACHE_MAX and self._within_window(oldest, now):
                return
            del folds[oldest_key]

    def _fold_cache(self) -> dict[FoldKey, Event]:
        """The identities seen recently, seeded once from the tail of the current file."""
        if self._folds is None:
            self._folds = {}
            now = self._now()
            for data in collapse(_parse_lines(self._tail_lines())):
                event = Event.from_json(data)
                if event is not None and event.id and self._within_window(event, now):
                    self._folds.pop(event.fold_key, None)
                    self._folds[event.fold_key] = event
            self._forget_old(self._folds, now)
        return self._folds

    def _tail_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(size - _TAIL_BYTES, 0))
                data = handle.read()
        except FileNotFoundError:
            return []
        lines = data.decode("utf-8", errors="replace").splitlines()
        return lines[1:] if size > _TAIL_BYTES else lines  # the first may be cut off

    def _append(self, event: Event) -> None:
        line = json.dumps(event.to_json(), separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rotate_if_large()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # a torn last line (power cut): don't glue ours to it
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _rotate_if_large(self) -> None:
        try:
            if self.path.stat().st_size >= MAX_BYTES:
                os.replace(self.path, self.rotated_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ reading

    def read(self, *, since: str | None = None) -> Iterator[dict[str, Any]]:
        """Events oldest first (by when last seen), folded, optionally last seen from `since`."""
        lines: list[str] = []
        for path in (self.rotated_path, self.path):
            try:
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                continue
        for event in collapse(_parse_lines(lines)):
            if since is None or str(event.get("time", "")) >= since:
                yield event

    def follow(
        self,
        *,
        since: str | None = None,
        interval: float = 0.5,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[dict[str, Any]]:
        """`read(since=...)`, then every line appended later, until `stop()` is true.

        After the history, a folded repeat shows up again with its new `count` (an
        update, as `kubectl get events -w` shows it). Survives rotation: the open file is
        drained before the new one is opened, so no line is lost in between.
        """
        follower = _Follower(self.path)
        history = [*self._rotated_lines(follower), *follower.read_lines()]
        for event in collapse(_parse_lines(history)):
            if since is None or str(event.get("time", "")) >= since:
                yield event
        try:
            while not stop():
                time.sleep(interval)  # a user watching a terminal: polling is the point
                yield from _parse_lines(follower.read_lines())
        finally:
            follower.close()

    def _rotated_lines(self, follower: _Follower) -> list[str]:
        """The rotated file's lines, unless the follower's open file *is* that file."""
        try:
            st = self.rotated_path.stat()
        except FileNotFoundError:
            return []
        if follower.identity == (st.st_dev, st.st_ino):
            return []  # rotated between our open and this stat: read through the handle
        return self.rotated_path.read_text(encoding="utf-8", errors="replace").splitlines()


class _Follower:
    """Reads complete lines appended to a file, across rotations (rename + new file)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: Any = None  # binary file object, or None while the file is absent
        self._partial = b""
        self.identity: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._handle = open(self._path, "rb")  # noqa: SIM115 - kept open across polls
        except FileNotFoundError:
            self._handle, self.identity = None, None
            return
        st = os.fstat(self._handle.fileno())
        self.identity = (st.st_dev, st.st_ino)

    def read_lines(self) -> list[str]:
        """Lines completed since the last call."""
        lines: list[str] = []
        buffer = self._partial + self._drain()
        try:
            st = self._path.stat()
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current is not None and current != self.identity:
            # Rotated (or created): what the old file got before the rename is in our
            # handle; everything after went to the new file. A line the old file ends
            # without its newline was torn, and is dropped.
            buffer += self._drain()
            complete, _, _torn = buffer.rpartition(b"\n")
            lines += _decode_lines(complete)
            self.close()
            self._open()
            buffer = self._drain()
        complete, _, self._partial = buffer.rpartition(b"\n")
        return lines + _decode_lines(complete)

    def _drain(self) -> bytes:
        if self._handle is None:
            return b""
        data: bytes = self._handle.read()
        return data

    def close(self) -> None:
        """Close the open file, if any."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _decode_lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines() if data else []

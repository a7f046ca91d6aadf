"""The events log: folding of repeated events, rotation, reading and following.

Time is injected (`now=`), so windows are crossed without waiting.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.state import events as events_module
from reconciler.state.events import FOLD_WINDOW, EventLog

START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeNow:
    """A settable wall clock."""

    def __init__(self) -> None:
        self.value = START

    def __call__(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeNow:
    return FakeNow()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "events.jsonl"


def log_at(path: Path, clock: FakeNow) -> EventLog:
    return EventLog(path, now=clock)


def emit(log: EventLog, message: str = "drift: holder process is not running", **kw: Any) -> Any:
    fields: dict[str, Any] = {
        "type": "Normal",
        "reason": "DriftRepaired",
        "kind": "Environment",
        "name": "web",
        "message": message,
    }
    fields.update(kw)
    return log.emit(**fields)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_event_has_the_contract_keys_and_a_count(path: Path, clock: FakeNow) -> None:
    emit(log_at(path, clock))
    [event] = log_at(path, clock).read()
    assert event == {
        "time": "2026-01-02T03:04:05Z",
        "type": "Normal",
        "reason": "DriftRepaired",
        "kind": "Environment",
        "name": "web",
        "message": "drift: holder process is not running",
        "id": event["id"],
        "count": 1,
        "firstTime": "2026-01-02T03:04:05Z",
    }
    assert len(event["id"]) == 12


def test_identical_events_within_the_window_are_folded(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)
    first = emit(log)
    clock.advance(30)
    emit(log)
    clock.advance(FOLD_WINDOW)  # measured from the LAST occurrence: still the same event
    third = emit(log)
    assert third.id == first.id
    [event] = log.read()
    assert event["count"] == 3
    assert event["firstTime"] == "2026-01-02T03:04:05Z"
    assert event["time"] == third.time == "2026-01-02T03:14:35Z"
    # Append-only: three lines on disk, one event to a reader.
    assert [line["count"] for line in lines(path)] == [1, 2, 3]


def test_a_repeat_after_the_window_is_a_new_event(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)
    emit(log)
    clock.advance(FOLD_WINDOW + 1)
    emit(log)
    read = list(log.read())
    assert [e["count"] for e in read] == [1, 1]
    assert read[0]["id"] != read[1]["id"]


@pytest.mark.parametrize(
    "change",
    [
        {"message": "drift: eth0 is down"},
        {"reason": "Updated"},
        {"type": "Warning"},
        {"kind": "Network"},
        {"name": "api"},
    ],
)
def test_events_differing_in_any_identity_field_are_not_folded(
    path: Path, clock: FakeNow, change: dict[str, str]
) -> None:
    log = log_at(path, clock)
    emit(log)
    emit(log, **change)
    assert [e["count"] for e in log.read()] == [1, 1]


def test_a_folded_event_moves_to_where_it_was_last_seen(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)
    emit(log, "a")
    clock.advance(1)
    emit(log, "b")
    clock.advance(1)
    emit(log, "a")
    assert [(e["message"], e["count"]) for e in log.read()] == [("b", 1), ("a", 2)]


def test_since_filters_on_when_an_event_was_last_seen(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)
    emit(log, "old, seen again")
    emit(log, "old")
    clock.advance(300)
    emit(log, "old, seen again")
    since = (START + timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [(e["message"], e["count"]) for e in log.read(since=since)] == [("old, seen again", 2)]


def test_a_new_process_folds_into_what_the_previous_one_wrote(path: Path, clock: FakeNow) -> None:
    first = emit(log_at(path, clock))
    clock.advance(60)
    again = emit(log_at(path, clock))  # a restarted controller, or the next `apply`
    assert again.id == first.id and again.count == 2
    clock.advance(FOLD_WINDOW + 1)
    assert emit(log_at(path, clock)).count == 1  # too old to fold into


def test_lines_without_an_id_and_torn_lines_are_tolerated(path: Path, clock: FakeNow) -> None:
    path.parent.mkdir(parents=True)
    legacy = {
        "time": "2026-01-02T03:00:00Z",
        "type": "Normal",
        "reason": "Created",
        "kind": "Environment",
        "name": "web",
        "message": "created",
    }
    path.write_text(json.dumps(legacy) + "\n" + json.dumps(legacy) + "\n" + '{"time": "20')
    log = log_at(path, clock)
    assert list(log.read()) == [legacy, legacy]
    # The torn tail is not glued to the next line by a later append of ours.
    emit(log)
    assert [e["reason"] for e in log.read()] == ["Created", "Created", "DriftRepaired"]


def test_rotation_bounds_the_file_and_folding_survives_it(
    path: Path, clock: FakeNow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "MAX_BYTES", 2000)
    log = log_at(path, clock)
    first = emit(log, "repeated")
    for n in range(40):
        emit(log, f"filler {n}")
    emit(log, "repeated")
    assert path.stat().st_size < 2000 + 400
    assert log.rotated_path.exists()
    read = list(log.read())
    repeated = [e for e in read if e["message"] == "repeated"]
    assert len(repeated) == 1 and repeated[0]["count"] == 2 and repeated[0]["id"] == first.id
    assert read[-1]["message"] == "repeated"


def test_the_fold_cache_is_bounded(
    path: Path, clock: FakeNow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "FOLD_CACHE_MAX", 3)
    log = log_at(path, clock)
    for n in range(10):
        emit(log, f"m{n}")
    assert len(log._folds or {}) == 3
    # The oldest identities were forgotten: a repeat of one is a new event.
    assert emit(log, "m0").count == 1
    assert emit(log, "m9").count == 2


def _follow(
    log: EventLog, *, polls: int, on_poll: Callable[[int], None] = lambda n: None
) -> Iterator[dict[str, Any]]:
    """`log.follow()` for `polls` polls; `on_poll(n)` runs before poll n (writes events)."""
    count = [0]

    def stop() -> bool:
        count[0] += 1
        if count[0] > polls:
            return True
        on_poll(count[0])
        return False

    return log.follow(interval=0, stop=stop)


def test_follow_prints_history_then_new_lines_and_fold_updates(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)
    emit(log, "a")
    emit(log, "b")
    emit(log, "a")

    def write(poll: int) -> None:
        if poll == 2:
            emit(log, "c")
            emit(log, "a")

    seen = [(e["message"], e["count"]) for e in _follow(log, polls=4, on_poll=write)]
    assert seen == [("b", 1), ("a", 2), ("c", 1), ("a", 3)]


def test_follow_survives_rotation(
    path: Path, clock: FakeNow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "MAX_BYTES", 1000)
    log = log_at(path, clock)
    emit(log, "line 0")

    def write(poll: int) -> None:
        for n in range(3):  # less than a file's worth between two polls
            emit(log, f"line {poll * 3 + n - 2}")

    seen = [e["message"] for e in _follow(log, polls=10, on_poll=write)]
    assert log.rotated_path.exists()
    assert seen == [f"line {n}" for n in range(31)], "every line, once, in order"


def test_follow_waits_for_a_log_that_does_not_exist_yet(path: Path, clock: FakeNow) -> None:
    log = log_at(path, clock)

    def write(poll: int) -> None:
        if poll == 2:
            emit(log, "born later")

    assert [e["message"] for e in _follow(log, polls=3, on_poll=write)] == ["born later"]

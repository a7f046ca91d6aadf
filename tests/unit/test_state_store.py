"""The state store: atomic, backed-up, never-repairing writes of the state file.

Files are checked on disk (modes, inodes, bytes) independently of `load()`. Crashes are
simulated by raising from `os` functions at each step of `save`; an exception that is not
an `OSError` skips every cleanup the store would do, as a killed process would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.errors import StateError
from reconciler.state.model import (
    HISTORY_LIMIT,
    STATE_VERSION,
    EnvironmentRecord,
    StateDocument,
)
from reconciler.state.store import SaveResult, StateCorruptError, StateStore

INSTANCE = "rtstore"


def read_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_bytes())
    return result


def kernel_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def env(labels: dict[str, str] | None = None) -> EnvironmentRecord:
    return EnvironmentRecord(spec={}, spec_hash="h", netns="reconciler-web", labels=labels or {})


def with_allocation(doc: StateDocument, address: str) -> StateDocument:
    """A copy of `doc` with the one allocation that tells test versions apart."""
    changed = doc.model_copy(deep=True)
    changed.allocations = {"devnet": {"web": address}}
    return changed


def save(store: StateStore, doc: StateDocument, summary: str = "test") -> StateDocument:
    with store.lock():
        return store.save(doc, summary=summary)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file in `directory` but the lock: content, inode and mtime, to prove nothing
    was touched (the lock file is rewritten by every acquire, by design)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.name != "lock"
    }


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state", INSTANCE)


@pytest.fixture
def two_versions(store: StateStore) -> tuple[StateDocument, StateDocument]:
    """Two saves: the first is now the backup, the second the state file."""
    first = save(store, with_allocation(StateDocument(), "10.213.0.10"))
    second = save(store, with_allocation(first, "10.213.0.11"))
    return first, second


# -- layout and bookkeeping ------------------------------------------------------------


def test_nothing_written_loads_as_none(store: StateStore) -> None:
    assert not store.exists()
    assert store.load() is None
    assert not store.dir.exists()  # loading creates nothing


def test_first_save_layout_modes_and_bookkeeping(store: StateStore) -> None:
    written = save(store, with_allocation(StateDocument(), "10.213.0.10"), "created web")
    assert store.path == store.dir / "state.json"
    assert store.backup_path == store.dir / "state.json.bak"
    assert os.stat(store.dir).st_mode & 0o777 == 0o700
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(store.lock_path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in store.dir.iterdir()) == ["lock", "state.json"]

    on_disk = read_json(store.path)
    assert on_disk["serial"] == written.serial == 1
    assert on_disk["version"] == STATE_VERSION
    assert on_disk["instance"] == INSTANCE
    assert on_disk["bootId"] == kernel_boot_id()
    assert re.fullmatch(r"[0-9a-f-]{36}", on_disk["lineage"])
    assert on_disk["allocations"] == {"devnet": {"web": "10.213.0.10"}}
    assert [(h["serial"], h["summary"]) for h in on_disk["history"]] == [(1, "created web")]
    assert store.load() == written


def test_serial_increments_lineage_stays_backup_holds_previous(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    first, second = two_versions
    assert (first.serial, second.serial) == (1, 2)
    assert second.lineage == first.lineage
    backup = read_json(store.backup_path)
    assert backup["serial"] == 1
    assert backup["allocations"] == {"devnet": {"web": "10.213.0.10"}}
    assert os.stat(store.backup_path).st_mode & 0o777 == 0o600
    assert os.stat(store.backup_path).st_ino != os.stat(store.path).st_ino
    third = save(store, second)
    assert third.serial == 3
    assert read_json(store.backup_path)["serial"] == 2


def test_save_returns_what_load_returns_and_shares_nothing_with_its_input(
    store: StateStore,
) -> None:
    doc = StateDocument(environments={"web": env({"team": "pay"})})
    written = save(store, doc)
    assert written == store.load()
    assert written.environments["web"] is not doc.environments["web"]
    written.environments["web"].labels["team"] = "changed"
    assert doc.environments["web"].labels == {"team": "pay"}
    assert doc.serial == 0 and doc.history == []  # the input is not the written copy


def test_clone_is_equal_and_shares_nothing() -> None:
    doc = StateDocument(
        environments={"web": env({"team": "pay"})}, allocations={"devnet": {"web": "10.0.0.2"}}
    )
    copy = doc.clone()
    assert copy == doc
    copy.environments["web"].labels["team"] = "other"
    copy.allocations["devnet"]["web"] = "10.0.0.3"
    assert doc.environments["web"].labels == {"team": "pay"}
    assert doc.allocations == {"devnet": {"web": "10.0.0.2"}}


@pytest.mark.parametrize(
    "edit",
    [
        {},  # the common case: pydantic's JSON parser reads it directly
        {"version": "1"},  # lax types, as json.loads + model_validate always accepted them
        {"serial": 2.0},
        {"environments": {"web": {"spec": {}, "specHash": "h", "netns": "n", "extra": 1}}},
    ],
)
def test_loading_reads_what_the_careful_parser_reads(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument], edit: dict[str, Any]
) -> None:
    raw = read_json(store.path) | edit
    store.path.write_text(json.dumps(raw, indent=1))
    assert store.load() == StateDocument.model_validate(raw)


def test_history_is_bounded(store: StateStore) -> None:
    doc = StateDocument()
    for _ in range(HISTORY_LIMIT + 5):
        doc = save(store, doc, "tick\nwith a newline")
    history = read_json(store.path)["history"]
    assert len(history) == HISTORY_LIMIT
    assert history[-1]["serial"] == HISTORY_LIMIT + 5
    assert history[0]["serial"] == 6
    assert history[-1]["summary"] == "tick with a newline"


def test_save_requires_the_lock(store: StateStore) -> None:
    with pytest.raises(RuntimeError, match="lock"):
        store.save(StateDocument(), summary="x")
    store.lock()  # configured but not acquired
    with pytest.raises(RuntimeError, match="lock"):
        store.save(StateDocument(), summary="x")
    assert not store.exists()


def test_lock_twice_while_held_is_a_programming_error(store: StateStore) -> None:
    with store.lock(), pytest.raises(RuntimeError):
        store.lock()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_instance_name_cannot_escape_the_state_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(StateError, match="invalid instance name"):
        StateStore(tmp_path, name)


# -- refusing to overwrite what was not loaded -----------------------------------------


def test_stale_document_is_refused(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    first, _ = two_versions
    before = snapshot(store.dir)
    with pytest.raises(StateError, match=r"serial 2 on disk, 1 in memory"):
        save(store, first)
    assert snapshot(store.dir) == before


def test_other_lineage_is_refused(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    _, second = two_versions
    foreign = second.model_copy(update={"lineage": "someone-else"})
    with pytest.raises(StateError, match="lineage"):
        save(store, foreign)
    with pytest.raises(StateError, match="lineage"):
        save(store, StateDocument())  # a blank document must not replace a history


# -- loading what is not ours, or not readable -----------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"version": 1, "serial": ', "invalid JSON at line 1"),
        (b"", "empty file"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"version": 1, "serial": "many"}', "serial: "),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_corrupt_file_is_reported_and_left_untouched(
    store: StateStore,
    two_versions: tuple[StateDocument, StateDocument],
    content: bytes,
    reason: str,
) -> None:
    store.path.write_bytes(content)
    before = snapshot(store.dir)
    with pytest.raises(StateCorruptError) as raised:
        store.load()
    message = str(raised.value)
    assert isinstance(raised.value, StateError)
    assert reason in message
    assert str(store.path) in message
    assert str(store.backup_path) in message
    assert "is intact" in message
    assert "reconciler run --recover" in message
    assert "\n" not in message
    assert snapshot(store.dir) == before


def test_corrupt_file_without_usable_backup_says_so(store: StateStore) -> None:
    save(store, StateDocument())
    store.path.write_text("{")
    with pytest.raises(StateCorruptError, match="no usable backup") as raised:
        store.load()
    assert "reconciler run --recover" in str(raised.value)


def test_corrupt_file_blocks_save_and_survives_it(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    _, second = two_versions
    store.path.write_text("{")
    before = snapshot(store.dir)
    with pytest.raises(StateCorruptError):
        save(store, second)
    assert snapshot(store.dir) == before


def test_recover_sets_the_corrupt_file_aside_and_keeps_the_backup(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    store.path.write_text("{")
    backup_before = store.backup_path.read_bytes()
    with store.lock():
        written = store.save(
            with_allocation(StateDocument(), "10.213.0.11"),
            summary="recovered from live objects",
            replace_corrupt=True,
        )
    assert store.load() == written
    assert store.backup_path.read_bytes() == backup_before
    (aside,) = store.dir.glob("state.json.corrupt-*")
    assert aside.read_text() == "{"


def test_newer_version_is_refused_not_treated_as_corrupt(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    raw = read_json(store.path)
    raw["version"] = STATE_VERSION + 1
    raw["fieldFromTheFuture"] = {"x": 1}
    store.path.write_text(json.dumps(raw))
    before = snapshot(store.dir)
    with pytest.raises(StateError, match=r"newer reconciler \(state version 2") as raised:
        store.load()
    assert not isinstance(raised.value, StateCorruptError)
    assert str(store.path) in str(raised.value)
    with store.lock(), pytest.raises(StateError, match="newer reconciler"):
        store.save(StateDocument(), summary="x", replace_corrupt=True)
    after = snapshot(store.dir)
    assert after["state.json"] == before["state.json"]


def test_other_instances_file_is_refused(
    tmp_path: Path, store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    other = StateStore(tmp_path / "state", "other")
    other.dir.mkdir()
    other.path.write_bytes(store.path.read_bytes())
    with pytest.raises(StateError, match=f'belongs to instance "{INSTANCE}", not "other"'):
        other.load()


def test_missing_state_with_backup_present_is_not_an_empty_inventory(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    store.path.unlink()
    with pytest.raises(StateCorruptError, match="missing but its backup") as raised:
        store.load()
    assert str(store.backup_path) in str(raised.value)


# -- no-op writes ----------------------------------------------------------------------


def test_save_if_changed_writes_nothing_for_a_no_op(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    loaded = store.load()
    assert loaded is not None
    before = snapshot(store.dir)
    same = loaded.model_copy(deep=True)
    same.boot_id = "another-boot"  # bookkeeping only: not a change
    with store.lock():
        result = store.save_if_changed(same, previous=loaded, summary="resync")
    assert result == SaveResult(wrote=False, document=same)
    assert snapshot(store.dir) == before

    changed = with_allocation(loaded, "10.213.0.12")
    with store.lock():
        result = store.save_if_changed(changed, previous=loaded, summary="moved web")
    assert result.wrote
    assert result.document.serial == 3
    assert read_json(store.path)["allocations"] == {"devnet": {"web": "10.213.0.12"}}


def test_save_if_changed_sees_a_change_deep_inside_a_record(
    store: StateStore, two_versions: tuple[StateDocument, StateDocument]
) -> None:
    _, second = two_versions
    with store.lock():
        base = store.save(second.model_copy(update={"environments": {"web": env()}}), summary="x")
    changed = base.model_copy(deep=True)
    changed.environments["web"].labels["team"] = "pay"
    with store.lock():
        result = store.save_if_changed(changed, previous=base, summary="labels")
    assert result.wrote
    assert read_json(store.path)["environments"]["web"]["labels"] == {"team": "pay"}


def test_save_if_changed_writes_a_first_document(store: StateStore) -> None:
    with store.lock():
        result = store.save_if_changed(StateDocument(), previous=None, summary="init")
    assert result.wrote
    assert store.exists()


# -- backup without hard links ---------------------------------------------------------


def test_backup_is_copied_where_links_are_not_supported(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save(store, with_allocation(StateDocument(), "10.213.0.10"))

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save(store, with_allocation(first, "10.213.0.11"))
    assert read_json(store.backup_path)["serial"] == 1
    assert os.stat(store.backup_path).st_mode & 0o777 == 0o600


def test_write_error_is_one_clear_line_and_leaves_no_temp_files(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save(store, with_allocation(StateDocument(), "10.213.0.10"))
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with store.lock():
        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(StateError, match="No space left on device") as raised:
            store.save(with_allocation(first, "10.213.0.11"), summary="x")
        monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(store.path) in str(raised.value)
    assert sorted(p.name for p in store.dir.iterdir()) == ["lock", "state.json"]
    assert store.load() == first


# -- crash at every step ---------------------------------------------------------------


class Crash(BaseException):
    """A simulated kill: not an OSError, so the store's own cleanup does not run."""


CRASHABLE = ("open", "write", "fsync", "fchmod", "link", "replace", "close")


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """`crash_at(k)` makes the k-th call (from 0) to a file-system step raise `Crash`.

    A `write` that crashes writes half of its data first, like a kill mid-write.
    """
    originals = {name: getattr(os, name) for name in CRASHABLE}
    plan = {"at": -1, "count": 0}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def step(*args: Any, **kwargs: Any) -> Any:
            if plan["at"] < 0:
                return original(*args, **kwargs)
            k = plan["count"]
            plan["count"] += 1
            if k == plan["at"]:
                plan["at"] = -1  # disarm: the "dead process" runs no more steps
                if name == "write":
                    fd, data = args
                    originals["write"](fd, bytes(data[: len(data) // 2]))
                raise Crash(f"crash at step {k}: os.{name}")
            return original(*args, **kwargs)

        return step

    for name in CRASHABLE:
        monkeypatch.setattr(os, name, wrap(name))

    def arm(k: int) -> None:
        plan["at"], plan["count"] = k, 0

    yield arm
    plan["at"] = -1


def test_crash_at_any_step_leaves_old_or_new(
    tmp_path: Path, crash_at: Callable[[int], None]
) -> None:
    outcomes: list[str] = []
    for k in range(100):
        directory = tmp_path / f"k{k}"
        store = StateStore(directory, INSTANCE)
        old = save(store, with_allocation(StateDocument(), "10.213.0.10"))
        save(store, with_allocation(old, "10.213.0.11"))  # so a backup exists as well
        current = store.load()
        assert current is not None
        new = with_allocation(current, "10.213.0.12")
        lock = store.lock()
        lock.acquire()
        crash_at(k)
        try:
            store.save(new, summary="crash test")
        except Crash:
            crashed = True
        else:
            crashed = False
        finally:
            crash_at(-1)
            lock.release()

        # The restarted process: a fresh store must load old or new, never fail.
        restarted = StateStore(directory, INSTANCE)
        loaded = restarted.load()
        assert loaded is not None
        address = loaded.allocations["devnet"]["web"]
        assert address in ("10.213.0.11", "10.213.0.12"), f"step {k}"
        backup = read_json(restarted.backup_path)  # the backup is always readable too
        assert backup["allocations"]["devnet"]["web"] in ("10.213.0.10", "10.213.0.11")
        outcomes.append("new" if address == "10.213.0.12" else "old")

        # ... and its next save works and clears the debris of the crash.
        again = save(restarted, with_allocation(loaded, "10.213.0.13"))
        assert restarted.load() == again
        assert sorted(p.name for p in directory.joinpath(INSTANCE).iterdir()) == [
            "lock",
            "state.json",
            "state.json.bak",
        ]
        if not crashed:
            break
    else:
        pytest.fail("save never completed")
    assert len(outcomes) >= 8, outcomes  # every step of the protocol was crashed once
    assert outcomes[0] == "old"
    assert outcomes[-1] == "new"


def test_crash_during_the_first_save_leaves_nothing_or_the_new_document(
    tmp_path: Path, crash_at: Callable[[int], None]
) -> None:
    for k in range(100):
        store = StateStore(tmp_path / f"k{k}", INSTANCE)
        lock = store.lock()
        lock.acquire()
        crash_at(k)
        try:
            store.save(with_allocation(StateDocument(), "10.213.0.10"), summary="first")
        except Crash:
            crashed = True
        else:
            crashed = False
        finally:
            crash_at(-1)
            lock.release()
        loaded = StateStore(tmp_path / f"k{k}", INSTANCE).load()
        assert loaded is None or loaded.allocations == {"devnet": {"web": "10.213.0.10"}}
        if not crashed:
            break
    else:
        pytest.fail("save never completed")


# -- round trip ------------------------------------------------------------------------

dns_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
label_key = st.one_of(dns_label, st.builds(lambda p, n: f"{p}.io/{n}", dns_label, dns_label))
addresses = st.ip_addresses(v=4).map(str)


@settings(max_examples=60, deadline=None)
@given(
    allocations=st.dictionaries(dns_label, st.dictionaries(dns_label, addresses, max_size=5)),
    labels=st.dictionaries(label_key, st.text(max_size=30), max_size=8),
)
def test_save_load_round_trips_allocations_and_labels(
    allocations: dict[str, dict[str, str]], labels: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(Path(directory), INSTANCE)
        doc = StateDocument(allocations=allocations, environments={"web": env(labels)})
        written = save(store, doc)
        loaded = store.load()
        assert loaded == written
        assert loaded is not None
        assert list(loaded.allocations.items()) == list(allocations.items())
        assert list(loaded.environments["web"].labels.items()) == list(labels.items())

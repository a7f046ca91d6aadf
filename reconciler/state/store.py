"""The state store: reading and writing one instance's state file without ever losing it.

Layout, all under `<state-dir>/<instance>/` (directory mode 0700, files 0600):

- `state.json`: the current `StateDocument` (see `reconciler.state.model`).
- `state.json.bak`: the version before it.
- `lock`: the instance lock (`reconciler.state.lock`); writers hold it.
- `state.json.corrupt-<time>-<id>`: a corrupt state file set aside by `save(replace_corrupt=True)`.

A write never modifies a file in place (Terraform did, and users lost state on Ctrl-C):

1. the new document goes to a temp file in the same directory, created O_EXCL, and is
   fsync'd;
2. `state.json.bak` is replaced by a hard link to the current `state.json` (a copy where
   the filesystem cannot link) - the current inode is never written again, so linking it
   is as good as copying it;
3. the temp file is renamed over `state.json`;
4. the directory is fsync'd, so the renames survive a power cut.

A crash at any instant therefore leaves `state.json` holding the old document or the new
one, never a mix, and never no file once the first write finished. Temp files a crash
leaves behind are removed by the next write, under the lock.

Every write bumps `serial` and keeps `lineage`; a document whose serial or lineage does not
match the file on disk was not loaded from it (or someone wrote without the lock), and is
refused rather than allowed to overwrite newer state.

Loading never repairs anything: a corrupt file and its backup are left exactly as they
are, and the error says where the backup is and that `reconciler run --recover` rebuilds
the state from live objects.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reconciler.errors import StateError
from reconciler.state.lock import InstanceLock
from reconciler.state.model import HISTORY_LIMIT, STATE_VERSION, HistoryEntry, StateDocument
from reconciler.state.procinfo import boot_id

STATE_FILE = "state.json"
BACKUP_FILE = "state.json.bak"
LOCK_FILE = "lock"
_TEMP_PREFIX = ".state.json.tmp-"
_BACKUP_TEMP_PREFIX = ".state.json.bak.tmp-"
_RECOVER_HINT = "rebuild it from live objects with `reconciler run --recover`"
# Where the filesystem cannot hard-link, the backup is written as a copy instead.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})
# Fields that change on every write without the content changing.
_BOOKKEEPING_FIELDS = frozenset({"serial", "history", "boot_id"})


class StateCorruptError(StateError):
    """The state file cannot be read as a state document (as opposed to: too new, foreign).

    `run --recover` may replace such a file; it must never replace one of a newer version
    or of another instance.
    """

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SaveResult:
    """What `save_if_changed` did: `wrote` is False for a no-op; `document` is current."""

    wrote: bool
    document: StateDocument


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _content(doc: StateDocument) -> dict[str, Any]:
    return doc.model_dump(mode="json", exclude=set(_BOOKKEEPING_FIELDS))


def _same_content(doc: StateDocument, previous: StateDocument) -> bool:
    """True when the two documents differ at most in serial, history and boot id."""
    blank = {"serial": 0, "history": [], "boot_id": ""}
    # Model equality first: ~1 ms at 200 environments, where dumping both takes ~20.
    # Equal values always dump equal; the dump still decides when they are not equal,
    # since values can differ and dump the same (a tuple and a list).
    if doc.model_copy(update=blank) == previous.model_copy(update=blank):
        return True
    return _content(doc) == _content(previous)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (must not exist), write `data`, fsync. Mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """One instance's state file under `state_dir`: load, atomic save, lock, backup."""

    def __init__(self, state_dir: Path, instance: str) -> None:
        if not instance or instance in (".", "..") or "/" in instance or "\0" in instance:
            raise StateError(
                f"invalid instance name {instance!r}: it names a directory under "
                f"{state_dir}, so it must not be empty, '.', '..' or contain '/'"
            )
        self.instance = instance
        self.dir = Path(state_dir) / instance
        self._lock: InstanceLock | None = None

    @property
    def path(self) -> Path:
        """The state file."""
        return self.dir / STATE_FILE

    @property
    def backup_path(self) -> Path:
        """The previous version of the state file."""
        return self.dir / BACKUP_FILE

    @property
    def lock_path(self) -> Path:
        """The instance lock file."""
        return self.dir / LOCK_FILE

    def lock(self, *, wait: float = 0.0, command: str | None = None) -> InstanceLock:
        """A new (not yet acquired) lock for this instance; `save` requires it to be held."""
        if self._lock is not None and self._lock.held:
            raise RuntimeError(f"{self.lock_path}: this store already holds its lock")
        self._ensure_dir()
        self._lock = InstanceLock(
            self.lock_path, instance=self.instance, command=command, wait=wait
        )
        return self._lock

    def exists(self) -> bool:
        """True if the state file exists (whether or not it is readable)."""
        return self.path.exists()

    # -- load --------------------------------------------------------------------------

    def load(self) -> StateDocument | None:
        """The current document, or None if nothing was ever written.

        Raises `StateCorruptError` for an unreadable file and `StateError` for one written
        by a newer reconciler or for another instance. Touches no file.
        """
        data = self._read(self.path)
        if data is None:
            if self.backup_path.exists():
                # Our writes never remove state.json, so this is outside interference;
                # "nothing recorded" would make us forget everything we own.
                raise StateCorruptError(
                    f"state file {self.path} is missing but its backup {self.backup_path} "
                    f"exists; restore it with `cp -p {self.backup_path} {self.path}`, "
                    f"or {_RECOVER_HINT}",
                    path=self.path,
                    reason="missing",
                )
            return None
        return self._parse(data, self.path)

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(
                f"cannot read state file {path}: {e.strerror}; "
                "check its permissions (the reconciler runs as root)"
            ) from e

    def _parse(self, data: bytes, path: Path) -> StateDocument:
        try:
            doc = self._decode(data)
        except _Unreadable as e:
            raise StateCorruptError(
                self._corrupt_message(e.reason), path=path, reason=e.reason
            ) from None
        if doc.instance != self.instance:
            raise StateError(
                f'state file {path} belongs to instance "{doc.instance}", not '
                f'"{self.instance}"; use --instance {doc.instance or "NAME"} or another '
                "--state-dir"
            )
        return doc

    def _decode(self, data: bytes) -> StateDocument:
        """Bytes to document; `_Unreadable` with a few-word reason, `StateError` if too new."""
        try:
            # Decode here: json.loads(bytes) would guess UTF-16/32 from the first bytes.
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable("not UTF-8 text") from None
        if not text.strip():
            raise _Unreadable("empty file")
        # pydantic's own JSON parser validates 200 environments in ~4 ms, where json.loads
        # plus model_validate take ~25. Anything unusual (invalid, a version we do not
        # read) takes the careful path below, which words the error exactly.
        with contextlib.suppress(ValueError):  # pydantic's ValidationError is a ValueError
            fast = StateDocument.model_validate_json(text)
            if 1 <= fast.version <= STATE_VERSION:
                return fast
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Unreadable(f"invalid JSON at line {e.lineno} column {e.colno}") from None
        if not isinstance(raw, dict):
            raise _Unreadable("not a JSON object")
        version = raw.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            if version > STATE_VERSION:
                raise StateError(
                    f"state file {self.path} was written by a newer reconciler (state "
                    f"version {version}; this one reads up to {STATE_VERSION}); upgrade "
                    "reconciler to use this instance"
                )
            if version < 1:
                raise _Unreadable(f"unknown version {version}")
        try:
            return StateDocument.model_validate(raw)
        except ValidationError as e:
            errors = e.errors()
            first = errors[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
            raise _Unreadable(f"{where}: {first['msg']}{more}") from None

    def _corrupt_message(self, reason: str) -> str:
        head = f"state file {self.path} is corrupt ({reason}); it was left untouched"
        if self._backup_usable():
            return (
                f"{head}. The previous version {self.backup_path} is intact: restore it with "
                f"`cp -p {self.backup_path} {self.path}`, or {_RECOVER_HINT}"
            )
        return f"{head} and there is no usable backup at {self.backup_path}; {_RECOVER_HINT}"

    def _backup_usable(self) -> bool:
        try:
            data = self.backup_path.read_bytes()
            return self._decode(data).instance == self.instance
        except (OSError, StateError, _Unreadable):
            return False

    # -- save --------------------------------------------------------------------------

    def save(
        self, doc: StateDocument, *, summary: str, replace_corrupt: bool = False
    ) -> StateDocument:
        """Write `doc` atomically and return the written copy (serial + 1, history entry).

        The caller must hold this store's lock (`lock()`). `doc` must have been loaded from
        (or returned by the last save of) the file on disk: same lineage and serial.
        `replace_corrupt=True` (for `run --recover`) sets a corrupt file aside as
        `state.json.corrupt-<time>` instead of refusing; the backup is kept as it is.
        """
        if self._lock is None or not self._lock.held:
            raise RuntimeError(f"{self.path}: save() without holding the instance lock")
        try:
            self._ensure_dir()
            self._remove_temp_files()
            current_bytes = self._read(self.path)
            current = self._current(current_bytes, replace_corrupt=replace_corrupt)
            payload = self._next_document(doc, current=current, summary=summary)
            self._write(payload, current=current_bytes, corrupt=current is None)
        except OSError as e:
            self._remove_temp_files()
            raise StateError(
                f"cannot write state file {self.path}: {e.strerror}; check free space and "
                f"permissions of {self.dir}"
            ) from e
        # The copy handed back is parsed from the bytes just written: what `load()` would
        # return, independent of `doc`, and far cheaper than a deep copy (~5 ms at 200
        # environments against ~90).
        return StateDocument.model_validate_json(payload)

    def save_if_changed(
        self, doc: StateDocument, *, previous: StateDocument | None, summary: str
    ) -> SaveResult:
        """`save` only if `doc` differs from `previous` beyond serial, history and boot id.

        A reconcile that changed nothing writes nothing (no fsync, no serial bump).
        """
        if previous is not None and _same_content(doc, previous):
            return SaveResult(wrote=False, document=doc)
        return SaveResult(wrote=True, document=self.save(doc, summary=summary))

    def _current(self, data: bytes | None, *, replace_corrupt: bool) -> StateDocument | None:
        """The document on disk, None if absent (or corrupt and we may replace it)."""
        if data is None:
            return None
        try:
            return self._parse(data, self.path)
        except StateCorruptError:
            if replace_corrupt:
                return None
            raise

    def _next_document(
        self, doc: StateDocument, *, current: StateDocument | None, summary: str
    ) -> bytes:
        """The file content for `doc` as the next version of `current` (checked first)."""
        if current is not None:
            if doc.lineage != current.lineage:
                raise StateError(
                    f"refusing to overwrite state file {self.path}: it has lineage "
                    f"{current.lineage!r} but the document to write has {doc.lineage!r}, so "
                    "it was not loaded from this file; reload the state and retry"
                )
            if doc.serial != current.serial:
                raise StateError(
                    f"refusing to overwrite state file {self.path}: it changed since it was "
                    f"loaded (serial {current.serial} on disk, {doc.serial} in memory); "
                    "another process wrote it without the lock; reload the state and retry"
                )
        serial = (current.serial if current is not None else doc.serial) + 1
        entry = HistoryEntry(serial=serial, time=_now_rfc3339(), summary=" ".join(summary.split()))
        # A shallow copy is enough: only top-level fields change, and it is serialised
        # at once, never handed out.
        written = doc.model_copy(
            update={
                "version": STATE_VERSION,
                "lineage": doc.lineage or str(uuid.uuid4()),
                "serial": serial,
                "instance": self.instance,
                "boot_id": boot_id(),
                "history": [*doc.history, entry][-HISTORY_LIMIT:],
            }
        )
        return written.to_json().encode() + b"\n"

    def _write(self, data: bytes, *, current: bytes | None, corrupt: bool) -> None:
        """Steps 1-4 of the module docstring.

        `current` is the content of the file on disk (None: there is none); `corrupt` says
        it is unreadable, so it is set aside rather than rotated into the backup, which
        may well hold the last good version.
        """
        temp = self._temp_path(_TEMP_PREFIX)
        _write_new_file(temp, data)
        if current is not None and not corrupt:
            # After a crash between the two renames, the backup *is* state.json (one inode,
            # two names). Then it already holds the current version, and renaming a link
            # over another link of the same inode is a silent no-op that would leave the
            # temp name behind.
            if not _same_inode(self.path, self.backup_path):
                backup_temp = self._temp_path(_BACKUP_TEMP_PREFIX)
                self._link_or_copy(self.path, backup_temp, current)
                os.replace(backup_temp, self.backup_path)
        elif current is not None:
            aside = self.dir / f"{STATE_FILE}.corrupt-{_stamp()}-{secrets.token_hex(2)}"
            self._link_or_copy(self.path, aside, current)
        os.replace(temp, self.path)
        # One directory fsync covers both renames: if only the backup rename is lost in a
        # power cut, state.json is still whole and the backup is one version older.
        _fsync_dir(self.dir)

    def _link_or_copy(self, source: Path, target: Path, content: bytes) -> None:
        """Hard-link `source` as `target`; where links are unsupported, write `content`."""
        try:
            os.link(source, target)
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            _write_new_file(target, content)

    def _temp_path(self, prefix: str) -> Path:
        return self.dir / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"

    def _remove_temp_files(self) -> None:
        """Remove temp files of interrupted writes; safe because writers hold the lock."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith((_TEMP_PREFIX, _BACKUP_TEMP_PREFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def _ensure_dir(self) -> None:
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.dir.mkdir(mode=0o700)
            except FileExistsError:
                return
            os.chmod(self.dir, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise StateError(
                f"cannot create state directory {self.dir}: {e.strerror}; "
                "choose a writable --state-dir"
            ) from e


class _Unreadable(Exception):
    """Internal: the bytes are not a state document; `reason` is a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

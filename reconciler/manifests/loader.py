"""Load manifests from files, keeping the `file:line` of every key for error messages.

YAML is composed into nodes (which carry their position) and converted to plain data by
hand, recording the line of each key under its path (`("spec", "resources", "memory")`).
A pydantic error's `loc` is then mapped back to the nearest recorded line, so every error
reads `manifests/web.yaml:12: Environment/web: spec.resources.memory: ...`.

Two parsers, one behaviour. PyYAML's pure-Python parser is the reference: its error
messages and marks are what users see, and what it accepts is what a manifest may say.
It is also ten times slower than libyaml (200 files: ~200 ms against ~20 ms), so the
common path composes with libyaml (`yaml.CSafeLoader`, whose nodes carry the same line
marks) and falls back to the reference parser (a) to word and locate every syntax error
exactly as it always has, and (b) for text holding the few constructs on which the two
disagree (`_PURE_ONLY`: tabs, tags, `?`, a byte-order mark past the start, a comment glued
to a block scalar header). tests/unit/test_loader.py checks the two paths give the same
result. Two deliberate differences, both refusals that gained a line: an escape beyond
U+10FFFF, where the reference parser fails without a position, reports libyaml's located
error; a document nested a few hundred levels deep, which exhausts the reference parser's
recursion, is refused by `MAX_DEPTH` at its line.

A file that fails does not stop the others: the result lists the valid manifests, the
errors, and what each failed file declared as far as it could be read, so that the
engine never prunes what a broken file used to declare.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from reconciler.manifests.models import API_VERSION, KINDS, Manifest

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64  # far deeper than any manifest; a self-referencing alias would be infinite
FieldPath = tuple[str | int, ...]
# Where libyaml and PyYAML's reference parser part ways (found by differential fuzzing):
# libyaml accepts tabs inside plain scalars, a `?` inside a plain scalar in a flow
# collection (`[a?]`) and a comment right after a block scalar header (`|#`); it drops a
# byte-order mark anywhere, places an empty value after an explicit key (`? k`) on
# another line, and tokenises tags differently (`!`). Text holding any of these goes
# straight to the reference parser: a manifest rarely does, and then it is only slower.
_PURE_ONLY = re.compile(r"[\t!?]|(?s:.)\ufeff|[|>][-+0-9]*#")
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)  # None where PyYAML lacks libyaml
# What PyYAML's pure parser raises besides YAMLError, with no mark: ValueError or
# OverflowError from chr() of an escape such as "\U7fffffff" or "\Uffffffff",
# RecursionError from absurd nesting.
_UNLOCATED = (ValueError, OverflowError, RecursionError)


@dataclass(frozen=True)
class Located:
    """A valid manifest and where it was declared."""

    manifest: Manifest
    file: str
    line: int
    lines: Mapping[FieldPath, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, name)."""
        return self.manifest.kind, self.manifest.metadata.name

    def line_of(self, path: FieldPath) -> int:
        """The line of the deepest recorded prefix of `path`."""
        return line_for(self.lines, path, default=self.line)

    def where(self, path: FieldPath = ()) -> str:
        """`file:line` for a field path."""
        return f"{self.file}:{self.line_of(path)}"


@dataclass
class LoadResult:
    """What a set of files declared: valid manifests, errors, and what failed files held."""

    manifests: list[Located] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    failed_files: set[str] = field(default_factory=set)
    failed_keys: set[tuple[str, str]] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when every file parsed and validated."""
        return not self.errors

    def error(self, file: str, line: int, message: str, *, key: tuple[str, str] | None) -> None:
        """Record an error; the file (and the key, when known) become protected from pruning."""
        self.errors.append(f"{file}:{line}: {message}")
        self.failed_files.add(file)
        if key is not None:
            self.failed_keys.add(key)


def line_for(lines: Mapping[FieldPath, int], path: FieldPath, *, default: int) -> int:
    """The line of the longest prefix of `path` present in `lines`."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return default


def discover(root: Path) -> list[Path]:
    """Every manifest file under `root`, recursively, sorted; hidden and backup files skipped."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if _ignored(name):
                continue
            if name.endswith(SUFFIXES):
                found.append(Path(directory) / name)
    return found


def _ignored(name: str) -> bool:
    return name.startswith((".", "#")) or name.endswith(("~", ".swp", ".swx", ".tmp"))


def load_paths(paths: Sequence[Path], *, relative_to: Path | None = None) -> LoadResult:
    """Load files and directories (recursively); each file on its own, errors collected."""
    result = LoadResult()
    for path in paths:
        if path.is_dir():
            files = discover(path)
            base = relative_to or path
        else:
            files = [path]
            base = relative_to or path.parent
        for file in files:
            load_file(file, display=_display(file, base), into=result)
    return result


def _display(file: Path, base: Path) -> str:
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)


def load_file(path: Path, *, display: str, into: LoadResult) -> None:
    """Parse and validate one file, adding its manifests or errors to `into`."""
    into.files.append(display)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            into.error(display, 1, f"file is larger than {MAX_FILE_BYTES} bytes", key=None)
            return
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        into.error(display, 1, f"cannot read file: {_reason(exc)}", key=None)
        return
    if not text:
        # A zero-byte file is an editor or `>` caught mid-write (truncate, then write), not a
        # declaration of nothing: protect what it declared until it has content again.
        # (Deleting the file, or leaving a comment, is how a user empties it on purpose.)
        into.failed_files.add(display)
        return
    _load_text_cached(text, display=display, into=into)


@dataclass(frozen=True)
class _Parsed:
    """What `load_text` found in one file's text."""

    manifests: tuple[Located, ...]
    errors: tuple[str, ...]
    failed_files: frozenset[str]
    failed_keys: frozenset[tuple[str, str]]


# (display name, text) -> what it declared. What a file declares depends on its name and
# its bytes only (cross-document rules run later, on every load), so a long-running
# controller re-reads a file at each resync but parses and validates it only when it has
# changed; keyed by content, the cache cannot be fooled by timestamps.
_PARSED: dict[tuple[str, str], _Parsed] = {}
_PARSED_MAX = 4096


def _load_text_cached(text: str, *, display: str, into: LoadResult) -> None:
    key = (display, text)
    parsed = _PARSED.get(key)
    if parsed is None:
        fresh = LoadResult()
        load_text(text, display=display, into=fresh)
        parsed = _Parsed(
            manifests=tuple(fresh.manifests),
            errors=tuple(fresh.errors),
            failed_files=frozenset(fresh.failed_files),
            failed_keys=frozenset(fresh.failed_keys),
        )
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = parsed
    into.manifests.extend(parsed.manifests)
    into.errors.extend(parsed.errors)
    into.failed_files.update(parsed.failed_files)
    into.failed_keys.update(parsed.failed_keys)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_text(text: str, *, display: str, into: LoadResult) -> None:
    """Parse YAML/JSON text holding one or more documents."""
    try:
        nodes = compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        into.error(display, line, f"invalid YAML: {problem}", key=None)
        return
    except _UNLOCATED as exc:  # e.g. an escape beyond U+10FFFF, absurd nesting
        into.error(display, 1, f"invalid YAML: {_reason(exc)}", key=None)
        return
    for node in nodes:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
            continue  # an empty document: between '---' separators, or after a final '---'
        _load_document(node, display=display, into=into)


def compose(text: str, *, fast: bool = True) -> list[yaml.Node]:
    """The YAML documents of `text` as nodes; raises what the reference parser raises.

    `fast=False` skips libyaml (the tests compare both paths).
    """
    located: yaml.YAMLError | None = None
    if fast and _FAST_LOADER is not None and _PURE_ONLY.search(text) is None:
        try:
            return list(yaml.compose_all(text, Loader=_FAST_LOADER))
        except yaml.YAMLError as exc:
            located = exc  # the reference parser words the error (or accepts the text)
        except _UNLOCATED:
            pass
    try:
        return list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except _UNLOCATED:
        # The reference parser broke down without a position (chr() of an escape beyond
        # U+10FFFF, Python's recursion limit); libyaml said where, which is better.
        if located is not None:
            raise located from None
        raise


def _load_document(node: yaml.Node, *, display: str, into: LoadResult) -> None:
    line = node.start_mark.line + 1
    lines: dict[FieldPath, int] = {}
    try:
        data = _to_python(node, (), lines)
    except _ConvertError as exc:
        into.error(display, exc.line, exc.message, key=None)
        return
    if not isinstance(data, dict):
        into.error(
            display,
            line,
            "a manifest must be a mapping with apiVersion, kind, metadata, spec",
            key=None,
        )
        return
    key = _guess_key(data)
    label = f"{key[0]}/{_printable(key[1])}: " if key else ""
    api_version = data.get("apiVersion")
    if api_version != API_VERSION:
        where = line_for(lines, ("apiVersion",), default=line)
        into.error(
            display,
            where,
            f"{label}apiVersion must be {API_VERSION!r}, got {api_version!r}",
            key=key,
        )
        return
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        where = line_for(lines, ("kind",), default=line)
        known = ", ".join(sorted(KINDS))
        into.error(display, where, f"unknown kind {kind!r} (known: {known})", key=None)
        return
    try:
        manifest = model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            into.error(
                display,
                line_for(lines, loc, default=line),
                f"{label}{format_loc(loc)}: {_message(error)}",
                key=key,
            )
        return
    into.manifests.append(Located(manifest=manifest, file=display, line=line, lines=lines))


def _guess_key(data: Mapping[str, Any]) -> tuple[str, str] | None:
    kind, metadata = data.get("kind"), data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if isinstance(kind, str) and isinstance(name, str):
        return kind, name
    return None


def _printable(text: str) -> str:
    # An invalid name may hold a newline (`name: |`); the error must stay on one line.
    return text if text.isprintable() else repr(text)


def format_loc(loc: Iterable[str | int]) -> str:
    """('spec', 'processes', 0, 'name') -> 'spec.processes[0].name'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.isprintable() or not part:  # a key such as "\n": keep one line
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else part
    return text or "(document)"


def _message(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; see `reconciler schema`)"
    if kind == "missing":
        return "required field is missing"
    message = str(error.get("msg", "invalid value"))
    # pydantic prefixes our own ValueErrors with "Value error, ".
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if kind.startswith("literal_error"):
        message = f"{message}, got {error.get('input')!r}"
    return message


class _ConvertError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


_SCALARS = yaml.SafeLoader("")


def _to_python(node: yaml.Node, path: FieldPath, lines: dict[FieldPath, int]) -> Any:
    """Convert a composed node to plain data, recording the line of every key and item."""
    if len(lines) > MAX_NODES:
        # Aliases make a small text expand exponentially ("billion laughs"): stop early.
        raise _ConvertError(node.start_mark.line + 1, f"document has more than {MAX_NODES} values")
    if len(path) > MAX_DEPTH:
        # `a: &a [*a]` is a node that contains itself: without a limit, a RecursionError.
        raise _ConvertError(
            node.start_mark.line + 1,
            f"document is nested more than {MAX_DEPTH} levels deep (a recursive alias?)",
        )
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _ConvertError(
                    key_node.start_mark.line + 1, "mapping keys must be plain strings"
                )
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _ConvertError(
                    key_node.start_mark.line + 1, "YAML merge keys (<<) are not supported"
                )
            key = key_node.value  # the text as written: `1:` is the key "1"
            if key in result:
                raise _ConvertError(key_node.start_mark.line + 1, f"duplicate key {key!r}")
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _to_python(value_node, (*path, key), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            items.append(_to_python(item, (*path, index), lines))
        return items
    if node.tag == _STR_TAG:
        return node.value  # what the constructor returns for a string, without its detour
    try:
        return _SCALARS.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _ConvertError(node.start_mark.line + 1, f"invalid value: {problem}") from None
    except Exception as exc:
        # PyYAML's scalar constructors raise plain errors on explicitly tagged nonsense
        # (`!!int x`, `!!bool x`, `2020-13-45`): still the user's text, not our bug.
        text, tag = str(node.value)[:40], node.tag.replace("tag:yaml.org,2002:", "!!")
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _ConvertError(
            node.start_mark.line + 1, f"invalid value {text!r} for {tag}: {reason}"
        ) from None
    finally:
        _SCALARS.constructed_objects.clear()


def iter_manifests(result: LoadResult, kind: str) -> Iterator[Located]:
    """The valid manifests of one kind, in load order."""
    return (m for m in result.manifests if m.manifest.kind == kind)


DeviceResolver = Callable[[str], str]

"""The manifests watcher on a real inotify instance, in a temporary directory (no root).

inotify queues an event inside the system call that caused it, so `read()` right after a
file operation sees it: nothing here waits or sleeps.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.controller.watcher import Change, ManifestWatcher


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    return directory


@pytest.fixture
def watcher(root: Path) -> Iterator[ManifestWatcher]:
    watching = ManifestWatcher(root=root)
    watching.start()
    yield watching
    watching.stop()


def readable(watcher: ManifestWatcher) -> bool:
    ready, _, _ = select.select([watcher.fileno()], [], [], 0)
    return bool(ready)


def test_nothing_happened_nothing_to_read(watcher: ManifestWatcher) -> None:
    assert not readable(watcher)
    assert watcher.read() == []


def test_an_atomic_save_is_one_settled_change(watcher: ManifestWatcher, root: Path) -> None:
    temp = root / ".web.yaml.tmp"  # hidden: ignored, as the loader ignores it
    temp.write_text("kind: Environment\n")
    temp.rename(root / "web.yaml")
    assert readable(watcher)
    assert watcher.read() == [Change(str(root / "web.yaml"), settled=True)]
    assert not readable(watcher)


def test_truncate_and_write_is_settled_only_once_closed(
    watcher: ManifestWatcher, root: Path
) -> None:
    path = root / "web.yaml"
    path.write_text("old\n")
    watcher.read()
    with open(path, "w") as handle:  # truncates
        handle.flush()
        assert watcher.read()[-1] == Change(str(path), settled=False)
        handle.write("new\n")
        handle.flush()
        assert watcher.read() == [Change(str(path), settled=False)]
    assert watcher.read() == [Change(str(path), settled=True)]


def test_a_delete_is_not_settled(watcher: ManifestWatcher, root: Path) -> None:
    path = root / "web.yaml"
    path.write_text("x\n")
    watcher.read()
    path.unlink()
    assert watcher.read() == [Change(str(path), settled=False)]


def test_irrelevant_files_are_ignored(watcher: ManifestWatcher, root: Path) -> None:
    (root / "README.md").write_text("x")
    (root / "web.yaml~").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "config.yaml").write_text("x")
    assert watcher.read() == []


def test_reading_a_manifest_is_not_an_event(watcher: ManifestWatcher, root: Path) -> None:
    path = root / "web.yaml"
    path.write_text("x\n")
    watcher.read()
    path.read_text()  # what every reconcile does: must never trigger itself
    assert watcher.read() == []


def test_a_new_subdirectory_is_watched(watcher: ManifestWatcher, root: Path) -> None:
    team = root / "team"
    team.mkdir()
    assert watcher.read() == [Change(str(team), settled=False)]
    (team / "web.yaml").write_text("x\n")
    changes = watcher.read()
    assert changes[-1] == Change(str(team / "web.yaml"), settled=True)


def test_a_moved_in_tree_is_watched_to_the_bottom(
    watcher: ManifestWatcher, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "staging"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "web.yaml").write_text("x\n")
    outside.rename(root / "team")
    assert watcher.read() == [Change(str(root / "team"), settled=True)]
    (root / "team" / "deep" / "web.yaml").write_text("y\n")
    assert watcher.read()[-1] == Change(str(root / "team" / "deep" / "web.yaml"), settled=True)


def test_a_moved_out_tree_is_no_longer_watched(
    watcher: ManifestWatcher, root: Path, tmp_path: Path
) -> None:
    (root / "team").mkdir()
    watcher.read()
    (root / "team").rename(tmp_path / "elsewhere")
    assert watcher.read() == [Change(str(root / "team"), settled=False)]
    (tmp_path / "elsewhere" / "web.yaml").write_text("x\n")
    assert watcher.read() == []


def test_a_directory_renamed_inside_the_tree_reports_its_new_paths(
    watcher: ManifestWatcher, root: Path
) -> None:
    (root / "a").mkdir()
    watcher.read()
    (root / "a").rename(root / "b")
    watcher.read()
    (root / "b" / "web.yaml").write_text("x\n")
    assert watcher.read()[-1] == Change(str(root / "b" / "web.yaml"), settled=True)


def test_the_directory_removed_and_made_again_is_watched_again(
    watcher: ManifestWatcher, root: Path
) -> None:
    os.rmdir(root)
    changes = watcher.read()
    assert Change(str(root), settled=False) in changes
    assert all(not c.settled for c in changes)
    assert watcher.ensure_watching() is False
    root.mkdir()
    assert Change(str(root), settled=False) in watcher.read()
    (root / "web.yaml").write_text("x\n")
    assert watcher.read()[-1] == Change(str(root / "web.yaml"), settled=True)
    assert watcher.ensure_watching() is True


def test_stop_closes_the_descriptor(root: Path) -> None:
    watching = ManifestWatcher(root=root)
    watching.start()
    watching.stop()
    assert watching.fileno() == -1
    (root / "web.yaml").write_text("x\n")
    assert watching.read() == []

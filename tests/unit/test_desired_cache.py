"""Desired environments are rebuilt only for files whose text changed."""

from __future__ import annotations

from pathlib import Path

from reconciler.engine.desired import build_desired
from reconciler.manifests.loader import load_paths
from tests.unit.factories import dump, env_doc, resolve_device


def _desired_memory(root: Path) -> tuple[object, int | None]:
    want = build_desired(load_paths([root]), resolve_device=resolve_device)
    env = want.environments["web"]
    return env, env.limits.memory_bytes


def test_an_unchanged_file_reuses_its_environment_and_an_edit_rebuilds_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(dump(env_doc("web", resources={"memory": "64Mi"})))
    first, memory = _desired_memory(tmp_path)
    assert memory == 64 * 1024 * 1024
    again, _ = _desired_memory(tmp_path)
    assert again is first  # nothing changed: nothing rebuilt

    path.write_text(dump(env_doc("web", resources={"memory": "128Mi"})))
    edited, memory = _desired_memory(tmp_path)
    assert edited is not first and memory == 128 * 1024 * 1024

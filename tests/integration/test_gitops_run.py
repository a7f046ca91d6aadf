"""`reconciler run --git-url`: the controller follows a repository (issue 7 under `run`).

Reuses the repository fixtures of test_gitops.py. The controller polls every 0.5 s; each
check polls the kernel with a deadline.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.helpers import Reconciler
from tests.integration.test_gitops import (  # noqa: F401  (fixtures)
    Repo,
    env_yaml,
    live_envs,
    memory_limit,
    netns_inode,
    rc,
    repo,
    source_of,
)
from tests.kernel_view import wait_until

DEADLINE = 20.0


@pytest.fixture
def controller(rc: Reconciler, repo: Repo) -> Iterator[subprocess.Popen[str]]:  # noqa: F811
    repo.commit({"web.yaml": env_yaml("web", memory="64Mi")}, message="first")
    cmd = [
        sys.executable, "-m", "reconciler",
        "--manifests", str(rc.manifests), "--state-dir", str(rc.state_dir),
        "--instance", rc.instance, "--log-format", "json",
        "run", "--git-url", repo.url, "--git-interval", "0.5", "--resync", "30",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_run_follows_the_repository(
    rc: Reconciler,  # noqa: F811
    repo: Repo,  # noqa: F811
    controller: subprocess.Popen[str],
) -> None:
    wait_until(lambda: live_envs(rc) == {"web"}, DEADLINE, message="first commit not applied")
    inode = netns_inode(rc, "web")
    edited = repo.commit({"web.yaml": env_yaml("web", memory="32Mi")}, message="smaller")
    wait_until(lambda: memory_limit(rc, "web") == 32 * 2**20, DEADLINE, message="edit not applied")
    assert netns_inode(rc, "web") == inode, "an edited limit is written in place"
    wait_until(lambda: source_of(rc).get("revision") == edited, DEADLINE, message="revision")

    broken = repo.commit({"web.yaml": "apiVersion: reconciler/v1\nkind: Environment\n"})
    wait_until(
        lambda: source_of(rc).get("lastAttemptedRevision") == broken,
        DEADLINE,
        message="the broken commit was not attempted",
    )
    source = source_of(rc)
    assert source["revision"] == edited, "a commit that fails validation is never applied"
    assert source["lastError"] and "web.yaml" in source["lastError"], source
    assert live_envs(rc) == {"web"}, "a failed commit prunes nothing"
    stalled = {c["type"]: c for c in source["conditions"]}["Stalled"]
    assert stalled["status"] == "True" and stalled["reason"] == "SyncFailed", stalled

    rc.ok("suspend")
    repo.commit({"web.yaml": None, "api.yaml": env_yaml("api")}, message="replace")
    # While suspended, several polls pass and nothing changes.
    with pytest.raises(AssertionError):
        wait_until(lambda: live_envs(rc) != {"web"}, 2.0, message="suspended")
    rc.ok("resume")
    wait_until(lambda: live_envs(rc) == {"api"}, DEADLINE, message="resume did not apply")
    assert controller.poll() is None, "the controller is still running"

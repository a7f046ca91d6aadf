"""End to end: `reconciler sync` with a git repository as the source of truth (issue 7).

Every test makes its own repositories on disk (a bare "remote" plus a work clone to commit
and push from; no network), runs the command as a user would, and checks environments
through the kernel's own view: pinned netns (and its inode, which an in-place update must
keep), the memory limit in the cgroup file. `status -o json` is believed only for what
only it can show: the recorded source (revision, lastAttemptedRevision, lastError).

Guarded prune is the heart of it: a failed fetch, a missing path, a refused signature or
a commit with an invalid manifest changes nothing in the kernel, while a commit that
removes a manifest (or empties the path) prunes.

Every test ends with `destroy` and a leak check (`managed_reconciler`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import kernel_view
from tests.integration.helpers import Reconciler, describe, managed_reconciler

MiB = 1024 * 1024
_SUBNETS = itertools.count(10)  # 10.227.<n>.0/24: no other test file uses 10.227
_GIT_IDENTITY = ("-c", "user.name=t", "-c", "user.email=t@example.invalid")


# --------------------------------------------------------------------------- repositories


def _git_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "RECONCILER_"))}
    env.update(extra)
    return env


@dataclass
class Repo:
    """A bare repository (what `--git-url` names) and a work clone that commits and pushes."""

    bare: Path
    work: Path

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["git", *_GIT_IDENTITY, *args],
            cwd=self.work,
            capture_output=True,
            text=True,
            check=False,
            env=env or _git_env(),
            timeout=60,
        )
        assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    def commit(
        self, files: dict[str, str | None], *, signer: Signer | None = None, message: str = "edit"
    ) -> str:
        """Write (text) or delete (None) files, commit (signed by `signer`), push; the sha."""
        for name, text in files.items():
            path = self.work / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        self.git("add", "--all")
        if signer is None:
            self.git("commit", "--quiet", "--allow-empty", "-m", message)
        else:
            self.git(
                "-c",
                "gpg.program=gpg",
                "-c",
                f"user.signingkey={signer.fingerprint}",
                "commit",
                "--quiet",
                "--allow-empty",
                "-S",
                "-m",
                message,
                env=_git_env(GNUPGHOME=str(signer.home)),
            )
        self.git("push", "--quiet", "origin", "HEAD:main")
        return self.git("rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    bare, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(
        ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)],
        check=True,
        env=_git_env(),
    )
    subprocess.run(
        ["git", "clone", "--quiet", str(bare), str(work)],
        check=True,
        capture_output=True,
        env=_git_env(),
    )
    return Repo(bare=bare, work=work)


@pytest.fixture
def rc(instance: str, tmp_path: Path, state_dir: Path) -> Iterator[Reconciler]:
    """The instance's command; `--manifests` is an unused empty dir (git is the source)."""
    unused = tmp_path / "unused-manifests"
    unused.mkdir()
    with managed_reconciler(
        Reconciler(manifests=unused, state_dir=state_dir, instance=instance)
    ) as reconciler:
        yield reconciler


def env_yaml(name: str, *, memory: str = "64Mi", network: str | None = None) -> str:
    """An Environment manifest, one field per line (so errors have distinct lines)."""
    lines = [
        "apiVersion: reconciler/v1",
        "kind: Environment",
        "metadata:",
        f"  name: {name}",
        "spec:",
    ]
    if network is not None:
        lines += ["  network:", f"    name: {network}"]
    lines += ["  resources:", f"    memory: {memory}", "    pids: 32"]
    return "\n".join(lines) + "\n"


def network_yaml(name: str) -> str:
    subnet = f"10.227.{next(_SUBNETS)}.0/24"
    return (
        f"apiVersion: reconciler/v1\nkind: Network\nmetadata:\n  name: {name}\n"
        f"spec:\n  subnet: {subnet}\n"
    )


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the first line of `text` containing `needle`."""
    return next(n for n, line in enumerate(text.splitlines(), start=1) if needle in line)


def sync(rc: Reconciler, repo: Repo, *args: str) -> subprocess.CompletedProcess[str]:
    return rc("sync", "--git-url", repo.url, *args)


# --------------------------------------------------------------------------- kernel view


def netns_inode(rc: Reconciler, env: str) -> int | None:
    """The inode of the env's pinned netns, None when it is not pinned."""
    name = f"{rc.instance}-{env}"
    return kernel_view.netns_inode(name) if name in kernel_view.netns_names() else None


def memory_limit(rc: Reconciler, env: str) -> int:
    """The env's memory limit, read from its cgroup file (v1 memory hierarchy, or v2)."""
    for mount in kernel_view.cgroup_mounts():
        if mount.version == 1 and "memory" not in mount.controllers:
            continue
        for name in ("memory.limit_in_bytes", "memory.max"):
            path = mount.path / rc.instance / env / name
            if path.exists():
                return int(kernel_view.read_cgroup_file(path))
    raise AssertionError(f"no memory cgroup file for {rc.instance}/{env}")


def live_envs(rc: Reconciler) -> set[str]:
    """Environments whose netns is pinned, as the kernel shows them."""
    prefix = f"{rc.instance}-"
    return {n[len(prefix) :] for n in kernel_view.netns_names() if n.startswith(prefix)}


def source_of(rc: Reconciler) -> dict[str, Any]:
    source: dict[str, Any] = rc.json("status", "-o", "json")["source"]
    return source


def events(rc: Reconciler) -> list[dict[str, Any]]:
    return [json.loads(line) for line in rc.ok("events", "-o", "json").stdout.splitlines()]


# --------------------------------------------------------------------------- sync


def test_sync_creates_environments_and_records_the_commit(rc: Reconciler, repo: Repo) -> None:
    sha = repo.commit(
        {
            "net.yaml": network_yaml("gitnet"),
            "web.yaml": env_yaml("web", memory="96Mi", network="gitnet"),
            "db.yaml": env_yaml("db", memory="64Mi"),
        }
    )
    result = sync(rc, repo)
    assert result.returncode == 0, describe(result)
    assert sha in result.stdout

    assert live_envs(rc) == {"web", "db"}
    assert memory_limit(rc, "web") == 96 * MiB
    assert memory_limit(rc, "db") == 64 * MiB
    source = source_of(rc)
    assert source["kind"] == "git"
    assert source["url"] == repo.url
    assert source["ref"] == "HEAD" and source["path"] == "."
    assert source["revision"] == sha and source["lastAttemptedRevision"] == sha
    assert source["lastError"] is None and source["lastFetchTime"]
    assert source["suspended"] is False
    assert any(e["reason"] == "Synced" and sha in e["message"] for e in events(rc))

    again = sync(rc, repo)
    assert again.returncode == 0, describe(again)
    assert "No changes" in again.stdout


def test_new_commit_updates_memory_in_place_and_removal_prunes(rc: Reconciler, repo: Repo) -> None:
    repo.commit({"web.yaml": env_yaml("web", memory="64Mi"), "db.yaml": env_yaml("db")})
    rc.ok("sync", "--git-url", repo.url)
    inode = netns_inode(rc, "web")
    assert inode is not None and memory_limit(rc, "web") == 64 * MiB

    edited = repo.commit({"web.yaml": env_yaml("web", memory="128Mi")})
    result = sync(rc, repo)
    assert result.returncode == 0, describe(result)
    assert "Environment/web: updated" in result.stdout
    assert memory_limit(rc, "web") == 128 * MiB
    assert netns_inode(rc, "web") == inode  # in place: the same namespace
    assert source_of(rc)["revision"] == edited

    removed = repo.commit({"db.yaml": None})
    result = sync(rc, repo)
    assert result.returncode == 0, describe(result)
    assert "Environment/db: deleted" in result.stdout
    assert live_envs(rc) == {"web"}
    assert netns_inode(rc, "web") == inode
    assert source_of(rc)["revision"] == removed


def test_invalid_commit_prunes_nothing_and_names_file_line_and_revision(
    rc: Reconciler, repo: Repo
) -> None:
    good = repo.commit({"web.yaml": env_yaml("web"), "db.yaml": env_yaml("db")})
    rc.ok("sync", "--git-url", repo.url)
    inodes = {env: netns_inode(rc, env) for env in ("web", "db")}

    # The bad commit removes db (a prune, if it were applied) and breaks web's memory.
    broken = env_yaml("web", memory="lots")
    line = line_of(broken, "memory: lots")
    bad = repo.commit({"db.yaml": None, "web.yaml": broken})
    result = sync(rc, repo)
    assert result.returncode == 1, describe(result)
    assert f"rev {bad[:7]}: web.yaml:{line}: " in result.stderr, result.stderr
    assert "nothing changed" in result.stderr

    assert {env: netns_inode(rc, env) for env in ("web", "db")} == inodes
    assert memory_limit(rc, "web") == 64 * MiB
    source = source_of(rc)
    assert source["revision"] == good
    assert source["lastAttemptedRevision"] == bad
    assert f"rev {bad[:7]}: web.yaml:{line}:" in source["lastError"]
    failures = [e for e in events(rc) if e["reason"] == "SyncFailed"]
    assert failures and failures[-1]["type"] == "Warning"

    fixed = repo.commit({"web.yaml": env_yaml("web", memory="80Mi")})
    result = sync(rc, repo)
    assert result.returncode == 0, describe(result)
    assert live_envs(rc) == {"web"} and memory_limit(rc, "web") == 80 * MiB
    source = source_of(rc)
    assert source["revision"] == fixed and source["lastError"] is None


def test_unreachable_repository_keeps_everything(rc: Reconciler, repo: Repo) -> None:
    good = repo.commit({"web.yaml": env_yaml("web")})
    rc.ok("sync", "--git-url", repo.url)
    inode = netns_inode(rc, "web")

    shutil.rmtree(repo.bare)  # the same URL, now unreachable
    result = sync(rc, repo)
    assert result.returncode == 1, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot fetch {repo.url}: "), lines
    assert netns_inode(rc, "web") == inode
    source = source_of(rc)
    assert source["revision"] == good and source["lastAttemptedRevision"] == good
    assert "cannot fetch" in source["lastError"]

    other = rc("sync", "--git-url", "file:///nonexistent")
    assert other.returncode == 1, describe(other)
    assert "does not appear to be a git repository" in other.stderr
    assert netns_inode(rc, "web") == inode


def test_git_ref_selects_a_tag_a_branch_or_a_commit(rc: Reconciler, repo: Repo) -> None:
    first = repo.commit({"web.yaml": env_yaml("web", memory="64Mi")})
    repo.git("tag", "v1")
    repo.git("push", "--quiet", "origin", "v1")
    second = repo.commit({"web.yaml": env_yaml("web", memory="96Mi")})

    rc.ok("sync", "--git-url", repo.url, "--git-ref", "v1")
    inode = netns_inode(rc, "web")
    assert memory_limit(rc, "web") == 64 * MiB
    source = source_of(rc)
    assert source["ref"] == "v1" and source["revision"] == first

    rc.ok("sync", "--git-url", repo.url, "--git-ref", second)
    assert memory_limit(rc, "web") == 96 * MiB
    assert source_of(rc)["revision"] == second

    rc.ok("sync", "--git-url", repo.url, "--git-ref", first[:10])
    assert memory_limit(rc, "web") == 64 * MiB

    rc.ok("sync", "--git-url", repo.url, "--git-ref", "main")
    assert memory_limit(rc, "web") == 96 * MiB
    assert netns_inode(rc, "web") == inode

    unknown = rc("sync", "--git-url", repo.url, "--git-ref", "v9")
    assert unknown.returncode == 1, describe(unknown)
    assert "no branch, tag or commit 'v9'" in unknown.stderr
    bad = rc("sync", "--git-url", repo.url, "--git-ref", "a..b")
    assert bad.returncode == 2, describe(bad)  # a usage error


def test_git_path_selects_a_folder_and_a_missing_one_changes_nothing(
    rc: Reconciler, repo: Repo
) -> None:
    repo.commit(
        {
            "envs/web.yaml": env_yaml("web"),
            "other/db.yaml": env_yaml("db"),
            "README.md": "not a manifest\n",
        }
    )
    rc.ok("sync", "--git-url", repo.url, "--git-path", "envs")
    assert live_envs(rc) == {"web"}
    assert source_of(rc)["path"] == "envs"

    text = env_yaml("web", memory="lots")
    broken = repo.commit({"envs/web.yaml": text})
    result = rc("sync", "--git-url", repo.url, "--git-path", "envs")
    assert result.returncode == 1, describe(result)
    line = line_of(text, "memory: lots")
    assert f"rev {broken[:7]}: envs/web.yaml:{line}: " in result.stderr  # relative to the repo

    missing = rc("sync", "--git-url", repo.url, "--git-path", "nope")
    assert missing.returncode == 1, describe(missing)
    assert "--git-path 'nope' does not exist" in missing.stderr
    assert live_envs(rc) == {"web"}

    escape = rc("sync", "--git-url", repo.url, "--git-path", "../etc")
    assert escape.returncode == 2, describe(escape)


def test_an_emptied_path_prunes_everything(rc: Reconciler, repo: Repo) -> None:
    repo.commit({"envs/web.yaml": env_yaml("web"), "envs/README.md": "environments\n"})
    rc.ok("sync", "--git-url", repo.url, "--git-path", "envs")
    assert live_envs(rc) == {"web"}
    repo.commit({"envs/web.yaml": None})  # the folder holds only its README now
    result = rc("sync", "--git-url", repo.url, "--git-path", "envs")
    assert result.returncode == 0, describe(result)
    assert "Environment/web: deleted" in result.stdout
    assert live_envs(rc) == set()


def test_suspend_and_resume(rc: Reconciler, repo: Repo) -> None:
    repo.commit({"web.yaml": env_yaml("web", memory="64Mi")})
    rc.ok("sync", "--git-url", repo.url)
    rc.ok("suspend")
    assert source_of(rc)["suspended"] is True
    assert "already suspended" in rc.ok("suspend").stdout

    repo.commit({"web.yaml": env_yaml("web", memory="96Mi"), "db.yaml": env_yaml("db")})
    result = sync(rc, repo)
    assert result.returncode == 0, describe(result)
    assert "sync suspended" in result.stdout
    assert live_envs(rc) == {"web"} and memory_limit(rc, "web") == 64 * MiB

    rc.ok("resume")
    assert source_of(rc)["suspended"] is False
    rc.ok("sync", "--git-url", repo.url)
    assert live_envs(rc) == {"web", "db"} and memory_limit(rc, "web") == 96 * MiB


def test_credentials_are_never_shown_or_stored(rc: Reconciler) -> None:
    # Port 9 on this sandbox's own loopback: refused at once, no traffic leaves.
    url = "http://user:secret@127.0.0.1:9/repo.git"
    result = rc("sync", "--git-url", url)
    assert result.returncode == 1, describe(result)
    assert "error: cannot fetch http://127.0.0.1:9/repo.git: " in result.stderr
    status = rc.ok("status", "-o", "json").stdout
    assert json.loads(status)["source"]["url"] == "http://127.0.0.1:9/repo.git"
    shown = result.stdout + result.stderr + status + rc.ok("events", "-o", "json").stdout
    assert "secret" not in shown
    for path in rc.state_dir.rglob("*"):
        if path.is_file():
            assert b"secret" not in path.read_bytes(), f"{path} holds the password"


# --------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signer:
    """A throwaway OpenPGP key in its own GNUPGHOME."""

    home: Path
    fingerprint: str

    def export(self, path: Path) -> Path:
        with path.open("wb") as out:
            subprocess.run(
                ["gpg", "--batch", "--armor", "--export", self.fingerprint],
                check=True,
                stdout=out,
                env=_git_env(GNUPGHOME=str(self.home)),
            )
        return path


def _new_key(home: Path, name: str) -> Signer:
    env = _git_env(GNUPGHOME=str(home))
    subprocess.run(
        [
            *("gpg", "--batch", "--passphrase", "", "--quick-gen-key"),
            *(f"{name} <t@example.invalid>", "ed25519", "sign", "never"),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=60,
    )
    listing = subprocess.run(
        ["gpg", "--batch", "--with-colons", "--list-secret-keys", f"{name} <t@example.invalid>"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    fingerprint = next(
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")
    )
    return Signer(home=home, fingerprint=fingerprint)


@pytest.fixture
def signers() -> Iterator[tuple[Signer, Signer]]:
    """(trusted, stranger): two keys. The home is short (/tmp/rg...): gpg-agent's socket
    path must fit in 108 bytes, which a pytest tmp_path may not."""
    home = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    home.chmod(0o700)
    try:
        yield _new_key(home, "Trusted"), _new_key(home, "Stranger")
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "all"],
                check=False,
                capture_output=True,
                timeout=30,
            )
        shutil.rmtree(home, ignore_errors=True)


def test_signature_verification(
    rc: Reconciler, repo: Repo, signers: tuple[Signer, Signer], tmp_path: Path
) -> None:
    trusted, stranger = signers
    keyring = trusted.export(tmp_path / "trusted.asc")
    verify = ("--git-verify-keyring", str(keyring))

    signed = repo.commit({"web.yaml": env_yaml("web", memory="64Mi")}, signer=trusted)
    result = rc("sync", "--git-url", repo.url, *verify)
    assert result.returncode == 0, describe(result)
    assert live_envs(rc) == {"web"} and source_of(rc)["revision"] == signed

    unsigned = repo.commit({"web.yaml": env_yaml("web", memory="96Mi")})
    result = rc("sync", "--git-url", repo.url, *verify)
    assert result.returncode == 1, describe(result)
    assert (
        f"commit {unsigned[:7]} is not signed by a key in {keyring}: the commit is not signed"
        in result.stderr
    )
    assert memory_limit(rc, "web") == 64 * MiB
    source = source_of(rc)
    assert source["revision"] == signed and source["lastAttemptedRevision"] == unsigned

    foreign = repo.commit({"web.yaml": env_yaml("web", memory="112Mi")}, signer=stranger)
    result = rc("sync", "--git-url", repo.url, *verify)
    assert result.returncode == 1, describe(result)
    assert f"commit {foreign[:7]} is not signed by a key in {keyring}: signed by unknown key" in (
        result.stderr
    )
    assert memory_limit(rc, "web") == 64 * MiB

    resigned = repo.commit({"web.yaml": env_yaml("web", memory="128Mi")}, signer=trusted)
    rc.ok("sync", "--git-url", repo.url, *verify)
    assert memory_limit(rc, "web") == 128 * MiB
    assert source_of(rc)["revision"] == resigned

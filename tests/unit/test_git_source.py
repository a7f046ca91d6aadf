"""The git source without the kernel: redaction, refs, paths, git's and gpg's output, and
real fetches from repositories the tests make on disk (no network, no root).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.sources import Fetched, SourceError
from reconciler.sources.directory import DirectorySource
from reconciler.sources.git import (
    GitSource,
    RefKind,
    classify_ref,
    explain_fetch_error,
    git_environment,
    is_abbreviated_sha,
    normalize_repo_path,
    normalize_url,
    parse_gpg_status,
    redact_text,
    redact_url,
    run_command,
    url_secrets,
)
from reconciler.state.model import SourceRecord

SHA = "5a8e00b72c0b23224fae41b71901ac911f9b51e1"

# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@example.invalid/repo.git", "https://example.invalid/repo.git"),
        ("https://ghp_token123@example.invalid/r.git", "https://example.invalid/r.git"),
        ("http://u:p%40ss@127.0.0.1:9/r.git", "http://127.0.0.1:9/r.git"),
        ("https://u:p@ss@example.invalid/r.git", "https://example.invalid/r.git"),
        ("ssh://git@example.invalid/r.git", "ssh://git@example.invalid/r.git"),
        ("ssh://git:hunter2@example.invalid/r.git", "ssh://git@example.invalid/r.git"),
        ("git+ssh://git:hunter2@example.invalid/r.git", "git+ssh://git@example.invalid/r.git"),
        ("git@example.invalid:org/r.git", "git@example.invalid:org/r.git"),
        ("file:///srv/repo.git", "file:///srv/repo.git"),
        ("/srv/repo.git", "/srv/repo.git"),
        ("https://example.invalid/a@b/r.git", "https://example.invalid/a@b/r.git"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_are_passwords_and_lone_tokens() -> None:
    assert set(url_secrets("https://user:p%40ssword@example.invalid/r.git")) == {
        "p%40ssword",
        "p@ssword",
    }
    assert url_secrets("https://ghp_token123@example.invalid/r.git") == ("ghp_token123",)
    assert url_secrets("ssh://git@example.invalid/r.git") == ()
    assert url_secrets("https://example.invalid/r.git") == ()


def test_redact_text_removes_urls_and_bare_secrets() -> None:
    url = "https://user:secret@example.invalid/repo.git"
    text = f"fatal: unable to access '{url}/': auth for user secret failed"
    shown = redact_text(text, secrets=url_secrets(url))
    assert "secret" not in shown
    assert "https://example.invalid/repo.git/" in shown


def test_source_redacts_its_own_credentials(tmp_path: Path) -> None:
    source = GitSource(url="https://user:secret@example.invalid/r.git", checkout_dir=tmp_path)
    assert source.display_url == "https://example.invalid/r.git"
    assert "secret" not in repr(source)
    assert source.redact("password secret rejected") == "password *** rejected"


# --------------------------------------------------------------------------- refs, paths, URLs


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        (None, RefKind.DEFAULT),
        ("HEAD", RefKind.DEFAULT),
        (SHA, RefKind.COMMIT),
        ("a" * 64, RefKind.COMMIT),
        ("refs/heads/main", RefKind.FULL),
        ("refs/pull/1/head", RefKind.FULL),
        ("main", RefKind.NAME),
        ("release/1.2", RefKind.NAME),
        ("v1.0.0", RefKind.NAME),
        ("5a8e00b", RefKind.NAME),  # an abbreviated sha is looked up after tags and branches
        (SHA.upper(), RefKind.NAME),  # git shas are lower case; this can only be a name
    ],
)
def test_classify_ref(ref: str | None, kind: RefKind) -> None:
    assert classify_ref(ref) is kind


@pytest.mark.parametrize(
    "ref",
    [
        *("", "-upload-pack=x", "a..b", "a b", "x:y", "x~1", "x^", "a@{1}", "dir/", ".hidden"),
        *("a.lock", "a//b", "a*", "a?", "a[", "a\\b", "tab\tx", "@", "x."),
    ],
)
def test_invalid_refs_are_refused(ref: str) -> None:
    with pytest.raises(SourceError, match="--git-ref"):
        classify_ref(ref)


def test_abbreviated_sha() -> None:
    assert is_abbreviated_sha("5a8e")
    assert is_abbreviated_sha(SHA[:12])
    assert not is_abbreviated_sha("5a8")  # git needs at least 4 digits
    assert not is_abbreviated_sha("main")


@pytest.mark.parametrize(
    ("path", "normal"),
    [(".", "."), ("", "."), ("envs", "envs"), ("./envs/", "envs"), ("a/b", "a/b")],
)
def test_repo_path_normalised(path: str, normal: str) -> None:
    assert normalize_repo_path(path) == normal


@pytest.mark.parametrize("path", ["/etc", "../x", "envs/../../x", ".git", "x/.git/hooks"])
def test_repo_path_must_stay_inside(path: str) -> None:
    with pytest.raises(SourceError, match="--git-path"):
        normalize_repo_path(path)


def test_normalize_url(tmp_path: Path) -> None:
    assert normalize_url("repo.git", cwd=tmp_path) == str(tmp_path / "repo.git")
    assert normalize_url("./a/../repo", cwd=tmp_path) == str(tmp_path / "repo")
    for url in (
        "https://example.invalid/r.git",
        "ssh://git@example.invalid/r.git",
        "git@example.invalid:org/r.git",
        "file:///srv/r.git",
        "/srv/r.git",
    ):
        assert normalize_url(url, cwd=tmp_path) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ext::sh -c touch% /tmp/x", "transport syntax"),
        ("fd::3", "transport syntax"),
        ("ftp://example.invalid/r.git", "unsupported scheme"),
        ("-oProxyCommand=x", "cannot start with '-'"),
        ("", "not a URL"),
        (" /srv/r.git", "not a URL"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=message):
        normalize_url(url, cwd=tmp_path)


def test_source_validates_at_construction(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="--git-ref"):
        GitSource(url="/srv/r.git", checkout_dir=tmp_path, ref="a..b")
    with pytest.raises(SourceError, match="--git-path"):
        GitSource(url="/srv/r.git", checkout_dir=tmp_path, path="../etc")


# --------------------------------------------------------------------------- git's output


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            "fatal: '/nonexistent' does not appear to be a git repository\n"
            "fatal: Could not read from remote repository.\n\n"
            "Please make sure you have the correct access rights\nand the repository exists.\n",
            "'/nonexistent' does not appear to be a git repository (check --git-url)",
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:9/r.git/': Failed to connect to "
            "127.0.0.1 port 9 after 0 ms: Couldn't connect to server\n",
            "unable to access 'http://127.0.0.1:9/r.git/': Failed to connect to 127.0.0.1 "
            "port 9 after 0 ms: Couldn't connect to server (is the host reachable?)",
        ),
        (
            "fatal: couldn't find remote ref HEAD\n",
            "the repository has no default branch (is it empty?); pass --git-ref BRANCH",
        ),
        (
            "fatal: could not read Username for 'https://example.invalid': "
            "terminal prompts disabled\n",
            "could not read Username for 'https://example.invalid': terminal prompts disabled "
            "(check the credentials in your git configuration or ssh agent)",
        ),
        ("Host key verification failed.\nfatal: Could not read from remote repository.\n", ""),
        ("", "git fetch failed without a message"),
    ],
)
def test_explain_fetch_error(stderr: str, expected: str) -> None:
    explained = explain_fetch_error(stderr)
    if expected:
        assert explained == expected
    else:
        assert explained.startswith("Host key verification failed.")
        assert "known_hosts" in explained
    assert "\n" not in explained


def test_explain_fetch_error_is_one_bounded_line() -> None:
    explained = explain_fetch_error("fatal: " + "x " * 1000)
    assert len(explained) <= 300 and explained.endswith("...")


_GOOD = """\
[GNUPG:] NEWSIG
[GNUPG:] KEY_CONSIDERED 888607892694417AEAC9F8B452E122E65AFBF673 0
[GNUPG:] GOODSIG 52E122E65AFBF673 Test <t@example.invalid>
[GNUPG:] VALIDSIG 888607892694417AEAC9F8B452E122E65AFBF673 2026-11-28 1795867495 0 4 0 22 8 00 \
888607892694417AEAC9F8B452E122E65AFBF673
[GNUPG:] TRUST_UNDEFINED 0 pgp
"""
_UNKNOWN = """\
[GNUPG:] NEWSIG
[GNUPG:] ERRSIG 1F2E3D4C5B6A7980 22 8 00 1795867495 9 -
[GNUPG:] NO_PUBKEY 1F2E3D4C5B6A7980
"""


@pytest.mark.parametrize(
    ("text", "good", "problem"),
    [
        (_GOOD, True, ""),
        ("", False, "the commit is not signed"),
        (_UNKNOWN, False, "signed by unknown key 1F2E3D4C5B6A7980"),
        ("[GNUPG:] BADSIG 52E122E65AFBF673 T\n", False, "bad signature by key 52E122E65AFBF673"),
        ("[GNUPG:] EXPKEYSIG 52E1 T\n", False, "signed by expired key 52E1"),
        ("[GNUPG:] REVKEYSIG 52E1 T\n", False, "signed by revoked key 52E1"),
        ("[GNUPG:] GOODSIG 52E1 T\n", False, "no valid signature"),  # GOODSIG alone: not enough
        (_GOOD + "[GNUPG:] BADSIG 52E1 T\n", False, "bad signature"),  # any bad one wins
    ],
)
def test_parse_gpg_status(text: str, good: bool, problem: str) -> None:
    check = parse_gpg_status(text)
    assert check.good is good
    assert check.problem.startswith(problem)
    if good:
        assert check.fingerprint == "888607892694417AEAC9F8B452E122E65AFBF673"


def test_git_environment_never_prompts_and_hides_the_url() -> None:
    base = {
        "PATH": "/usr/bin",
        "GIT_DIR": "/elsewhere/.git",
        "GIT_WORK_TREE": "/elsewhere",
        "SSH_ASKPASS": "/usr/bin/ssh-askpass",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.proxy",
        "GIT_CONFIG_VALUE_0": "http://proxy.invalid:3128",
    }
    env = git_environment(base, remote_url="https://u:p@example.invalid/r.git")
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_ASKPASS"] == ""
    assert "GIT_DIR" not in env and "GIT_WORK_TREE" not in env and "SSH_ASKPASS" not in env
    assert env["GIT_ALLOW_PROTOCOL"] == "file:git:http:https:ssh"
    # The caller's own config entry is kept; ours comes after it.
    assert env["GIT_CONFIG_KEY_0"] == "http.proxy"
    assert env["GIT_CONFIG_KEY_1"] == "remote.origin.url"
    assert env["GIT_CONFIG_VALUE_1"] == "https://u:p@example.invalid/r.git"
    assert env["GIT_CONFIG_COUNT"] == "2"
    assert env["PATH"] == "/usr/bin"


# --------------------------------------------------------------------------- records


def test_records_keep_the_applied_revision_on_failure(tmp_path: Path) -> None:
    source = GitSource(
        url="https://user:secret@example.invalid/r.git", checkout_dir=tmp_path, ref="main"
    )
    applied = source.applied(Fetched(root=tmp_path, revision=SHA), now="2026-01-01T00:00:00Z")
    assert applied.model_copy(update={"conditions": []}) == SourceRecord(
        kind="git",
        url="https://example.invalid/r.git",
        ref="main",
        path=".",
        revision=SHA,
        lastAttemptedRevision=SHA,
        lastFetchTime="2026-01-01T00:00:00Z",
        lastError=None,
        suspended=False,
    )
    assert [(c.type, c.status) for c in applied.conditions] == [("Stalled", "False")]
    newer = "b" * 40
    failed = source.failed(
        applied.model_copy(update={"suspended": True}),
        error="rev bbbbbbb: web.yaml:3: bad\nfor user:secret",
        revision=newer,
        now="2026-01-01T00:01:00Z",
    )
    assert failed.revision == SHA  # still the last applied
    assert failed.last_attempted_revision == newer
    assert failed.last_error == "rev bbbbbbb: web.yaml:3: bad for user:***"
    assert failed.suspended is True
    stalled = failed.conditions[0]
    assert (stalled.type, stalled.status, stalled.reason) == ("Stalled", "True", "SyncFailed")
    assert "secret" not in stalled.message
    # A fetch failure knows no revision: the last attempted one stays.
    again = source.failed(failed, error="cannot fetch", revision=None)
    assert again.last_attempted_revision == newer and again.revision == SHA


def test_failure_of_another_repository_does_not_claim_its_revision(tmp_path: Path) -> None:
    previous = SourceRecord(kind="git", url="https://example.invalid/old.git", revision=SHA)
    source = GitSource(url="https://example.invalid/new.git", checkout_dir=tmp_path)
    failed = source.failed(previous, error="cannot fetch", revision=None)
    assert failed.revision is None and failed.url == "https://example.invalid/new.git"


# --------------------------------------------------------------------------- real fetches


@dataclass
class Repo:
    """A bare repository (the "remote") and a work clone to commit and push from."""

    bare: Path
    work: Path

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
            cwd=self.work,
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
        )
        assert done.returncode == 0, f"git {args}: {done.stderr}"
        return done.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        for name, text in files.items():
            path = self.work / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        self.git("push", "--quiet", "origin", "HEAD:main")
        return self.git("rev-parse", "HEAD")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    bare, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(
        ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True
    )
    subprocess.run(
        ["git", "clone", "--quiet", str(bare), str(work)],
        check=True,
        capture_output=True,
        env=_clean_env(),
    )
    return Repo(bare=bare, work=work)


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state" / "git"


def _files(fetched: Fetched) -> list[str]:
    return sorted(
        str(p.relative_to(fetched.root))
        for p in fetched.root.rglob("*")
        if ".git" not in p.relative_to(fetched.root).parts and p.is_file()
    )


def test_fetch_follows_the_default_branch(repo: Repo, checkout: Path) -> None:
    first = repo.commit({"a.yaml": "a: 1\n"})
    source = GitSource(url=str(repo.bare), checkout_dir=checkout)
    fetched = source.fetch()
    assert fetched.revision == first and _files(fetched) == ["a.yaml"]
    second = repo.commit({"a.yaml": None, "b.yaml": "b: 1\n"})
    fetched = source.fetch()
    assert fetched.revision == second and _files(fetched) == ["b.yaml"]
    assert (checkout.stat().st_mode & 0o777) == 0o700


def test_fetch_resolves_tags_branches_and_commits(repo: Repo, checkout: Path) -> None:
    first = repo.commit({"a.yaml": "v: 1\n"})
    repo.git("tag", "--annotate", "-m", "one", "v1")
    repo.git("push", "--quiet", "origin", "v1")
    second = repo.commit({"a.yaml": "v: 2\n"})
    repo.git("push", "--quiet", "origin", f"{first}:refs/heads/stable")
    url = f"file://{repo.bare}"
    for ref, expected in [
        ("v1", first),  # annotated tag, peeled to its commit
        ("main", second),
        ("stable", first),
        ("refs/heads/stable", first),
        (first, first),
        (first[:9], first),
        (None, second),
    ]:
        fetched = GitSource(url=url, checkout_dir=checkout, ref=ref).fetch()
        assert fetched.revision == expected, ref
        assert (fetched.root / "a.yaml").read_text() == (
            "v: 1\n" if expected == first else "v: 2\n"
        )


def test_unknown_ref_and_missing_path_are_clear_errors(repo: Repo, checkout: Path) -> None:
    sha = repo.commit({"envs/a.yaml": "a: 1\n"})
    with pytest.raises(SourceError, match=r"has no branch, tag or commit 'nope'; check --git-ref"):
        GitSource(url=str(repo.bare), checkout_dir=checkout, ref="nope").fetch()
    with pytest.raises(SourceError, match=r"--git-path 'other' does not exist .* at ") as caught:
        GitSource(url=str(repo.bare), checkout_dir=checkout, path="other").fetch()
    assert caught.value.revision == sha
    fetched = GitSource(url=str(repo.bare), checkout_dir=checkout, path="envs").fetch()
    assert fetched.root == checkout / "envs" and _files(fetched) == ["a.yaml"]


def test_unreachable_repository(tmp_path: Path, checkout: Path) -> None:
    with pytest.raises(SourceError, match=r"cannot fetch file:///nonexistent: .*check --git-url"):
        GitSource(url="file:///nonexistent", checkout_dir=checkout).fetch()
    with pytest.raises(SourceError, match="no default branch"):
        empty = tmp_path / "empty.git"
        subprocess.run(["git", "init", "--quiet", "--bare", str(empty)], check=True)
        GitSource(url=str(empty), checkout_dir=checkout).fetch()


def test_checkout_is_exactly_the_commit(repo: Repo, checkout: Path) -> None:
    repo.commit({"a.yaml": "a: 1\n", "b.yaml": "b: 1\n"})
    source = GitSource(url=str(repo.bare), checkout_dir=checkout)
    source.fetch()
    (checkout / "a.yaml").write_text("tampered\n")
    (checkout / "b.yaml").unlink()
    (checkout / "stray.yaml").write_text("x: 1\n")
    (checkout / "ignored").mkdir()
    fetched = source.fetch()
    assert _files(fetched) == ["a.yaml", "b.yaml"]
    assert (checkout / "a.yaml").read_text() == "a: 1\n"


def test_symlinks_are_checked_out_as_plain_files(repo: Repo, checkout: Path) -> None:
    (repo.work / "passwd.yaml").symlink_to("/etc/passwd")
    repo.commit({})
    fetched = GitSource(url=str(repo.bare), checkout_dir=checkout).fetch()
    link = fetched.root / "passwd.yaml"
    assert not link.is_symlink() and link.read_text() == "/etc/passwd"


def test_git_variables_of_the_caller_cannot_redirect_the_checkout(
    repo: Repo, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = repo.commit({"a.yaml": "a: 1\n"})
    monkeypatch.setenv("GIT_DIR", str(repo.work / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(repo.work))
    fetched = GitSource(url=str(repo.bare), checkout_dir=checkout).fetch()
    assert fetched.revision == sha and (checkout / ".git").is_dir()


def test_a_broken_checkout_or_stale_lock_is_recovered(repo: Repo, checkout: Path) -> None:
    repo.commit({"a.yaml": "a: 1\n"})
    source = GitSource(url=str(repo.bare), checkout_dir=checkout)
    source.fetch()
    (checkout / ".git" / "index.lock").write_text("")  # a killed git left it
    sha = repo.commit({"a.yaml": "a: 2\n"})
    assert source.fetch().revision == sha
    (checkout / ".git" / "HEAD").write_text("garbage\n")  # not a repository any more
    assert source.fetch().revision == sha
    assert (checkout / "a.yaml").read_text() == "a: 2\n"


def test_missing_keyring_is_refused_before_checkout(repo: Repo, checkout: Path) -> None:
    repo.commit({"a.yaml": "a: 1\n"})
    source = GitSource(
        url=str(repo.bare), checkout_dir=checkout, keyring=checkout.parent / "none.asc"
    )
    with pytest.raises(SourceError, match=r"--git-verify-keyring .*none\.asc: no such file"):
        source.fetch()
    assert not (checkout / "a.yaml").exists()


def test_a_timed_out_command_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(SourceError, match=r"git fetch for x: timed out after 0\.5s"):
        run_command(
            ["sh", "-c", script], cwd=tmp_path, env=os.environ, timeout=0.5, what="git fetch for x"
        )
    child = int(pid_file.read_text())
    # The child was killed with its group; it is a zombie or gone (reaped by init), never
    # still sleeping.
    try:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in {"Z", "X", "gone"}, f"child {child} survived in state {state}"


def test_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no-such-gpg is not installed"):
        run_command(
            ["no-such-gpg"], cwd=tmp_path, env=os.environ, timeout=5, what="verify signatures"
        )


def test_directory_source(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)
    assert source.fetch() == Fetched(root=tmp_path)
    assert source.record() == SourceRecord(kind="directory", path=str(tmp_path.resolve()))
    with pytest.raises(SourceError, match="never means 'delete everything'"):
        DirectorySource(tmp_path / "missing").fetch()

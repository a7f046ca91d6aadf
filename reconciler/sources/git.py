"""The git source: one commit of a repository is the desired state (GitOps).

The checkout. Each instance owns a private working tree at `<state-dir>/<instance>/git`
(the state directory is mode 0700). The caller holds the instance lock, so one git
command of the instance runs at a time. Every `fetch()`:

1. `git init` once (again, if the tree is not a usable repository any more);
2. fetches every branch and tag of the remote into a private namespace
   (`refs/reconciler/heads/*`, `refs/reconciler/tags/*`), pruning deleted ones. A full
   fetch, not a shallow one: a commit REF must be reachable to be found;
3. resolves REF to a commit: a tag, then a branch (git's own order), then a commit sha,
   full or abbreviated; `refs/...` is taken as is; no REF is the remote's default branch;
4. verifies the commit's signature when a keyring is given (below) *before* the working
   tree is touched, so a refused commit is never even checked out;
5. `git checkout --force --detach <sha>` and `git clean -ffdx`: the tree is then exactly
   the commit, whatever a previous run (or a person) left in it;
6. returns `Fetched(root=<checkout>/<path>, revision=<sha>)`, or raises `SourceError`
   with one line saying what failed and what to check.

Safety. git runs without a terminal (a new session, stdin from /dev/null) and without
prompts (`GIT_TERMINAL_PROMPT=0`, empty askpass), with a timeout on every call (the whole
process group is killed when it expires), only the file, git, http(s) and ssh transports
(`ext::` runs arbitrary commands), no hooks, and symlinks checked out as plain files (a
repository cannot make the loader read host files through a link). `GIT_DIR` and
`GIT_WORK_TREE` always name the checkout, so a damaged checkout can never make git
wander up into an enclosing repository. Credentials come from the user's git
configuration (credential helpers, ssh agent, `insteadOf` rules) or from the URL; the
URL reaches git through the environment (`GIT_CONFIG_*`), never through a command line
that other users can read in /proc, and `redact_url` / `GitSource.redact` strip
`user:password@` from everything shown: status, events, errors.

Signatures. With a keyring (a public key file made by `gpg --export [--armor]`), the
commit must carry an OpenPGP signature by one of its keys. The keyring is imported into a
throwaway GNUPGHOME, `git verify-commit --raw` checks the commit against it, and only a
`GOODSIG` with a `VALIDSIG` passes; no signature, an unknown key, or a bad, expired or
revoked signature is refused. Trust levels are not consulted: being in the keyring is the
trust decision.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from reconciler.sources import Fetched, SourceError, short_revision
from reconciler.state.conditions import now_rfc3339, set_condition
from reconciler.state.model import SourceRecord

FETCH_TIMEOUT = 120.0  # seconds: a fetch of a large repository over a slow link
LOCAL_TIMEOUT = 60.0  # seconds: every other git or gpg call (all local)
DEFAULT_REF = "HEAD"
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
_SCHEMES = frozenset({"file", "git", "http", "https", "ssh", "git+ssh", "ssh+git"})
_NAMESPACE = "refs/reconciler"
_MAX_MESSAGE = 300
# Variables that would point git at another repository than our checkout (set, for
# example, when the reconciler runs from inside a git hook).
_REPOSITORY_VARIABLES = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
        "GIT_QUARANTINE_PATH",
        "GNUPGHOME",
        "SSH_ASKPASS",
        "SSH_ASKPASS_REQUIRE",
    }
)


# --------------------------------------------------------------------------- credentials

# scheme://userinfo@ - greedy up to the last "@" before the host's "/", because a raw
# "@" in a password is still part of the password.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")


def _is_ssh(scheme: str) -> bool:
    return "ssh" in scheme.lower()


def _strip_userinfo(match: re.Match[str]) -> str:
    scheme = match["scheme"]
    if _is_ssh(scheme):
        # An ssh user name (`git@`) is an address, not a secret; a password would be.
        user = match["userinfo"].split(":", 1)[0]
        return f"{scheme}{user}@" if user else scheme
    # For http(s) even a lone user name is often a token (`https://<token>@host/...`).
    return scheme


def redact_url(url: str) -> str:
    """`url` without credentials: `https://user:secret@host/r.git` -> `https://host/r.git`."""
    return _USERINFO.sub(_strip_userinfo, url)


def url_secrets(url: str) -> tuple[str, ...]:
    """The credential strings inside `url` (raw and percent-decoded), to scrub from text."""
    found: set[str] = set()
    for match in _USERINFO.finditer(url):
        user, colon, password = match["userinfo"].partition(":")
        # A lone http(s) user name is usually a token; beside a password it is just a name.
        parts = [password] if colon or _is_ssh(match["scheme"]) else [user]
        for part in parts:
            found.update(p for p in (part, unquote(part)) if len(p) >= 3)
    return tuple(sorted(found, key=len, reverse=True))


def redact_text(text: str, *, secrets: Sequence[str] = ()) -> str:
    """`text` with URL credentials removed and every known secret replaced by `***`.

    Secrets shorter than 3 characters are left alone: replacing every "a" in a message
    would make it unreadable, and no credential is that short.
    """
    text = _USERINFO.sub(_strip_userinfo, text)
    for secret in secrets:
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- URL, ref, path

# `[user@]host:path`: git's scp-like ssh syntax - a ":" before any "/".
_SCP_LIKE = re.compile(r"^[^/:]+:")


def normalize_url(url: str, *, cwd: Path) -> str:
    """Check `url` and make a relative local path absolute (git runs in the checkout).

    Accepts `file://`, `git://`, `http(s)://`, `ssh://` URLs, scp-like `host:path`, and
    local paths. Raises SourceError for anything else.
    """
    shown = redact_url(url)
    if not url or url != url.strip() or any(c in url for c in "\0\n\r"):
        raise SourceError(f"--git-url {shown!r}: not a URL or path (empty, or stray whitespace)")
    if url.startswith("-"):
        raise SourceError(f"--git-url {shown!r}: a URL cannot start with '-'")
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in _SCHEMES:
            raise SourceError(
                f"--git-url {shown!r}: unsupported scheme {scheme!r}; use file://, https://, "
                "ssh://, git://, host:path or a local path"
            )
        return url
    if "::" in url:  # git's `<transport>::<address>` (ext::, fd::): never
        raise SourceError(
            f"--git-url {shown!r}: transport syntax '<transport>::' is not allowed; "
            "use file://, https://, ssh:// or a local path"
        )
    if _SCP_LIKE.match(url):
        return url
    return os.path.abspath(cwd / url)


class RefKind(enum.Enum):
    """How a REF is looked up."""

    DEFAULT = "default"  # the remote's default branch (its HEAD)
    FULL = "full"  # `refs/...`, fetched exactly
    COMMIT = "commit"  # a full commit sha
    NAME = "name"  # a tag, then a branch, then an abbreviated sha


_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{4,63}$")
# git check-ref-format's rules, enough to keep a REF from being an option or a refspec.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(?:/|$)|^/|/$|\.$")


def classify_ref(ref: str | None) -> RefKind:
    """How to resolve `ref`; raises SourceError for a name git would not accept."""
    if ref is None or ref == DEFAULT_REF:
        return RefKind.DEFAULT
    if not ref or ref.startswith(("-", ".")) or ref == "@" or _BAD_REF.search(ref):
        raise SourceError(
            f"--git-ref {ref!r} is not a valid branch, tag or commit name "
            "(see `git check-ref-format`)"
        )
    if _FULL_SHA.match(ref):
        return RefKind.COMMIT
    if ref.startswith("refs/"):
        return RefKind.FULL
    return RefKind.NAME


def is_abbreviated_sha(ref: str) -> bool:
    """True when `ref` could be an abbreviated commit sha (4 or more hex digits)."""
    return bool(_SHORT_SHA.match(ref))


def normalize_repo_path(path: str) -> str:
    """`--git-path` as a clean relative path inside the repository ("." for the root)."""
    pure = PurePosixPath(path or ".")
    if pure.is_absolute() or ".." in pure.parts or ".git" in pure.parts or "\0" in path:
        raise SourceError(
            f"--git-path {path!r}: must be a folder inside the repository, relative to its "
            "root, without '..' or '.git'"
        )
    return str(pure)


# --------------------------------------------------------------------------- git's output


_FETCH_NOISE = (
    "could not read from remote repository.",
    "please make sure you have the correct access rights",
    "and the repository exists.",
)
# (what git said, what to tell the user, whether the hint replaces git's words)
_FETCH_HINTS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (
        re.compile(r"couldn't find remote ref HEAD", re.I),
        "the repository has no default branch (is it empty?); pass --git-ref BRANCH",
        True,
    ),
    (re.compile(r"couldn't find remote ref", re.I), "check --git-ref", False),
    (
        re.compile(r"does not appear to be a git repository|not found", re.I),
        "check --git-url",
        False,
    ),
    (
        re.compile(
            r"authentication failed|could not read (username|password)|permission denied|"
            r"terminal prompts disabled|\b403\b",
            re.I,
        ),
        "check the credentials in your git configuration or ssh agent",
        False,
    ),
    (
        re.compile(r"host key verification failed", re.I),
        "add the host key to ~/.ssh/known_hosts",
        False,
    ),
    (
        re.compile(
            r"could not resolve host|failed to connect|connection refused|connection timed out|"
            r"network is unreachable|no route to host",
            re.I,
        ),
        "is the host reachable?",
        False,
    ),
)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def explain_fetch_error(stderr: str) -> str:
    """git fetch's stderr as one line: git's own reason plus what to check."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [
        line
        for line in lines
        if not re.sub(r"^(fatal|error): ", "", line).lower().startswith(_FETCH_NOISE)
    ]
    reasons = [
        re.sub(r"^(fatal|error): ", "", line)
        for line in useful
        if line.startswith(("fatal: ", "error: "))
    ]
    reason = "; ".join(dict.fromkeys(reasons)) or (useful[-1] if useful else "")
    reason = reason or (lines[-1] if lines else "git fetch failed without a message")
    for pattern, hint, replaces in _FETCH_HINTS:
        if pattern.search(reason):
            return _one_line(hint if replaces else f"{reason} ({hint})")
    return _one_line(reason)


@dataclass(frozen=True)
class SignatureCheck:
    """What gpg's status lines say about a commit's signature."""

    good: bool
    fingerprint: str | None = None  # the signing (primary) key, when the signature is good
    problem: str = ""  # why it is not good, for the user


def parse_gpg_status(text: str) -> SignatureCheck:
    """Read `[GNUPG:]` status lines (`git verify-commit --raw`); good only if GOODSIG+VALIDSIG.

    Anything bad anywhere wins: a commit is refused when any signature on it is bad.
    """
    status: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("[GNUPG:] "):
            keyword, *args = line[len("[GNUPG:] ") :].split()
            status.setdefault(keyword, args)
    key = next(
        (status[k][0] for k in ("BADSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG") if status.get(k)),
        "?",
    )
    if "BADSIG" in status:
        return SignatureCheck(good=False, problem=f"bad signature by key {key} (altered?)")
    if "REVKEYSIG" in status:
        return SignatureCheck(good=False, problem=f"signed by revoked key {key}")
    if "EXPKEYSIG" in status:
        return SignatureCheck(good=False, problem=f"signed by expired key {key}")
    if "EXPSIG" in status:
        return SignatureCheck(good=False, problem="the signature has expired")
    if "ERRSIG" in status or "NO_PUBKEY" in status:
        keyid = (status.get("NO_PUBKEY") or status.get("ERRSIG") or ["?"])[0]
        return SignatureCheck(good=False, problem=f"signed by unknown key {keyid}")
    valid = status.get("VALIDSIG")
    if "GOODSIG" in status and valid:
        # VALIDSIG <fpr> <date> <ts> <expire> <version> <reserved> <algo> <hash> <class> <primary>
        primary = valid[9] if len(valid) > 9 else valid[0]
        return SignatureCheck(good=True, fingerprint=primary)
    if not status:
        return SignatureCheck(good=False, problem="the commit is not signed")
    return SignatureCheck(good=False, problem="no valid signature")


# --------------------------------------------------------------------------- running git


def git_environment(base: Mapping[str, str], *, remote_url: str | None = None) -> dict[str, str]:
    """The environment for every git call: no prompts, no foreign repository, few protocols.

    `remote_url` becomes `remote.origin.url` through `GIT_CONFIG_COUNT/KEY/VALUE`, appended
    after any the caller already set, so the URL (and its credentials) never appears on a
    command line.
    """
    env = {k: v for k, v in base.items() if k not in _REPOSITORY_VARIABLES}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="",  # set but empty: git then uses neither core.askPass nor SSH_ASKPASS
        GCM_INTERACTIVE="never",  # git-credential-manager
        GIT_ALLOW_PROTOCOL=ALLOWED_PROTOCOLS,
        GIT_HTTP_LOW_SPEED_LIMIT="1",  # bytes/s; with the time below: a stalled transfer ends
        GIT_HTTP_LOW_SPEED_TIME="60",
        LC_ALL="C",  # git's messages in English: explain_fetch_error reads them
    )
    if remote_url is not None:
        try:
            count = max(int(env.get("GIT_CONFIG_COUNT", "0") or "0"), 0)
        except ValueError:
            count = 0
        env[f"GIT_CONFIG_KEY_{count}"] = "remote.origin.url"
        env[f"GIT_CONFIG_VALUE_{count}"] = remote_url
        env["GIT_CONFIG_COUNT"] = str(count + 1)
    return env


@dataclass(frozen=True)
class Completed:
    """A finished command: exit code and decoded output."""

    returncode: int
    stdout: str
    stderr: str


def run_command(
    cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float, what: str
) -> Completed:
    """Run `cmd` in its own session; on timeout kill its whole process group.

    A new session has no controlling terminal, so nothing git starts (ssh, a credential
    helper) can prompt; killing the group ends those helpers with git.
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        if exc.filename != cmd[0]:
            raise
        raise SourceError(
            f"{cmd[0]} is not installed; install it (apt install {cmd[0]}) to {what}"
        ) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        # Timeout or Ctrl-C: the group id is the child's pid, and the child is not reaped
        # yet, so the id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise SourceError(f"{what}: timed out after {timeout:g}s") from None
        raise
    return Completed(
        proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    )


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class GitSource:
    """A repository, a REF and a folder in it; `fetch()` checks the commit out.

    `url` is normalised at construction (a relative path is made absolute); `ref` None
    means the remote's default branch. Construction raises SourceError for an invalid
    URL, REF or path, before anything runs.
    """

    url: str
    checkout_dir: Path
    ref: str | None = None
    path: str = "."
    keyring: Path | None = None
    fetch_timeout: float = FETCH_TIMEOUT
    timeout: float = LOCAL_TIMEOUT
    cwd: Path = field(default_factory=Path.cwd, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, so every later use agrees.
        object.__setattr__(self, "url", normalize_url(self.url, cwd=self.cwd))
        object.__setattr__(self, "path", normalize_repo_path(self.path))
        classify_ref(self.ref)

    # ------------------------------------------------------------------ showing

    @property
    def display_url(self) -> str:
        """The URL without credentials: the only form that is ever shown or recorded."""
        return redact_url(self.url)

    @property
    def display_ref(self) -> str:
        """The REF as recorded (`HEAD` for the default branch)."""
        return self.ref or DEFAULT_REF

    def redact(self, text: str) -> str:
        """`text` with this URL's credentials removed."""
        return redact_text(text, secrets=url_secrets(self.url))

    def __repr__(self) -> str:
        return f"GitSource(url={self.display_url!r}, ref={self.display_ref!r}, path={self.path!r})"

    def manifest_errors(self, fetched: Fetched, errors: Sequence[str]) -> list[str]:
        """Loader errors (`web.yaml:3: ...`, relative to --git-path) as the repository
        has them: `rev abc1234: envs/web.yaml:3: ...`."""
        prefix = "" if self.path == "." else f"{self.path}/"
        return [f"rev {fetched.short}: {prefix}{line}" for line in errors]

    # ------------------------------------------------------------------ records

    def applied(
        self, fetched: Fetched, *, now: str | None = None, previous: SourceRecord | None = None
    ) -> SourceRecord:
        """The state's `source` after `fetched` was applied (`Stalled` False)."""
        conditions = set_condition(
            previous.conditions if previous else [],
            type="Stalled",
            status="False",
            reason="Synced",
            message=f"revision {fetched.revision}",
        )
        return SourceRecord(
            kind="git",
            url=self.display_url,
            ref=self.display_ref,
            path=self.path,
            revision=fetched.revision,
            last_attempted_revision=fetched.revision,
            last_fetch_time=now or now_rfc3339(),
            last_error=None,
            suspended=False,
            conditions=conditions,
        )

    def failed(
        self,
        previous: SourceRecord,
        *,
        error: str,
        revision: str | None,
        now: str | None = None,
    ) -> SourceRecord:
        """The state's `source` after a refused fetch or revision: `revision` stays.

        `revision` is the commit that was attempted, when it was resolved. The last
        applied revision is kept only when it came from this same repository.
        """
        same = previous.kind == "git" and previous.url == self.display_url
        return SourceRecord(
            kind="git",
            url=self.display_url,
            ref=self.display_ref,
            path=self.path,
            revision=previous.revision if same else None,
            last_attempted_revision=revision
            or (previous.last_attempted_revision if same else None),
            last_fetch_time=now or now_rfc3339(),
            last_error=self.redact(_one_line(error)),
            suspended=previous.suspended,
            conditions=set_condition(
                previous.conditions,
                type="Stalled",
                status="True",
                reason="SyncFailed",
                message=self.redact(_one_line(error)),
            ),
        )

    # ------------------------------------------------------------------ fetch

    def fetch(self) -> Fetched:
        """Bring the checkout to the commit REF resolves to; see the module docstring.

        The caller must hold the instance lock. Raises SourceError (message redacted).
        """
        kind = classify_ref(self.ref)
        try:
            self._prepare()
            self._fetch_refs(kind)
            sha = self._resolve(kind)
            if self.keyring is not None:
                self._verify(sha)
            self._checkout(sha)
            return Fetched(root=self._root(sha), revision=sha)
        except SourceError as exc:
            raise SourceError(self.redact(exc.message), revision=exc.revision) from None

    def _git(
        self, *args: str, timeout: float | None = None, env: Mapping[str, str] | None = None
    ) -> Completed:
        base = git_environment(os.environ, remote_url=self.url) if env is None else env
        # Always our checkout: never a repository git would discover above it.
        scoped = dict(base, GIT_DIR=str(self.checkout_dir / ".git"))
        scoped["GIT_WORK_TREE"] = str(self.checkout_dir)
        return run_command(
            ["git", *args],
            cwd=self.checkout_dir,
            env=scoped,
            timeout=self.timeout if timeout is None else timeout,
            what=f"git {_subcommand(args)} for {self.display_url}",
        )

    def _prepare(self) -> None:
        """A usable repository in the checkout dir: reuse it, or start afresh."""
        git_dir = self.checkout_dir / ".git"
        usable = (
            git_dir.is_dir()
            and not self.checkout_dir.is_symlink()
            and self._git("rev-parse", "--git-dir").returncode == 0
        )
        if usable:
            _remove_stale_locks(git_dir)
            return
        if self.checkout_dir.is_symlink() or self.checkout_dir.is_file():
            self.checkout_dir.unlink()
        elif self.checkout_dir.exists():
            shutil.rmtree(self.checkout_dir)
        self.checkout_dir.mkdir(mode=0o700, parents=True)
        done = self._git("-c", "init.defaultBranch=reconciler", "init", "--quiet")
        if done.returncode != 0:
            raise SourceError(
                f"cannot create the git checkout {self.checkout_dir}: {_one_line(done.stderr)}"
            )

    def _fetch_refs(self, kind: RefKind) -> None:
        refspecs = [f"+refs/heads/*:{_NAMESPACE}/heads/*", f"+refs/tags/*:{_NAMESPACE}/tags/*"]
        if kind is RefKind.DEFAULT:
            refspecs.append(f"+HEAD:{_NAMESPACE}/HEAD")
        elif kind is RefKind.FULL:
            refspecs.append(f"+{self.ref}:{_NAMESPACE}/requested")
        done = self._git(
            "fetch",
            "--quiet",
            "--force",
            "--prune",
            "--no-tags",
            "--no-recurse-submodules",
            "--no-write-fetch-head",
            "origin",
            *refspecs,
            timeout=self.fetch_timeout,
        )
        if done.returncode != 0:
            raise SourceError(
                f"cannot fetch {self.display_url}: {explain_fetch_error(self.redact(done.stderr))}"
            )

    def _resolve(self, kind: RefKind) -> str:
        ref = self.display_ref
        if kind is RefKind.DEFAULT:
            candidates = [f"{_NAMESPACE}/HEAD"]
        elif kind is RefKind.FULL:
            candidates = [f"{_NAMESPACE}/requested"]
        elif kind is RefKind.COMMIT:
            candidates = [ref]
        else:
            candidates = [f"{_NAMESPACE}/tags/{ref}", f"{_NAMESPACE}/heads/{ref}"]
            if is_abbreviated_sha(ref):
                candidates.append(ref)
        for candidate in candidates:
            sha = self._rev_parse(candidate)
            if sha is not None:
                return sha
        if kind is RefKind.COMMIT:
            # Not on any branch or tag: some servers still serve a commit asked for by sha.
            self._git("fetch", "--quiet", "--no-write-fetch-head", "origin", ref)
            sha = self._rev_parse(ref)
            if sha is not None:
                return sha
        raise SourceError(
            f"{self.display_url} has no branch, tag or commit {ref!r}; check --git-ref"
        )

    def _rev_parse(self, name: str) -> str | None:
        done = self._git(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}"
        )
        sha = done.stdout.strip()
        return sha if done.returncode == 0 and _FULL_SHA.match(sha) else None

    def _verify(self, sha: str) -> None:
        keyring = self.keyring
        assert keyring is not None
        short = short_revision(sha)
        if not keyring.is_file():
            raise SourceError(
                f"--git-verify-keyring {keyring}: no such file; export the trusted public "
                "keys with `gpg --export --armor KEYID > FILE`",
                revision=sha,
            )
        with tempfile.TemporaryDirectory(prefix="reconciler-gpg-") as home:
            try:
                check = self._verify_in(Path(home), sha=sha, keyring=keyring)
            finally:
                _stop_gpg_agent(Path(home), timeout=self.timeout)
        if not check.good:
            raise SourceError(
                f"commit {short} is not signed by a key in {keyring}: {check.problem}; "
                "refusing to apply it",
                revision=sha,
            )

    def _verify_in(self, home: Path, *, sha: str, keyring: Path) -> SignatureCheck:
        home.chmod(0o700)
        env = git_environment(os.environ)
        env["GNUPGHOME"] = str(home)
        imported = run_command(
            ["gpg", "--batch", "--no-autostart", "--status-fd", "1", "--import", str(keyring)],
            cwd=home,
            env=env,
            timeout=self.timeout,
            what="verify signatures (gpg)",
        )
        if "[GNUPG:] IMPORT_OK" not in imported.stdout:
            raise SourceError(
                f"--git-verify-keyring {keyring} holds no OpenPGP public key gpg can import "
                "(export one with `gpg --export --armor KEYID`)",
                revision=sha,
            )
        done = self._git(
            "-c",
            "gpg.format=openpgp",
            "-c",
            "gpg.program=gpg",
            "verify-commit",
            "--raw",
            sha,
            env=env,
        )
        return parse_gpg_status(done.stderr)

    def _checkout(self, sha: str) -> None:
        done = self._git(
            "-c",
            "advice.detachedHead=false",
            "-c",
            "core.symlinks=false",  # a link in the repository becomes a file holding its target
            "-c",
            "core.hooksPath=/dev/null",  # no post-checkout hook from anyone's configuration
            "checkout",
            "--quiet",
            "--force",
            "--detach",
            sha,
        )
        if done.returncode == 0:
            done = self._git("clean", "-ffdxq")
        if done.returncode != 0:
            raise SourceError(
                f"cannot check out {short_revision(sha)} into {self.checkout_dir}: "
                f"{_one_line(done.stderr)}",
                revision=sha,
            )

    def _root(self, sha: str) -> Path:
        root = self.checkout_dir.joinpath(*PurePosixPath(self.path).parts)
        where = f"{self.display_url} at {short_revision(sha)}"
        if not os.path.lexists(root):
            raise SourceError(
                f"--git-path {self.path!r} does not exist in {where}; check the path "
                "(a missing path never means 'delete everything')",
                revision=sha,
            )
        top = self.checkout_dir.resolve()
        real = root.resolve()
        if real != top and top not in real.parents:
            raise SourceError(f"--git-path {self.path!r} leads outside the checkout", revision=sha)
        return root


def _subcommand(args: Sequence[str]) -> str:
    """`fetch` of `-c x=y fetch --quiet ...`: for messages."""
    rest = list(args)
    while len(rest) > 1 and rest[0] == "-c":
        rest = rest[2:]
    return rest[0] if rest else "git"


def _remove_stale_locks(git_dir: Path) -> None:
    """Lock files a killed git left behind (we hold the instance lock: none is live)."""
    for name in ("index.lock", "HEAD.lock", "config.lock", "packed-refs.lock", "shallow.lock"):
        with contextlib.suppress(FileNotFoundError):
            (git_dir / name).unlink()
    for lock in (git_dir / "refs").rglob("*.lock"):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _stop_gpg_agent(home: Path, *, timeout: float) -> None:
    """Stop an agent gpg may have started in a throwaway home (its socket is the sign)."""
    if not any(home.glob("S.gpg-agent*")):
        return
    with contextlib.suppress(SourceError):
        run_command(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            cwd=home,
            env=dict(os.environ, GNUPGHOME=str(home)),
            timeout=timeout,
            what="stop gpg-agent",
        )

"""nftables commands in-process through libnftables (ctypes), or through the `nft` binary.

Why: `nft` is a front end to `libnftables.so.1`, the library that parses nft syntax,
talks netlink and prints JSON. Forking the ~56 MB controller to run it costs ~3 ms plus
nft's own start-up, several times per reconcile and on every health pass; calling the
library costs ~0.2 ms per listing. `LibNftables` does that; `NftBinary` runs the `nft`
command as before and is the fallback where the library cannot be loaded. Both answer
the same two requests (`list_json`, `apply`) with the same `NftResult`, so everything
that parses or judges their answers is written once (the firewall driver, `error_line`).

The ABI (include/nftables/libnftables.h; symbols versioned LIBNFTABLES_1, stable since
nftables 0.9): `nft_ctx_new(0)` makes a context and opens its netlink socket;
`nft_ctx_output_set_flags` (bit 4: JSON); `nft_ctx_buffer_output` / `_error` capture
what nft would print; `nft_run_cmd_from_buffer` / `_from_filename` run commands and
return 0 on success; `nft_ctx_get_output_buffer` / `_error_buffer` hand the text over
(and rewind it); `nft_ctx_free`.

Facts measured on nftables 1.0.6 (Debian 12) that shape this module:

- Namespace. The context opens its netfilter socket once, in `nft_ctx_new`, in the network
  namespace of the calling thread, and uses it for every later command wherever the
  caller is by then. A forked `nft` acts in the namespace of the thread that forked it.
  To act exactly like that, a context remembers its namespace (/proc/thread-self/ns/net)
  and is replaced when a call comes from another one. While the context lives, its socket
  pins that namespace, so the remembered identity cannot be reused by a new one.
- Threads. A context must not be used by two threads at once, and the library has
  process-wide state besides (an interface cache, one-time init): one process-wide lock
  around every call. It is re-entrant because a context freed by the garbage collector
  frees itself in whatever thread collected it.
- Failure to open the socket makes `nft_ctx_new` call exit(): the whole controller would
  vanish. A NETLINK_NETFILTER socket is opened and closed first, so that failure becomes
  a `KernelError` instead. And the socket is opened without close-on-exec: it is marked
  so right after, or every workload would inherit it.
- Errors. From a file, nft prints `FILE:LINE:COLS: Error: ...` and echoes the failing
  line, exactly as `nft -f -` does; from a buffer, 1.0.6 echoes the first line of the
  input whatever line failed. So `apply` writes the script to a memfd and runs it as a
  file: the same single batch (one transaction) as `nft -f`, the same messages.
- Listing re-reads the kernel every time (list commands force a cache refresh), so set
  counters are current. A buffer listing two tables fails on 1.0.6 (its cache filter
  keeps only the last `list table`, and the first then reports ENOENT): callers list one
  table per command.
- Listing is not cheap even in-process: nft turns every rule back into expressions and
  prints them, ~10 us per rule as text and ~25 us as JSON (200 envs: ~13 ms for the inet
  table). Hence `generation()`: the kernel bumps a per-namespace generation number on
  every transaction that changes anything (an empty or failed one changes nothing and
  bumps nothing); the packet path adding to a dynamic set is not a transaction. Same
  generation, same namespace: the tables are what they were at the last listing. One
  request, ~10 us. The namespace is named by its cookie (SO_NETNS_COOKIE), which is never
  reused, unlike a namespace inode once the namespace is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import struct
import subprocess
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from reconciler.errors import KernelError

LIBRARY = "libnftables.so.1"
Backend = Literal["auto", "library", "binary"]

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_NETLINK_NETFILTER = 12  # linux/netlink.h; not exported by Python's socket module
# asm-generic/socket.h (x86-64, arm64, ...); Python 3.11 does not export it.
_SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)
# NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN; the reply carries NFTA_GEN_ID (attribute 1).
_GETGEN = (10 << 8) | 16
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NFTA_GEN_ID = 1
_ECHO_MAX = 120  # characters of a failing script line quoted in an error
# `FILE:LINE:FIRST-LAST: Error: ...` (FILE is /dev/stdin for `nft -f -`, a memfd path here)
_LOCATED = re.compile(r"^\S+:(?P<line>\d+):(?P<col>\d+)(?:-\d+)?: (?P<message>.*)$")

# Every libnftables call in the process, whichever context: see the module docstring.
_LOCK = threading.RLock()


@dataclass(frozen=True)
class NftResult:
    """What one nft request answered: success, and the text nft printed to each stream."""

    ok: bool
    output: str
    error: str


class NftRunner(Protocol):
    """Runs nft requests; `LibNftables` and `NftBinary` are the two implementations."""

    @property
    def name(self) -> str:
        """What runs the requests, for messages and status."""
        ...

    def list_json(self, command: str) -> NftResult:
        """Run one `list ...` command with JSON output (`nft -j COMMAND`)."""
        ...

    def apply(self, script: str) -> NftResult:
        """Run `script` as one transaction (`nft -f`): all of it or nothing."""
        ...

    def close(self) -> None:
        """Release what the runner holds; it may be used again afterwards."""
        ...


# --------------------------------------------------------------------------- the library


class _Lib:
    """libnftables' functions with their C signatures, typed for the rest of the module."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        ptr, text = ctypes.c_void_p, ctypes.c_char_p
        signatures: dict[str, tuple[list[type], type | None]] = {
            "nft_ctx_new": ([ctypes.c_uint32], ptr),
            "nft_ctx_free": ([ptr], None),
            "nft_ctx_output_set_flags": ([ptr, ctypes.c_uint], None),
            "nft_ctx_buffer_output": ([ptr], ctypes.c_int),
            "nft_ctx_buffer_error": ([ptr], ctypes.c_int),
            "nft_ctx_get_output_buffer": ([ptr], text),
            "nft_ctx_get_error_buffer": ([ptr], text),
            "nft_run_cmd_from_buffer": ([ptr, text], ctypes.c_int),
            "nft_run_cmd_from_filename": ([ptr, text], ctypes.c_int),
        }
        for symbol, (argtypes, restype) in signatures.items():
            function = getattr(cdll, symbol)  # AttributeError: not a libnftables we know
            function.argtypes, function.restype = argtypes, restype
        self._c = cdll

    def new(self) -> int | None:
        ctx: int | None = self._c.nft_ctx_new(0)  # NFT_CTX_DEFAULT: with netlink socket
        return ctx

    def free(self, ctx: int) -> None:
        self._c.nft_ctx_free(ctx)

    def buffer_streams(self, ctx: int) -> bool:
        return bool(self._c.nft_ctx_buffer_output(ctx) == 0 == self._c.nft_ctx_buffer_error(ctx))

    def run(self, ctx: int, *, text: bytes, json: bool, from_file: bool) -> NftResult:
        self._c.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON if json else 0)
        run = self._c.nft_run_cmd_from_filename if from_file else self._c.nft_run_cmd_from_buffer
        rc = run(ctx, text)
        output: bytes = self._c.nft_ctx_get_output_buffer(ctx) or b""
        error: bytes = self._c.nft_ctx_get_error_buffer(ctx) or b""
        return NftResult(
            ok=rc == 0,
            output=output.decode(errors="replace"),
            error=error.decode(errors="replace"),
        )


_loaded: _Lib | None = None
_load_error: str | None = None


def load_library() -> _Lib:
    """libnftables, loaded once per process; KernelError when it cannot be."""
    global _loaded, _load_error
    with _LOCK:
        if _loaded is None and _load_error is None:
            try:
                _loaded = _Lib(ctypes.CDLL(LIBRARY))
            except (OSError, AttributeError) as exc:
                _load_error = str(exc)
        if _loaded is None:
            raise KernelError(
                f"cannot load {LIBRARY} ({_load_error}): install libnftables1 "
                "(apt install libnftables1), or let the firewall use the nft binary"
            )
        return _loaded


def _thread_netns() -> tuple[int, int]:
    """The network namespace of the calling thread (not of the process: threads differ)."""
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _socket_fds() -> set[int]:
    """The process's open file descriptors that are sockets."""
    found: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd, too)
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
    return found


def _free_context(free: Callable[[int], None], ctx: int) -> None:
    with _LOCK:
        free(ctx)


class _Context:
    """One nft_ctx, bound to the network namespace it was made in; freed when dropped."""

    def __init__(self, lib: _Lib) -> None:
        self.netns = _thread_netns()
        # nft_ctx_new exit()s the process when it cannot open this socket: try it first.
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER).close()
        except OSError as exc:
            raise KernelError(
                f"cannot open a netfilter netlink socket ({exc}): nftables needs "
                "root (CAP_NET_ADMIN) and the nf_tables kernel module"
            ) from exc
        before = _socket_fds()
        ctx = lib.new()
        # libmnl opens the socket without SOCK_CLOEXEC: every process this controller
        # starts would inherit a netfilter socket of this namespace (a root workload could
        # rewrite the host's firewall through it). Any socket that appeared just now is
        # marked close-on-exec; one another thread opened meanwhile is already (PEP 446).
        for fd in _socket_fds() - before:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if not ctx:
            raise KernelError("libnftables could not create a context (out of memory?)")
        self.ptr = ctx
        self._finalizer = weakref.finalize(self, _free_context, lib.free, ctx)
        if not lib.buffer_streams(ctx):
            self.free()
            raise KernelError("libnftables could not capture its output (fopencookie failed)")

    def free(self) -> None:
        self._finalizer()  # idempotent; also runs on garbage collection and at exit


class LibNftables:
    """nft requests run in-process by libnftables: one context, made lazily, reused.

    Safe to call from any thread; acts in the caller's network namespace, like `nft`.
    """

    def __init__(self) -> None:
        self._lib = load_library()
        self._ctx: _Context | None = None

    @property
    def name(self) -> str:
        return "libnftables"

    def _context(self) -> _Context:
        """The context for the calling thread's namespace (call with `_LOCK` held)."""
        netns = _thread_netns()
        if self._ctx is not None and self._ctx.netns != netns:
            self._ctx.free()
            self._ctx = None
        if self._ctx is None:
            self._ctx = _Context(self._lib)
        return self._ctx

    def list_json(self, command: str) -> NftResult:
        with _LOCK:
            ctx = self._context()
            return self._lib.run(ctx.ptr, text=command.encode(), json=True, from_file=False)

    def apply(self, script: str) -> NftResult:
        fd = os.memfd_create("reconciler-nft", os.MFD_CLOEXEC)
        try:
            os.write(fd, script.encode())
            path = f"/proc/self/fd/{fd}".encode()
            with _LOCK:
                ctx = self._context()
                return self._lib.run(ctx.ptr, text=path, json=False, from_file=True)
        finally:
            os.close(fd)

    def close(self) -> None:
        with _LOCK:
            if self._ctx is not None:
                self._ctx.free()
                self._ctx = None


# --------------------------------------------------------------------------- generation

Generation = tuple[int, int]  # (netns cookie, nftables generation id)


def generation() -> Generation | None:
    """Which nftables ruleset generation the calling thread's namespace is at.

    Equal answers mean no transaction changed anything in between. None when the kernel
    cannot tell (no SO_NETNS_COOKIE before Linux 5.14, no nf_tables): assume a change.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
            (cookie,) = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))
            # nlmsghdr (len, type, flags, seq, pid) + nfgenmsg (AF_UNSPEC, version 0, res_id)
            sock.send(struct.pack("=IHHIIBBH", 20, _GETGEN, _NLM_F_REQUEST, 1, 0, 0, 0, 0))
            # The kernel answers while handling send(): the reply is queued already, and
            # a missing one must not hang the caller.
            reply = sock.recv(4096, socket.MSG_DONTWAIT)
    except OSError:
        return None
    if len(reply) < 20:
        return None
    length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        return None
    offset = 20  # attributes follow the nfgenmsg
    while offset + 4 <= min(length, len(reply)):
        attr_len, attr_type = struct.unpack_from("=HH", reply, offset)
        if attr_len < 4:
            break
        if attr_type == _NFTA_GEN_ID and attr_len >= 8:
            (gen_id,) = struct.unpack_from(">I", reply, offset + 4)
            return cookie, gen_id
        offset += (attr_len + 3) & ~3
    return None


# --------------------------------------------------------------------------- the binary


class NftBinary:
    """nft requests run by the `nft` command, one process each (the fallback)."""

    def __init__(self, *, nft: str = "nft", timeout: float = 10.0) -> None:
        self._nft = nft
        self._timeout = timeout

    @property
    def name(self) -> str:
        return f"{self._nft} binary"

    def _run(self, args: Sequence[str], *, stdin: str | None = None) -> NftResult:
        try:
            done = subprocess.run(
                [self._nft, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise KernelError(
                f"{self._nft} not found: install the nftables package (apt install nftables)"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise KernelError(
                f"`{self._nft} {' '.join(args)}` did not finish in {self._timeout:.0f}s"
            ) from exc
        return NftResult(ok=done.returncode == 0, output=done.stdout, error=done.stderr)

    def list_json(self, command: str) -> NftResult:
        # nft joins its arguments with spaces, so one argument holds the whole command.
        return self._run(["-j", command])

    def apply(self, script: str) -> NftResult:
        return self._run(["-f", "-"], stdin=script)

    def close(self) -> None:
        """Nothing is held between calls."""


def open_runner(*, backend: Backend = "auto", nft: str = "nft", timeout: float = 10.0) -> NftRunner:
    """The library when it loads ("auto") or as demanded; else the `nft` binary."""
    if backend == "binary":
        return NftBinary(nft=nft, timeout=timeout)
    if backend == "library":
        return LibNftables()
    with contextlib.suppress(KernelError):
        return LibNftables()
    return NftBinary(nft=nft, timeout=timeout)


# --------------------------------------------------------------------------- messages


def error_line(stderr: str, *, script: str | None = None) -> str:
    """nft's error output as one line: the first error, and the script line it points at.

    Both runners print `FILE:LINE:COLS: Error: ...` for a script; the file name (a memfd
    or /dev/stdin) means nothing to a user, the line number and its text do.
    """
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "no error output"
    first = next((line for line in lines if "Error:" in line), lines[0])
    located = _LOCATED.match(first)
    if located is None:
        return first
    message, number = located["message"], int(located["line"])
    script_lines = (script or "").splitlines()
    if not 1 <= number <= len(script_lines):
        return f"{message} (line {number})"
    return f"{message} (line {number}: {_excerpt(script_lines[number - 1], int(located['col']))})"


def _excerpt(line: str, column: int) -> str:
    """`line` cut to _ECHO_MAX characters around `column` (1-based): rules can be long."""
    if len(line) <= _ECHO_MAX:
        return line
    start = max(0, min(column - 1 - _ECHO_MAX // 2, len(line) - _ECHO_MAX))
    head = "..." if start > 0 else ""
    tail = "..." if start + _ECHO_MAX < len(line) else ""
    return f"{head}{line[start : start + _ECHO_MAX]}{tail}"

"""Real traffic for isolation tests: listeners and one-shot probes inside network namespaces.

Every probe is a fresh `ip netns exec NS python -c ...` (or plain `python -c` for the
sandbox's root namespace, `ns=None`), so it runs with exactly the namespace's view: its
addresses, routes and neighbour table. Nothing here touches a namespace the test did not
name, and every address is the caller's.

- `Listener`: one process serving several `tcp:PORT` / `udp:PORT` sockets; a TCP client is
  answered "ok", a UDP datagram is echoed back as "ok". Each arrival is reported on
  stdout (`Listener.arrivals`), so a one-way datagram can be checked at the receiver.
  It exits when its stdin closes (leaving the `with` block), or is killed.
- `reach(...)`: True if a TCP connection completes *and* the answer comes back, or a UDP
  datagram's echo comes back, within the timeout. Expected failures use a short timeout
  (`DENY_TIMEOUT`); expected successes a longer one, only ever waited out on failure.
- `send_udp(...)`: one datagram, no answer expected (for paths that cannot answer).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

Proto = Literal["tcp", "udp"]
_PROTOS: dict[str, Proto] = {"tcp": "tcp", "udp": "udp"}

DENY_TIMEOUT = 0.5  # how long a probe expected to fail waits
ALLOW_TIMEOUT = 3.0  # generous: only a failing test ever waits this long
START_TIMEOUT = 10.0

_LISTENER = r"""
import selectors, socket, sys
host, specs = sys.argv[1], sys.argv[2:]
sel = selectors.DefaultSelector()
for spec in specs:
    proto, port = spec.split(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    if proto == "tcp":
        s.listen(16)
    sel.register(s, selectors.EVENT_READ, (proto, int(port)))
sel.register(sys.stdin, selectors.EVENT_READ, None)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.data is None:
            if not sys.stdin.readline():
                sys.exit(0)
            continue
        proto, port = key.data
        if proto == "tcp":
            conn, peer = key.fileobj.accept()
            conn.settimeout(1.0)
            try:
                conn.sendall(b"ok")
            except OSError:
                pass
            conn.close()
        else:
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(b"ok", peer)
        print(f"{proto} {port} {peer[0]}", flush=True)
"""

_PROBE = r"""
import socket, sys
proto, host, port, timeout, source, mode = sys.argv[1:7]
port, timeout = int(port), float(timeout)
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.settimeout(timeout)
if source:
    s.bind((source, 0))
try:
    if proto == "tcp":
        s.connect((host, port))
        ok = s.recv(2) == b"ok"
    elif mode == "oneway":
        s.sendto(b"ping", (host, port))
        ok = True
    else:
        s.sendto(b"ping", (host, port))
        ok = s.recvfrom(16)[0] == b"ok"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
"""


def _command(ns: str | None, script: str, args: Sequence[str]) -> list[str]:
    base = [sys.executable, "-c", script, *args]
    return base if ns is None else ["ip", "netns", "exec", ns, *base]


@dataclass(frozen=True)
class Arrival:
    """One connection or datagram a listener received."""

    proto: Proto
    port: int
    source: str


class Listener:
    """Serve `specs` ("tcp:8080", "udp:5353") on `host` inside `ns` until the block ends."""

    def __init__(self, ns: str | None, specs: Sequence[str], *, host: str = "0.0.0.0") -> None:
        self.ns, self.specs, self.host = ns, tuple(specs), host
        self._proc: subprocess.Popen[bytes] | None = None
        self._seen: list[Arrival] = []
        self._buffer = b""

    def __enter__(self) -> Listener:
        self._proc = subprocess.Popen(
            _command(self.ns, _LISTENER, [self.host, *self.specs]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = self._readline(START_TIMEOUT)
        if line != "ready":
            self._stop()
            err = self._proc.stderr.read().decode() if self._proc.stderr else ""
            raise RuntimeError(f"listener in {self.ns or 'root netns'} did not start: {err}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the listener exits on EOF
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child: its pid cannot have been reused while unreaped
            proc.wait()

    def _readline(self, timeout: float) -> str | None:
        """The next stdout line within `timeout`, or None.

        Reads the raw pipe into our own buffer: a buffered text reader may hold lines
        that `select` can no longer see on the descriptor.
        """
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the listener exited
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def arrivals(self, *, wait: float = 0.0, at_least: int | None = None) -> list[Arrival]:
        """Everything received so far, reading new reports for up to `wait` seconds.

        With `at_least`, return as soon as that many have arrived in total: a check for
        an expected arrival waits only as long as it takes.
        """
        deadline = time.monotonic() + wait
        while at_least is None or len(self._seen) < at_least:
            line = self._readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                break
            proto, port, source = line.split()
            self._seen.append(Arrival(proto=_PROTOS[proto], port=int(port), source=source))
        return list(self._seen)


def _probe(
    ns: str | None,
    proto: Proto,
    host: str,
    port: int,
    *,
    timeout: float,
    source: str | None,
    mode: str,
) -> bool:
    args = [proto, host, str(port), str(timeout), source or "", mode]
    cmd = _command(ns, _PROBE, args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, check=False)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"probe {' '.join(cmd[:4])} failed to run: {result.stderr.strip()}")
    return result.returncode == 0


def reach(
    ns: str | None,
    host: str,
    port: int,
    *,
    proto: Proto = "tcp",
    timeout: float = ALLOW_TIMEOUT,
    source: str | None = None,
) -> bool:
    """True if a `proto` round trip from `ns` to host:port completes within `timeout`."""
    return _probe(ns, proto, host, port, timeout=timeout, source=source, mode="roundtrip")


def send_udp(ns: str | None, host: str, port: int, *, source: str | None = None) -> None:
    """Send one UDP datagram from `ns`; whether it arrives is for the receiver to say."""
    _probe(ns, "udp", host, port, timeout=1.0, source=source, mode="oneway")

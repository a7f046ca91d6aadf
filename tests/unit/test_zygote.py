"""The holder zygote's wire format and chain outcomes (pure; no root, no kernel objects),
and the promise that keeps its start cheap: it imports nothing but a few stdlib modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.kernel import zygote
from reconciler.kernel.zygote import (
    MAX_FDS,
    MAX_MESSAGE,
    Answer,
    ProtocolError,
    Request,
    chain_answer,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    unshare_flags,
)


def _request(**changes: Any) -> Request:
    request = Request(
        request_id=7,
        unshare_flags=unshare_flags({"uts", "ipc", "mnt", "pid"}),
        private_mounts=True,
        mount_proc=True,
        timeout=2.5,
        catatonit="/usr/bin/catatonit",
        hostname="web-1",
        netns_path="/run/netns/rt12345678-web",
        cgroup_procs=(
            "/sys/fs/cgroup/memory/rt12345678/web/cgroup.procs",
            "/sys/fs/cgroup/pids/rt12345678/web/cgroup.procs",
        ),
    )
    return request._replace(**changes)


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"hostname": None, "netns_path": None, "cgroup_procs": ()},
        {"private_mounts": False, "mount_proc": False, "unshare_flags": 0},
        {"netns_path": "/run/netns/with space and ünïcode", "timeout": 0.1},
        {"request_id": 2**40, "cgroup_procs": tuple(f"/c/{i}/cgroup.procs" for i in range(9))},
    ],
)
def test_a_request_survives_the_round_trip(changes: dict[str, Any]) -> None:
    request = _request(**changes)
    assert decode_request(encode_request(request)) == request


def test_fd_count_is_the_pin_plus_one_per_cgroup_file() -> None:
    assert _request().fd_count == 3
    assert _request(netns_path=None).fd_count == 2
    assert _request(netns_path=None, cgroup_procs=()).fd_count == 0


def test_unshare_flags_create_everything_but_net() -> None:
    assert unshare_flags({"net"}) == 0
    assert unshare_flags({"net", "uts", "pid"}) == zygote.CLONE_NEWUTS | zygote.CLONE_NEWPID
    assert unshare_flags(zygote.KNOWN_NAMESPACES) == (
        zygote.CLONE_NEWUTS | zygote.CLONE_NEWIPC | zygote.CLONE_NEWNS | zygote.CLONE_NEWPID
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"netns_path": "/run/netns/a\0b"}, "NUL"),
        ({"hostname": ""}, "spelled None"),
        ({"netns_path": ""}, "spelled None"),
        ({"cgroup_procs": tuple(f"/c/{i}" for i in range(MAX_FDS))}, "fds in one request"),
        ({"cgroup_procs": ("/" + "x" * MAX_MESSAGE,)}, "bytes; at most"),
    ],
)
def test_encode_refuses_what_cannot_travel(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_request(_request(**changes))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"A1\x007\x001234\x00",  # an answer is not a request
        b"R1\x007\x000\x001\x001",  # too few fields
        b"R1\x00seven\x000\x001\x001\x002.5\x00/cat\x00\x00\x00",
        b"R1\x007\x000\x00yes\x001\x002.5\x00/cat\x00\x00\x00",
        b"R1\x007\x000\x001\x001\x00soon\x00/cat\x00\x00\x00",
    ],
)
def test_decode_refuses_malformed_requests(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(data)


def test_requests_are_immutable_values() -> None:
    request = _request()
    with pytest.raises(AttributeError):
        request.timeout = 1.0  # type: ignore[misc]
    assert request == _request()
    assert request != _request(request_id=8)
    assert "request_id=7" in repr(request)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "answer",
    [
        Answer(request_id=3, pid=4242, error=None),
        Answer(request_id=3, pid=0, error="setns /run/netns/x: EINVAL (Invalid argument)"),
    ],
)
def test_an_answer_survives_the_round_trip(answer: Answer) -> None:
    assert decode_answer(encode_answer(answer)) == answer


@pytest.mark.parametrize(
    "answer", [Answer(request_id=3, pid=0, error=None), Answer(request_id=3, pid=9, error="x")]
)
def test_an_answer_has_a_pid_or_an_error(answer: Answer) -> None:
    with pytest.raises(ProtocolError):
        encode_answer(answer)


@pytest.mark.parametrize(
    "data", [b"A1\x003\x000\x00", b"A1\x003\x009\x00oops", b"A1\x003\x00x\x00", b"R1\x003\x009\x00"]
)
def test_decode_refuses_malformed_answers(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_answer(data)


# --------------------------------------------------------------------------- chain outcomes


def _exited(code: int) -> int:
    return code << 8  # a wait status, as waitpid returns it


def test_a_reported_holder_is_the_answer() -> None:
    answer = chain_answer(_request(), output=b"P4321\n", status=_exited(0))
    assert answer == Answer(request_id=7, pid=4321, error=None)


def test_the_first_failure_wins_even_after_the_holder_was_reported() -> None:
    output = b"P4321\nEexec /usr/bin/catatonit: ENOEXEC (Exec format error)\nEsecond\n"
    answer = chain_answer(_request(), output=output, status=_exited(0))
    assert answer == Answer(7, 0, "exec /usr/bin/catatonit: ENOEXEC (Exec format error)")


def test_a_chain_that_says_nothing_is_described_by_its_exit() -> None:
    answer = chain_answer(_request(), output=b"", status=signal.SIGKILL)
    assert answer.error == (
        "the fork chain ended without a running holder "
        "(intermediate process killed by signal 9); check dmesg"
    )
    answer = chain_answer(_request(), output=b"", status=_exited(127))
    assert answer.error is not None
    assert "intermediate process exited with status 127" in answer.error


def test_a_chain_killed_on_timeout_says_so() -> None:
    answer = chain_answer(_request(timeout=2.5), output=b"P4321\n", status=None)
    assert answer == Answer(
        7, 0, "catatonit did not start within 2.5s; check the host's load and dmesg"
    )


# --------------------------------------------------------------------------- self-contained


def test_the_zygote_imports_only_a_few_stdlib_modules() -> None:
    # As the driver starts it: isolated, no site, from its own directory.
    directory = Path(zygote.__file__).parent
    probe = (
        f"import sys; sys.path.append({str(directory)!r}); import zygote; "
        "print(' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={},
        cwd=os.sep,
    )
    modules = set(result.stdout.split())
    assert "zygote" in modules
    assert not {m for m in modules if m.startswith("reconciler")}
    # What would make its start (and every fork) slower and bigger.
    assert not modules & {"typing", "dataclasses", "inspect", "json", "socket", "re"}

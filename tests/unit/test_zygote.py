"""The holder zygote's wire format, how it finds its own cgroups, how it says it ended
(pure; no root, no kernel objects), and the promise that keeps its start cheap: it
imports nothing but a few stdlib modules.
"""

from __future__ import annotations

import os
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
    decode_answer,
    decode_request,
    describe_exit,
    encode_answer,
    encode_request,
    parse_cgroup_homes,
    unshare_flags,
)


def _request(**changes: Any) -> Request:
    request = Request(
        request_id=7,
        unshare_flags=unshare_flags({"uts", "ipc", "mnt", "pid"}),
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
        {"hostname": None, "unshare_flags": 0},
        {"netns_path": "/run/netns/with space and ünïcode"},
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
        # The zygote sets the hostname in itself: outside a new uts that is the host's.
        ({"unshare_flags": zygote.CLONE_NEWNS}, "a hostname needs a new uts namespace"),
        ({"unshare_flags": zygote.CLONE_NEWNET}, "name no known namespace"),
        ({"unshare_flags": -1}, "name no known namespace"),
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
        b"R2\x007\x000\x00/cat\x00",  # too few fields
        b"R1\x007\x000\x00/cat\x00\x00\x00",  # the fork chain's version
        b"R2\x00seven\x000\x00/cat\x00\x00\x00",
        b"R2\x007\x00uts\x00/cat\x00\x00\x00",
        b"R2\x007\x000\x00/cat\x00host\x00\x00",  # a hostname without a new uts
    ],
)
def test_decode_refuses_malformed_requests(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(data)


def test_requests_are_immutable_values() -> None:
    request = _request()
    with pytest.raises(AttributeError):
        request.hostname = "other"  # type: ignore[misc]
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


# --------------------------------------------------------------------------- how it ends


def test_the_zygote_says_how_it_ended() -> None:
    assert describe_exit(9) == "was killed by signal 9"
    assert describe_exit(1 << 8) == "exited with status 1"
    assert describe_exit(zygote.EXIT_STRANDED << 8) == (
        "could not return to its own namespaces or cgroups after a spawn, and exited"
    )


# --------------------------------------------------------------------------- its own cgroups

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 /outer /mnt/with\\040space rw - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_own_cgroups_are_found_per_hierarchy() -> None:
    cgroup = (
        "9:name=systemd:/\n"
        "8:pids:/outer/inner\n"
        "4:memory:/process_api/f2b6\n"
        "2:cpu,cpuacct:/\n"
        "1:freezer:/not-mounted\n"
        "0::/\n"
    )
    assert parse_cgroup_homes(cgroup, MOUNTINFO) == [
        "/sys/fs/cgroup/systemd/cgroup.procs",
        "/mnt/with space/inner/cgroup.procs",
        "/sys/fs/cgroup/memory/process_api/f2b6/cgroup.procs",
        "/sys/fs/cgroup/cpu,cpuacct/cgroup.procs",
        "/sys/fs/cgroup/unified/cgroup.procs",
    ]


def test_a_cgroup_outside_the_mounted_root_has_no_home() -> None:
    # The pids hierarchy is mounted from /outer: a cgroup beside it cannot be reached.
    assert parse_cgroup_homes("8:pids:/outerwear\n8:pids:/\n", MOUNTINFO) == []
    assert parse_cgroup_homes("", MOUNTINFO) == []
    assert parse_cgroup_homes("garbage\n", "") == []


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

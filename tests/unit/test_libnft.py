"""How nft is run, without root: backend choice, the fallback, and nft's errors as one line.

The kernel side (both backends listing and applying, the caller's namespace) is proven
in tests/integration/test_firewall_backends.py.
"""

from __future__ import annotations

import pytest

from reconciler.errors import KernelError
from reconciler.kernel import libnft
from reconciler.kernel.libnft import LibNftables, NftBinary, error_line, open_runner
from tests.gates import unavailable

SCRIPT = "add table inet t\nadd chain inet t c\nadd rule inet t c bogus syntax\n"
STDERR = "{source}:3:20-24: Error: No symbol type information\n{echo}\n                   ^^^^^\n"


@pytest.mark.parametrize("source", ["/dev/stdin", "/proc/self/fd/7"])
def test_a_located_error_names_the_script_line_whatever_the_source(source: str) -> None:
    # nft echoes the failing line itself; the buffer API of 1.0.6 echoes the wrong one,
    # so the line quoted comes from our own script, by number.
    stderr = STDERR.format(source=source, echo="add table inet t")
    assert error_line(stderr, script=SCRIPT) == (
        "Error: No symbol type information (line 3: add rule inet t c bogus syntax)"
    )


def test_an_unlocated_error_is_its_first_error_line() -> None:
    stderr = "Error: No such file or directory\nlist table inet x\n                ^\n"
    assert error_line(stderr) == "Error: No such file or directory"
    assert error_line("\n  \n") == "no error output"
    assert error_line("netlink: Error: Could not process rule\n") == (
        "netlink: Error: Could not process rule"
    )


def test_a_line_outside_the_script_keeps_only_its_number() -> None:
    assert error_line(STDERR.format(source="/dev/stdin", echo="x"), script="one line\n") == (
        "Error: No symbol type information (line 3)"
    )


def test_a_long_failing_line_is_quoted_around_the_error_column() -> None:
    ports = ", ".join(f'"port{i}"' for i in range(80))
    line = f"add rule inet t c iifname {{ {ports} }} bogus drop"
    column = line.index("bogus") + 1
    stderr = f"/dev/stdin:2:{column}-{column + 4}: Error: syntax error\n"
    message = error_line(stderr, script=f"add table inet t\n{line}\n")
    quoted = message.split("(line 2: ", 1)[1].rstrip(")")
    assert quoted.startswith("...") and "bogus" in quoted
    assert len(quoted) <= 120 + len("...") * 2


def test_binary_backend_and_a_missing_binary() -> None:
    runner = open_runner(backend="binary", nft="/nonexistent/nft")
    assert isinstance(runner, NftBinary)
    assert runner.name == "/nonexistent/nft binary"
    with pytest.raises(KernelError, match="not found: install the nftables package"):
        runner.list_json("list tables")
    runner.close()  # nothing held: a no-op


def test_auto_falls_back_to_the_binary_when_the_library_cannot_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing() -> None:
        raise KernelError("cannot load libnftables.so.1 (test)")

    monkeypatch.setattr(libnft, "load_library", missing)
    assert isinstance(open_runner(backend="auto"), NftBinary)
    with pytest.raises(KernelError, match="cannot load"):
        open_runner(backend="library")


def test_the_library_loads_here_without_opening_anything() -> None:
    try:
        libnft.load_library()
    except KernelError as exc:
        unavailable(str(exc))
    runner = open_runner(backend="auto")
    assert isinstance(runner, LibNftables)
    assert runner.name == "libnftables"
    runner.close()  # no context was made yet: nothing to free

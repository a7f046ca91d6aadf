"""Process identity: a pid alone does not name a process; pid plus start time does.

The kernel reuses pids, so "pid 1234 is alive" says nothing about whether it is still
*our* 1234. Field 22 of `/proc/PID/stat` (`starttime`, clock ticks since boot) never
changes for the life of a process, so the pair (pid, start time) identifies one process
for the life of one boot. Across a reboot every process is gone anyway, which is what the
boot id (`/proc/sys/kernel/random/boot_id`, fresh on every boot) tells us.

This module only reads `/proc`; it imports nothing from the project so that any layer
(state, kernel, health) may use it.
"""

from __future__ import annotations

# Field numbers are 1-based in proc(5). The command name (field 2) is wrapped in
# parentheses and may itself contain spaces and ')', so parsing starts after the LAST ')';
# the first field after it is field 3 (state).
_FIRST_FIELD_AFTER_COMM = 3
_STATE_FIELD = 3
_STARTTIME_FIELD = 22

# A zombie ('Z') or dying ('X') process has exited: it holds no resources and runs no code;
# only its pid is still reserved until its parent reaps it.
_DEAD_STATES = frozenset({"Z", "X", "x"})


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of `/proc/PID/stat` after the command name, or None if there is no such pid."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the process exited between open() and read().
        return None
    _, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError(f"/proc/{pid}/stat: unexpected format: {text[:80]!r}")
    return rest.split()


def _field(fields: list[str], number: int) -> str:
    return fields[number - _FIRST_FIELD_AFTER_COMM]


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if no such process exists.

    A zombie still has a start time (its pid is not free for reuse until it is reaped).
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(_field(fields, _STARTTIME_FIELD))


def process_alive(pid: int, start_time: int) -> bool:
    """True if `pid` is running and is the same process that started at `start_time`.

    Zombies count as not alive: they have exited and only wait to be reaped.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return False
    if _field(fields, _STATE_FIELD) in _DEAD_STATES:
        return False
    return int(_field(fields, _STARTTIME_FIELD)) == start_time


def boot_id() -> str:
    """The kernel's boot id: a UUID that changes on every boot."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()

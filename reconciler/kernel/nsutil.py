"""Thin ctypes wrappers for the namespace and mount syscalls Python does not expose.

`setns(2)` and `unshare(CLONE_NEWNET)` change the network namespace of the *calling
thread* only; every other thread of the process stays where it was. That is what lets a
long-running controller create and enter network namespaces without forking: a
short-lived thread switches, does its work, and exits (`run_in_thread`). A thread whose
namespace changed must never run unrelated work afterwards, which is why the helper
starts a fresh thread each time instead of borrowing one from a pool.

Every wrapper raises `OSError` with the real errno, like the functions in `os`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# <linux/sched.h>: namespace type flags for setns/unshare.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

# <sys/mount.h>: the mount flags we need.
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# <linux/nsfs.h>: ioctl on a namespace fd that returns its CLONE_NEW* type.
NS_GET_NSTYPE = 0xB703

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
# The one set of libc bindings of the controller process (argument types declared once).
# Fork children call these directly: only os and ctypes calls are safe there.
libc = _libc
_PR_SET_PDEATHSIG = 1


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace open at `fd` (0 = any type)."""
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    """Give the calling thread new namespaces of the `CLONE_NEW*` types in `flags`."""
    _check(_libc.unshare(flags), "unshare")


def mount(*, source: str, target: str, fstype: str | None = None, flags: int = 0) -> None:
    """mount(2) with no data argument (bind mounts and propagation changes)."""
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            None,
        ),
        f"mount {source} on {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2); pass MNT_DETACH for a lazy unmount."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def set_parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): `signum` is sent to the caller when its parent dies."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def run_in_thread(fn: Callable[[], T], *, name: str = "reconciler-ns") -> T:
    """Run `fn` in a new thread that exits afterwards, and return its result or raise.

    Use it for anything that calls `setns`/`unshare`: whatever namespace the thread ends
    up in, it dies with it, so the change can never leak into unrelated work.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]

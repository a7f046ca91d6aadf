"""`reconciler suspend`: a flag file next to the state file, not a field behind the lock.

A running controller holds the instance lock for its whole life, so `suspend` cannot wait
for it; creating or removing `<state-dir>/<instance>/suspended` is atomic and needs no
lock. The controller and `sync` check the flag before every fetch; `status` reports it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FLAG = "suspended"


def is_suspended(instance_dir: Path) -> bool:
    """True while syncing is paused."""
    return (instance_dir / FLAG).exists()


def set_suspended(instance_dir: Path, *, suspended: bool) -> bool:
    """Pause or resume; True when that changed anything."""
    flag = instance_dir / FLAG
    if suspended == flag.exists():
        return False
    if suspended:
        instance_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            flag.unlink()
    return True

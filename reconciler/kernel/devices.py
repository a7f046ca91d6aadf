"""Block devices by number: the "MAJ:MIN" that cgroup I/O limits are keyed by.

Manifests name devices by path (`/dev/vda`, `/dev/disk/by-id/...`); the kernel's
`blkio.throttle.*` (v1) and `io.max` (v2) files want the device number. `stat()` follows
symlinks, and a block device node's `st_rdev` is that number.

Partitions: block I/O throttling lives on the request queue of the *whole disk*; the
kernel refuses a partition's number with ENODEV (`blkcg_conf_open_bdev` rejects
partitions). So a partition resolves to its disk: sysfs shows a partition as a child
directory of its disk (`/sys/dev/block/254:1` → `.../block/vda/vda1`, which has a
`partition` file), and the disk's `dev` file one level up holds the disk's "MAJ:MIN".
A limit set on `/dev/vda1` therefore throttles the whole of `/dev/vda`.
"""

from __future__ import annotations

import os
import stat

SYS_DEV_BLOCK = "/sys/dev/block"


def resolve_block_device(path: str, *, sys_dev_block: str = SYS_DEV_BLOCK) -> str:
    """The "MAJ:MIN" of the block device (or of its whole disk, for a partition) at `path`.

    Raises ValueError with a one-line message when `path` is missing or not a block
    device. `sys_dev_block` is where sysfs lists devices by number (for tests).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such block device") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot stat the block device: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{path}: not a block device")
    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return whole_disk(number, sys_dev_block=sys_dev_block)


def whole_disk(number: str, *, sys_dev_block: str = SYS_DEV_BLOCK) -> str:
    """The disk's "MAJ:MIN" if `number` is a partition, else `number` itself."""
    entry = os.path.join(sys_dev_block, number)
    if not os.path.exists(os.path.join(entry, "partition")):
        return number
    # /sys/dev/block/MAJ:MIN is a symlink to .../block/<disk>/<partition>.
    disk_dev = os.path.join(os.path.dirname(os.path.realpath(entry)), "dev")
    try:
        with open(disk_dev, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return number  # unusual sysfs layout: let the kernel judge the number as given

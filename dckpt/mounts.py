"""Which local paths are on a filesystem that can stop answering while the node lives (a
network or FUSE mount): their metadata calls run under a bound (storage.py, dckpt.watchdog).
"""

from __future__ import annotations

import functools
import os

__all__ = ["WATCHED_FS", "watched_filesystem", "filesystem_type", "mount_source"]

WATCHED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
              "beegfs", "9p", "virtiofs", "afs", "panfs", "wekafs", "orangefs")
"""Filesystems whose metadata calls run under a bound (also every ``fuse*`` one): those
that can stop answering while the node lives. Elsewhere (ext4, xfs, tmpfs...) the calls run
in the caller's thread: the hand-off to a worker costs 70 us, and milliseconds when the
cores are busy."""


@functools.lru_cache(maxsize=256)
def watched_filesystem(path: str) -> bool:
    """Whether the filesystem mounted at ``path`` (its absolute path, not resolved: resolving
    would touch the filesystem) is a network or FUSE one; True when the mounts are unknown."""
    try:
        with open("/proc/self/mounts") as f:
            fstype = filesystem_type(os.path.abspath(path), f.read().splitlines())
    except OSError:
        return True
    return fstype.startswith("fuse") or fstype in WATCHED_FS


def filesystem_type(path: str, mounts: list[str]) -> str:
    """The type of the filesystem holding absolute ``path``, from lines of /proc/mounts."""
    return _mount(path, mounts)[2]


def mount_source(path: str, mounts: list[str]) -> str:
    """What the filesystem holding absolute ``path`` was mounted from (``/dev/vda1``,
    ``tmpfs``...), from lines of /proc/mounts."""
    return _mount(path, mounts)[0]


def _mount(path: str, mounts: list[str]) -> list[str]:
    """The /proc/mounts fields of the innermost mount holding ``path`` (the last one
    mounted there)."""
    best, fields = "", ["", "", ""]
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fields = mount, parts
    return fields

"""Local files opened for reading only where a regular file stands (stdlib alone: the
launcher-side prefetch uses it too)."""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["open_file", "replaced_by_rename"]


def open_file(path: str) -> int:
    """A descriptor open for reading on the regular file at ``path``. Anything else there
    raises at once: a folder IsADirectoryError, a FIFO, socket or device OSError(EIO). A FIFO
    opened plainly blocks until a writer comes (forever), and a read of /dev/zero never
    ends: one where a manifest or segment belongs is damage, not a storage that hangs."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise OSError(errno.EIO, f"{kind} where a file belongs", path)
    except BaseException:
        os.close(fd)
        raise


def replaced_by_rename(path: str | os.PathLike) -> str | None:
    """What a new file renamed over ``path`` would destroy that is no file, in words ("a
    FIFO", "a link to a device", "a folder"); None where nothing stands, or a regular file,
    or a link to one or to nothing (the rename replaces the link alone). A rename over
    /dev/null, as root, made it a regular file."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    special = folder == "/dev" or folder in ("/proc", "/sys") or folder.startswith(
        ("/proc/", "/sys/"))
    if special and os.path.lexists(path):
        # /dev/stdout is a link to a file when the output is redirected to one: renamed
        # over, the link itself would go (as root)
        return f"a name in {folder}, where names stand for devices and processes"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or a link to nothing
        return None
    if stat.S_ISREG(mode):
        return None
    kind = ("folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket"
            if stat.S_ISSOCK(mode) else "device")
    return f"a link to a {kind}" if os.path.islink(path) else f"a {kind}"

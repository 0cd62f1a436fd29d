"""Where the memory tier lives on this node and what it holds: the folder of a repository's
tier, its bytes and its newest step. Free of torch, for ``dckpt status``; the tier itself
(its saves, replicas and restores) is ``dckpt.memory``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket

from dckpt.errors import StorageError
from dckpt.layout import full_path
from dckpt.repository import committed_steps
from dckpt.storage import Store

__all__ = ["DEFAULT_MEMORY_DIR", "memory_folder", "held", "bytes_under", "lock", "unlock", "LOCK"]

DEFAULT_MEMORY_DIR = "/dev/shm"
LOCK = ".lock"
"""In the tier's folder: locked by the node's leader while its job runs (a POSIX lock, which
the process's end releases, a crash's included, and a fork does not pass on)."""


def memory_folder(url: str, memory_dir: str | None = None) -> str:
    """The memory tier's folder for the repository at ``url``: one per user and URL."""
    root = os.path.expanduser(memory_dir or os.environ.get("DCKPT_MEMORY_DIR")
                              or DEFAULT_MEMORY_DIR)
    key = url if "://" in url and not url.startswith("file://") else full_path(
        url.removeprefix("file://"))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(root, f"dckpt-{os.getuid()}-{digest}")


def held(url: str, memory_dir: str | None = None) -> tuple[str, int, int | None] | None:
    """(folder, bytes held, newest committed step) of this node's memory tier of ``url``, or
    None where there is none; creates nothing."""
    folder = memory_folder(url, memory_dir)
    if not os.path.isdir(folder):
        return None
    try:
        steps = committed_steps(Store(folder))
    except OSError:  # damaged: the next restore finds it so and starts it afresh
        steps = []
    return folder, bytes_under(folder), steps[-1] if steps else None


def bytes_under(folder: str) -> int:
    """The bytes of the files under ``folder`` (files removed meanwhile count nothing; the
    tier's lock file not at all)."""
    total = 0
    for d, _, files in os.walk(folder):
        for f in files if d != folder else (f for f in files if f != LOCK):
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass  # removed meanwhile
    return total


def lock(folder: str) -> int:
    """Lock the tier's ``folder`` for this process; returns the lock's file descriptor. A
    second job on the same repository and node (launched twice by mistake, or a requeue
    whose first run still lives) would prune the first's memory checkpoints and fail its
    saves: StorageError, naming the process that holds it."""
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open the memory tier's lock {path}: {e}") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise StorageError(f"cannot lock the memory tier's folder {folder}: {e}") from e
        raise StorageError(
            f"the memory tier's folder {folder} is in use by another job ({holder}): two jobs "
            "on one repository would prune each other's memory checkpoints. Stop the other "
            "job, or give this one another URL or memory_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def unlock(folder: str, fd: int, *, forget: bool = False) -> None:
    """Release the lock of :func:`lock` (``forget``: and remove its file first, while still
    held, so that no one else holds the file removed)."""
    if forget:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, LOCK))
    os.close(fd)

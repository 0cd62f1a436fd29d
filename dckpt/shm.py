"""Where the memory tier lives on this node and what it holds: the folder of a repository's
tier, its bytes and its newest step. Free of torch, for ``dckpt status``; the tier itself
(its saves, replicas and restores) is ``dckpt.memory``."""

from __future__ import annotations

import hashlib
import os

from dckpt.repository import committed_steps
from dckpt.storage import Store

__all__ = ["DEFAULT_MEMORY_DIR", "memory_folder", "held", "bytes_under"]

DEFAULT_MEMORY_DIR = "/dev/shm"


def memory_folder(url: str, memory_dir: str | None = None) -> str:
    """The memory tier's folder for the repository at ``url``: one per user and URL."""
    root = memory_dir or os.environ.get("DCKPT_MEMORY_DIR") or DEFAULT_MEMORY_DIR
    key = url if "://" in url and not url.startswith("file://") else os.path.abspath(
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
    """The bytes of the files under ``folder`` (files removed meanwhile count nothing)."""
    total = 0
    for d, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass  # removed meanwhile
    return total

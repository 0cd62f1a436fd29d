"""Shared benchmark helpers: page-cache eviction, timing across ranks, JSON lines, charts."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch.distributed as dist


def evict(path: str) -> None:
    """Drop a file's (or a folder's files') pages from the page cache: the next read is cold.

    posix_fadvise(DONTNEED) needs no privilege, unlike /proc/sys/vm/drop_caches; the files
    were fsync'd, so no dirty page stays behind.
    """
    paths = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    """Seconds from a barrier before ``fn`` on every rank to a barrier after it."""
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(path: str, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def bar_chart(path: str, title: str, labels: list[str], values: list[float], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.barh(labels[::-1], values[::-1], color="#4477aa")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xlabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

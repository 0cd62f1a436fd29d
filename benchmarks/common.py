"""Shared benchmark helpers: page-cache eviction, timing across ranks, JSON lines, charts."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist

TENSOR_BYTES = 64 << 20


def make_state(gib: float, mesh, *, device: str = "cpu", fill: bool = True) -> dict:
    """``gib`` GiB per rank of float32 DTensor shards of 64 MiB (an FSDP-like state)."""
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    rows = TENSOR_BYTES // 4 // 1024
    n = max(1, int(gib * (1 << 30) // TENSOR_BYTES))
    state = {}
    for i in range(n):
        local = (torch.randn(rows, 1024, device=device) if fill
                 else torch.empty(rows, 1024, device=device))
        state[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)],
                                                       shape=torch.Size([rows * world, 1024]),
                                                       stride=(1024, 1))
    return state


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


def fresh_folders(data_dir: str, out: str) -> str:
    """(all ranks) An empty ``data_dir`` and the folder of ``out``; returns the data dir."""
    base = os.path.abspath(data_dir)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
    dist.barrier()
    return base


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

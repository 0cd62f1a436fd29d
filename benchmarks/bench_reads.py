"""What a fragmented restore pays per read: cold reads of a file's 32 KiB blocks in runs
(some blocks left out, as a differential checkpoint's older segments hold blocks no longer
referenced) against reading the whole file in order.

    .venv/bin/python benchmarks/bench_reads.py --gib 1 --keep 0.3,0.5,0.8 --repeats 3

One file of ``--gib`` GiB; for each ``--keep`` fraction, a random choice of its blocks is
read (each run of adjacent blocks in one ``preadv``, file order, split into 16 MiB groups
over 8 threads, as ``dckpt.reads`` issues a restore's reads) after the file's pages are
dropped from the page cache; in the same round, the whole file in 16 MiB reads on 8
threads, buffered and with ``O_DIRECT`` (CPU seconds beside). The cost of a read is the time beyond the wanted bytes at the whole file's speed,
over the number of reads: ``(t_runs - t_whole * wanted / size) / runs`` (wall seconds, with
8 reads in flight). JSON lines to --out; the medians per fraction.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from common import emit, evict

BLOCK = 32 << 10
GROUP = 16 << 20
THREADS = 8


def runs_of(nblocks: int, keep: float, seed: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of adjacent kept blocks."""
    rng = random.Random(seed)
    kept = [rng.random() < keep for _ in range(nblocks)]
    runs, i = [], 0
    while i < nblocks:
        if not kept[i]:
            i += 1
            continue
        j = i
        while j < nblocks and kept[j]:
            j += 1
        runs.append((i * BLOCK, (j - i) * BLOCK))
        i = j
    return runs


def read_runs(path: str, runs: list[tuple[int, int]], out: memoryview, flags: int = 0) -> None:
    groups: list[list[tuple[int, int]]] = [[]]
    for off, n in runs:
        if groups[-1] and off - groups[-1][0][0] > GROUP:
            groups.append([])
        groups[-1].append((off, n))
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        def one(group: list[tuple[int, int]]) -> None:
            for off, n in group:
                os.preadv(fd, [out[off: off + n]], off)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, groups))
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--keep", default="0.3,0.5,0.8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="bench-out/reads")
    p.add_argument("--out", default="bench-out/reads.jsonl")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    path = os.path.join(args.dir, "file.bin")
    size = int(args.gib * (1 << 30)) // GROUP * GROUP
    with open(path, "wb") as f:
        chunk = os.urandom(GROUP)
        for _ in range(size // GROUP):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    out = memoryview(mmap.mmap(-1, size))  # page-aligned, for O_DIRECT
    whole = [(off, GROUP) for off in range(0, size, GROUP)]
    fractions = [float(k) for k in args.keep.split(",")]
    plans = {k: runs_of(size // BLOCK, k, seed=1) for k in fractions}
    ways = [("whole", whole, 0)] + [(str(k), plans[k], 0) for k in fractions]
    if hasattr(os, "O_DIRECT"):
        ways.append(("direct", whole, os.O_DIRECT))
    times: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    try:
        for _ in range(args.repeats):
            for name, runs, flags in ways:
                evict(path)
                t0, c0 = time.perf_counter(), time.process_time()
                read_runs(path, runs, out, flags)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        t_whole = statistics.median(times["whole"])
        for name, label in (("whole", "whole file"), ("direct", "whole file, O_DIRECT")):
            if name in times:
                t = statistics.median(times[name])
                emit(args.out, {"bench": "reads", "method": label, "bytes": size,
                                "runs": len(whole), "mean_run_bytes": GROUP, "s": t,
                                "s_all": times[name], "gbps_wanted": size / t / 1e9,
                                "cpu_s": statistics.median(cpu[name])})
        for k in fractions:
            runs = plans[k]
            wanted = sum(n for _, n in runs)
            t = statistics.median(times[str(k)])
            emit(args.out, {
                "bench": "reads", "method": f"runs, keep {k}", "bytes": wanted, "runs": len(runs),
                "mean_run_bytes": wanted / len(runs), "s": t, "s_all": times[str(k)],
                "gbps_wanted": wanted / t / 1e9, "cpu_s": statistics.median(cpu[str(k)]),
                "us_per_read": max(0.0, t - t_whole * wanted / size) / len(runs) * 1e6})
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()

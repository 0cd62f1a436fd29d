"""Where a sync save's writes lose speed against the raw ``O_DIRECT`` limit: the physical
layout of the memory they come from.

    .venv/bin/python benchmarks/bench_page_layout.py --gib 1 --rounds 7 --out bench-out/page_layout.jsonl

The same bytes (``--gib`` GiB as 64 MiB float32 tensors, 4 writer threads, one file each,
``O_DIRECT`` then fsync) written in turns each round from:

- ``torch, parallel fill``: tensors as ``torch.randn`` makes them (its threads fault the
  pages in, interleaved): a state's memory, as dckpt's sync save writes it;
- ``torch, one-thread fill``: the same values copied by one thread into fresh tensors;
- ``mmap, one-thread fill``: a page-aligned anonymous mapping per tensor, filled in order
  (how the benchmarks' raw limit holds its bytes);
- ``mmap, huge pages``: the same with ``MADV_HUGEPAGE`` before the first touch;
- ``bounced``: the parallel-fill tensors copied through a reused window per thread
  (``--window-mib``, filled in order once) and written from there;
- with digests, as a save takes them (xxh3-128 of each 256 KiB block, in the writer
  threads): the parallel-fill tensors' blocks digested, then their pages written; and
  bounced, each block digested in the window as it is copied there, from a window of 4 KiB
  pages or of huge pages;

and ``dckpt.save`` of the parallel-fill tensors. Each memory kind's physical runs per 64
MiB (pages whose frame numbers follow each other, from ``/proc/self/pagemap``; root only)
beside it: a request to the disk holds at most ``max_segments`` runs
(``/sys/block/<dev>/queue``), so memory in 4 KiB pieces makes more, smaller requests.
JSON lines (GB/s per round, medians) to ``--out``.

``--allocation-order K`` measures instead what decides a state's layout: K sets of ``--gib``
GiB made one after another the same way (``torch.randn``, nothing freed between them), each
set's physical runs per 64 MiB and its ``O_DIRECT`` write (as above, 4 threads) in turns,
with the device's write requests: their mean size (``/sys/block/<dev>/stat``) and how many
were in flight (``inflight``, sampled every 0.5 ms).
The kernel hands a process its most scattered free pages first, so the first set made
(what a training state usually is: the model, allocated before anything else) lies
worst, whatever fills it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash
from common import emit

TENSOR = 64 << 20
THREADS = 4


def physical_runs(addr: int, nbytes: int) -> int | None:
    """Runs of physically adjacent pages in ``[addr, addr + nbytes)``; None without root."""
    page = os.sysconf("SC_PAGE_SIZE")
    first = addr // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            entries = np.frombuffer(f.read((nbytes // page) * 8), dtype=np.uint64)
    except OSError:
        return None
    frames = (entries & np.uint64((1 << 55) - 1)).astype(np.int64)
    if not frames.any():
        return None  # frame numbers hidden: not root
    return int((np.diff(frames) != 1).sum()) + 1


def aligned(t: torch.Tensor) -> memoryview:
    """The tensor's whole pages (``O_DIRECT`` takes page-aligned memory)."""
    mv = memoryview(t.view(torch.uint8).numpy())
    head = -t.data_ptr() % 4096
    return mv[head: head + (len(mv) - head) // 4096 * 4096]


def mapped(values: torch.Tensor, huge: bool) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, values.numel() * values.element_size(),
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    np.frombuffer(m, dtype=np.uint8)[:] = values.view(torch.uint8).numpy()
    return m, memoryview(m)


def _in_threads(folder: str, write: Callable[[int, int], None]) -> float:
    """Seconds for ``write(i, fd)`` into a fresh ``O_DIRECT`` file per thread, then fsync."""
    def one(i: int) -> None:
        fd = os.open(os.path.join(folder, f"w{i}"),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            write(i, fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as ex:
        list(ex.map(one, range(THREADS)))
    return time.perf_counter() - t0


def _write(fd: int, mv: memoryview) -> None:
    while len(mv):
        mv = mv[os.write(fd, mv):]


def write_all(folder: str, per_thread: list[list[memoryview]]) -> float:
    def write(i: int, fd: int) -> None:
        for buf in per_thread[i]:
            _write(fd, buf)

    return _in_threads(folder, write)


BLOCK = 256 << 10  # dckpt's default block: each hashed on its own


def _device(path: str) -> str:
    """The block device (its /sys/block name) that holds ``path``."""
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(os.stat(path).st_dev)}:0"))


class DeviceQueue:
    """While open, the device's writes in flight (sampled every 0.5 ms from
    ``/sys/block/<dev>/inflight``) and the write requests it completed (``stat``)."""

    def __init__(self, dev: str) -> None:
        self.dev = dev
        self.samples: list[int] = []
        self.requests = self.kib_per_request = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._before: list[int] = []

    def _stat(self) -> list[int]:
        with open(f"/sys/block/{self.dev}/stat") as f:
            return [int(x) for x in f.read().split()]

    def _sample(self) -> None:
        while not self._stop.is_set():
            with open(f"/sys/block/{self.dev}/inflight") as f:
                self.samples.append(int(f.read().split()[1]))
            time.sleep(0.0005)

    def __enter__(self) -> DeviceQueue:  # once per queue: a thread starts only once
        self._before = self._stat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        after = self._stat()
        self.requests = after[4] - self._before[4]  # writes completed, sectors written
        self.kib_per_request = (after[6] - self._before[6]) / 2 / max(self.requests, 1)

    @property
    def in_flight(self) -> float:
        return statistics.mean(self.samples) if self.samples else 0.0


def allocation_order(args: argparse.Namespace, base: str) -> None:
    """``--allocation-order``: the same fill, in sets made one after another, with the
    device's write requests: their size, and how many are in flight."""
    n = max(THREADS, int(args.gib * (1 << 30)) // TENSOR)
    sets = [[torch.randn(TENSOR // 4) for _ in range(n)] for _ in range(args.allocation_order)]
    runs = [[physical_runs(t.data_ptr() // 4096 * 4096 + 4096, TENSOR - 8192) for t in ts]
            for ts in sets]
    bufs = [[aligned(t) for t in ts] for ts in sets]
    nbytes = sum(len(b) for b in bufs[0])
    seconds: list[list[float]] = [[] for _ in sets]
    queues: list[list[DeviceQueue]] = [[] for _ in sets]
    dev = _device(base)
    for r in range(args.rounds):  # in turns: the disk's speed drifts
        for k, b in enumerate(bufs):
            folder = tempfile.mkdtemp(dir=base)
            with DeviceQueue(dev) as q:
                seconds[k].append(write_all(folder, [b[i::THREADS] for i in range(THREADS)]))
            queues[k].append(q)
            shutil.rmtree(folder)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for k, s in enumerate(seconds):
        known = [x for x in runs[k] if x is not None]
        emit(args.out, {"kind": "torch.randn", "allocated": k + 1, "gib": nbytes / (1 << 30),
                        "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                        "gbps": [round(nbytes / x / 1e9, 3) for x in s],
                        "gbps_median": round(nbytes / statistics.median(s) / 1e9, 3),
                        "physical_runs_per_64mib": runs[k],
                        "physical_runs_per_64mib_median":
                            statistics.median(known) if known else None,
                        "device": dev,
                        "writes_in_flight_mean": round(statistics.median(
                            q.in_flight for q in queues[k]), 2),
                        "kib_per_write_request": round(statistics.median(
                            q.kib_per_request for q in queues[k]))})


def bounced_write(folder: str, tensors: list[torch.Tensor], windows: list[torch.Tensor],
                  hashed: bool = False) -> float:
    """The tensors copied through each thread's window, the full window written; ``hashed``:
    each block copied and digested there at once (still in the cache), a bounce that reads
    the tensor once."""
    def write(i: int, fd: int) -> None:
        win = windows[i]
        wmv = memoryview(win.numpy())
        for t in tensors[i::THREADS]:
            b = t.view(torch.uint8)
            for s in range(0, len(b), len(win)):
                n = min(len(win), len(b) - s)
                step = BLOCK if hashed else n
                for at in range(0, n, step):
                    k = min(step, n - at)
                    win[at:at + k].copy_(b[s + at:s + at + k])
                    if hashed:
                        xxhash.xxh3_128_digest(wmv[at:at + k])
                _write(fd, wmv[:n])

    return _in_threads(folder, write)


def hashed_write(folder: str, bufs: list[memoryview]) -> float:
    """As dckpt's sync save writes a tensor from its own pages: its blocks' digests first,
    then the pages written with ``O_DIRECT``."""
    def write(i: int, fd: int) -> None:
        for mv in bufs[i::THREADS]:
            for at in range(0, len(mv), BLOCK):
                xxhash.xxh3_128_digest(mv[at:at + BLOCK])
            _write(fd, mv)

    return _in_threads(folder, write)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--window-mib", type=int, default=16)
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder here)")
    p.add_argument("--out", default="bench-out/page_layout.jsonl")
    p.add_argument("--allocation-order", type=int, default=0, metavar="K",
                   help="measure K sets of the same fill, made one after another, instead")
    args = p.parse_args()
    import dckpt

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    base = tempfile.mkdtemp(prefix="page-layout-", dir=args.dir or os.getcwd())
    if args.allocation_order:
        try:
            allocation_order(args, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    n = max(THREADS, int(args.gib * (1 << 30)) // TENSOR)
    parallel = [torch.randn(TENSOR // 4) for _ in range(n)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = [torch.empty_like(t).copy_(t) for t in parallel]
    torch.set_num_threads(threads)
    maps = [mapped(t, huge=False) for t in parallel]
    huge = [mapped(t, huge=True) for t in parallel]
    windows = [torch.zeros(args.window_mib << 20, dtype=torch.uint8) for _ in range(THREADS)]
    # a multiple of the page size, page-aligned: O_DIRECT writes take the window's pages
    windows = [w[-w.data_ptr() % 4096:][: (args.window_mib << 20) - 4096] for w in windows]
    huge_windows = [mapped(torch.zeros(args.window_mib << 18), huge=True)
                    for _ in range(THREADS)]  # (map, view): filled in order, 2 MiB pages
    huge_windows_t = [torch.frombuffer(m, dtype=torch.uint8) for m, _ in huge_windows]
    kinds = {
        "torch, parallel fill": [aligned(t) for t in parallel],
        "torch, one-thread fill": [aligned(t) for t in one_thread],
        "mmap, one-thread fill": [mv for _, mv in maps],
        "mmap, huge pages": [mv for _, mv in huge],
    }
    first_page = {
        "torch, parallel fill": parallel[0].data_ptr() // 4096 * 4096 + 4096,
        "torch, one-thread fill": one_thread[0].data_ptr() // 4096 * 4096 + 4096,
        "mmap, one-thread fill": int(np.frombuffer(maps[0][1], np.uint8).ctypes.data),
        "mmap, huge pages": int(np.frombuffer(huge[0][1], np.uint8).ctypes.data),
        "bounced": windows[0].data_ptr(),
    }
    runs = {k: physical_runs(a, TENSOR - 8192 if k != "bounced" else windows[0].numel())
            for k, a in first_page.items()}
    nbytes = sum(len(v) for v in kinds["torch, parallel fill"])
    seconds: dict[str, list[float]] = {
        k: [] for k in [*kinds, "bounced", "torch, parallel fill, hashed",
                        "bounced, hashed in the window",
                        "bounced, huge-page window, hashed in it", "dckpt.save"]}
    state = {f"t{i}": t for i, t in enumerate(parallel)}
    try:
        for r in range(args.rounds):  # in turns: the disk's speed drifts
            for kind, bufs in kinds.items():
                folder = tempfile.mkdtemp(dir=base)
                seconds[kind].append(write_all(folder, [bufs[i::THREADS] for i in range(THREADS)]))
                shutil.rmtree(folder)
            folder = tempfile.mkdtemp(dir=base)
            seconds["bounced"].append(bounced_write(folder, parallel, windows))
            shutil.rmtree(folder)
            folder = tempfile.mkdtemp(dir=base)
            seconds["torch, parallel fill, hashed"].append(
                hashed_write(folder, kinds["torch, parallel fill"]))
            shutil.rmtree(folder)
            folder = tempfile.mkdtemp(dir=base)
            seconds["bounced, hashed in the window"].append(
                bounced_write(folder, parallel, windows, hashed=True))
            shutil.rmtree(folder)
            folder = tempfile.mkdtemp(dir=base)
            seconds["bounced, huge-page window, hashed in it"].append(
                bounced_write(folder, parallel, huge_windows_t, hashed=True))
            shutil.rmtree(folder)
            if r:  # the last round's checkpoint gone: this save writes every block
                dckpt.delete(os.path.join(base, "repo"), step=r - 1)
                dckpt.gc(os.path.join(base, "repo"), min_age_s=0)
            t0 = time.perf_counter()
            info = dckpt.save(state, os.path.join(base, "repo"), step=r)
            seconds["dckpt.save"].append(time.perf_counter() - t0)
            assert info.bytes_written >= nbytes, info.bytes_written
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    dev = _device(args.dir or ".")
    queue = {}
    for name in ("max_segments", "max_sectors_kb"):
        try:
            with open(f"/sys/block/{dev}/queue/{name}") as f:
                queue[name] = int(f.read())
        except (OSError, ValueError):
            queue[name] = None
    for kind, s in seconds.items():
        emit(args.out, {"kind": kind, "gib": nbytes / (1 << 30), "rounds": args.rounds,
                        "gbps": [round(nbytes / x / 1e9, 3) for x in s],
                        "gbps_median": round(nbytes / statistics.median(s) / 1e9, 3),
                        "physical_runs_per_64mib": runs.get(kind), "window_mib": args.window_mib,
                        "device": dev, **queue})


if __name__ == "__main__":
    main()

"""Warm the page cache with a checkpoint's bytes while the training processes start.

    python -m dckpt.prefetch ckpt/run1 &  torchrun ... train.py

A restart spends seconds before its first read: torchrun starts, every worker imports torch
(2-10 s), builds its model and joins the process group, and the disk idles meanwhile. This
finds the checkpoint that ``load(step=None)`` would try first (the newest committed one not
quarantined) and reads every byte range its manifest references into the page cache, from
the moment the job is launched, so that the restore finds those bytes in memory or on their
way. The reads are ``sendfile`` calls to /dev/null (the kernel fills the page cache, nothing
is copied to this process), a few objects at once; the restore's own reads of the same pages
wait for them rather than read them twice. (``posix_fadvise(WILLNEED)`` returns at once but
the kernel caps it to one readahead window per call: 8 GiB asked that way gave no gain.)

It imports neither torch nor the rest of dckpt when run with ``python -m`` (see
``dckpt/__init__.py``), and it never fails a launch: a repository that is missing, empty,
damaged or not on a local disk is reported and skipped (exit 0). Local disks only: an object
store has no page cache to warm. Memory: at most ``--max-bytes`` (default half of the
available memory) is read; the kernel may still evict pages under pressure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dckpt import layout
from dckpt.decoder import decode
from dckpt.files import open_file
from dckpt.manifest import Manifest

__all__ = ["Prefetch", "plan", "prefetch", "main", "available_memory"]

THREADS = 8
"""Objects read at once."""
CHUNK = 16 << 20


@dataclass
class Prefetch:
    """What was read into the page cache: the step, its byte ranges, what was left out."""

    step: int | None = None
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Object name -> merged (offset, length) ranges, in offset order."""
    nbytes: int = 0
    skipped_bytes: int = 0
    """Bytes over ``max_bytes``, not asked for."""
    note: str = ""


def _local_root(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _newest(root: str) -> list[int]:
    """Committed steps, newest first, without the quarantined ones."""
    try:
        names = os.listdir(os.path.join(root, layout.MANIFEST_DIR))
    except FileNotFoundError:
        return []
    steps = sorted((s for s in map(layout.parse_manifest_name, names) if s is not None),
                   reverse=True)
    try:
        marked = {layout.parse_manifest_name(n)
                  for n in os.listdir(os.path.join(root, layout.QUARANTINE_DIR))}
    except FileNotFoundError:
        marked = set()
    return [s for s in steps if s not in marked]


def _ranges(m: Manifest, ranks: Container[int] | None) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {}
    for segment, offset, length in m.spans():
        if ranks is None or _writer_rank(segment) in ranks:
            spans.setdefault(segment, []).append((offset, length))
    out: dict[str, list[tuple[int, int]]] = {}
    for seg, pieces in spans.items():
        pieces.sort()
        merged = [list(pieces[0])]
        for offset, length in pieces[1:]:
            last = merged[-1]
            if offset <= last[0] + last[1]:  # adjacent (or the same block twice)
                last[1] = max(last[1], offset + length - last[0])
            else:
                merged.append([offset, length])
        out[seg] = [(o, n) for o, n in merged]
    return out


def _writer_rank(segment: str) -> int | None:
    base = segment.rsplit("/", 1)[-1]  # r00003-001.seg
    try:
        return int(base[1:6]) if base.startswith("r") else None
    except ValueError:
        return None


def plan(url: str, *, step: int | None = None, ranks: Container[int] | None = None) -> Prefetch:
    """The byte ranges of the checkpoint ``load`` would try first (or of ``step``); only the
    objects written by ``ranks`` (writer ranks, as in the object names) when given."""
    root = _local_root(str(url))
    if root is None:
        return Prefetch(note=f"{url} is not on a local disk: nothing to prefetch")
    if not os.path.exists(os.path.join(root, layout.MARKER)):
        return Prefetch(note=f"{url} is not a dckpt repository (yet): nothing to prefetch")
    candidates = [step] if step is not None else _newest(root)
    notes = []
    for s in candidates:
        path = os.path.join(root, layout.manifest_name(s))
        try:
            with open(open_file(path), "rb") as f:
                m = decode(f.read(), name=path)
            return Prefetch(step=s, ranges=_ranges(m, ranks))
        except Exception as e:
            notes.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
    if not candidates:
        return Prefetch(note=f"{url} holds no committed checkpoint: nothing to prefetch")
    return Prefetch(note="no manifest could be read (" + "; ".join(notes) + ")")


def available_memory() -> int | None:
    """Bytes this process may still take: the kernel's MemAvailable, or less where a cgroup
    (a container, a job scheduler's allocation) caps it; None where neither is known."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if cap != "max":
            limits.append(max(0, int(cap) - used))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def prefetch(url: str, *, step: int | None = None, ranks: Container[int] | None = None,
             max_bytes: int | None = None, threads: int = THREADS) -> Prefetch:
    """Read the ranges of ``plan`` into the page cache, up to ``max_bytes`` (None: half of
    the available memory), ``threads`` objects at a time; returns when they are read."""
    p = plan(url, step=step, ranks=ranks)
    if max_bytes is None:
        available = available_memory()
        max_bytes = available // 2 if available is not None else 1 << 62
    root = _local_root(str(url))
    jobs: list[tuple[str, list[tuple[int, int]]]] = []
    for name, ranges in p.ranges.items():
        kept = []
        for offset, length in ranges:
            if p.nbytes + length > max_bytes:
                p.skipped_bytes += length
            else:
                kept.append((offset, length))
                p.nbytes += length
        jobs.append((os.path.join(root, name), kept))  # type: ignore[arg-type]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = [e for e in pool.map(_warm, jobs) if e]
    p.note += "; ".join(problems)
    return p


def _warm(job: tuple[str, list[tuple[int, int]]]) -> str:
    """Read one object's ranges into the page cache; a problem is returned, not raised."""
    path, ranges = job
    try:
        fd = open_file(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        for offset, length in ranges:
            end = offset + length
            while offset < end:
                try:
                    n = os.sendfile(sink, fd, offset, min(CHUNK, end - offset))
                except OSError:  # no sendfile to /dev/null here: read through a buffer
                    n = len(os.pread(fd, min(CHUNK, end - offset), offset))
                if not n:
                    break
                offset += n
    except OSError as e:  # a read error: the restore will meet it and say more
        return f"{path}: {e.strerror}"
    finally:
        os.close(sink)
        os.close(fd)
    return ""


class Ranks:
    """``--ranks``: ranges of ranks, tested without listing them (``0-99999999999`` listed
    every rank, and took the machine's memory and minutes before the first read)."""

    def __init__(self, ranges: list[range]) -> None:
        self.ranges = ranges

    def __contains__(self, rank: object) -> bool:
        return any(rank in r for r in self.ranges)


def _ranks(text: str) -> Ranks:
    ranges = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a rank or a range like 0-7") from None
        if not 0 <= first <= last:
            raise argparse.ArgumentTypeError(f"{part!r}: ranks are >= 0, and a range is "
                                             "low-high")
        ranges.append(range(first, last + 1))
    return Ranks(ranges)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dckpt.prefetch",
                                description=__doc__.splitlines()[0])
    p.add_argument("url", help="the repository (a local folder)")
    p.add_argument("--step", type=_at_least(0),
                   help="this step instead of the newest committed one")
    p.add_argument("--ranks", type=_ranks,
                   help="only objects written by these ranks, e.g. 0-7 or 0,2 (one node of a "
                        "multi-node job that restarts on the same world size)")
    p.add_argument("--max-bytes", type=_at_least(0),
                   help="default: half of the available memory")
    p.add_argument("--threads", type=_at_least(1), default=THREADS,
                   help="objects read at once")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = prefetch(args.url, step=args.step, ranks=args.ranks, max_bytes=args.max_bytes,
                          threads=args.threads)
    except Exception as e:
        print(f"dckpt prefetch: skipped ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        return 0
    if result.step is None:
        print(f"dckpt prefetch: {result.note}", file=sys.stderr)
        return 0
    over = (f", {result.skipped_bytes / 2**30:.2f} GiB over --max-bytes left out"
            if result.skipped_bytes else "")
    print(f"dckpt prefetch: step {result.step}: {result.nbytes / 2**30:.2f} GiB of "
          f"{len(result.ranges)} objects read into the page cache in "
          f"{time.perf_counter() - t0:.2f} s{over}" + (f" ({result.note})" if result.note
                                                         else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

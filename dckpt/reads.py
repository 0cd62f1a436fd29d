"""Coalesced, parallel, verified reads of stored blocks into caller-owned buffers.

Planning (which blocks, merged into which ranged reads) is pure; ``Fetcher`` runs the reads
on a thread pool and checks every block against its digest before the bytes are used.
Free of torch (``dckpt verify`` and ``health`` use it without torch's import); the stored
items made tensors and values are ``dckpt.items``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from dckpt.blocks import check
from dckpt.codec import decode
from dckpt.errors import IntegrityError
from dckpt.manifest import BlockRef, Manifest, StoredData
from dckpt.storage import UNREADABLE, Store
from dckpt.watchdog import STALL_S, Stalled, wait_all

__all__ = ["Request", "Span", "Target", "blocks_in_range", "coalesce", "spans", "Fetcher", "read_stored",
           "read_stored_sample", "READ_THREADS"]

@dataclass(frozen=True)
class Request:
    """One ranged read: ``length`` bytes of ``segment`` at ``offset`` into dest[dest_start:]."""

    segment: str
    offset: int
    length: int
    dest_start: int
    blocks: tuple[tuple[BlockRef, int], ...]  # each block and where its bytes land in dest


def blocks_in_range(data: StoredData, start: int, end: int) -> tuple[int, list[tuple[BlockRef, int]]]:
    """The blocks holding raw bytes [start, end) of ``data``.

    Returns the raw offset where the first of them begins, and each block with its position
    relative to that offset (so a buffer from that offset on receives them).
    """
    picked: list[tuple[BlockRef, int]] = []
    first = None
    pos = 0
    for ref in data.blocks:
        n = ref[3]  # raw_length
        if pos + n > start and pos < end:
            if first is None:
                first = pos
            picked.append((ref, pos - first))
        pos += n
        if pos >= end:
            break
    return (first or 0), picked


def coalesce(blocks: Sequence[tuple[BlockRef, int]], max_bytes: int) -> list[Request]:
    """Merge blocks adjacent both in their object and in the destination into ranged reads."""
    requests: list[Request] = []
    run: list[tuple[BlockRef, int]] = []
    segment, start, end, dest_start, dest_end, joinable = "", 0, 0, 0, 0, False
    for pair in blocks:  # one pass, fields unpacked: a restore may plan 10^5 blocks per rank
        (seg, offset, length, raw_length, _, codec), dest = pair
        raw = codec == "raw"
        if run and not (joinable and raw and seg == segment and offset == end
                        and dest == dest_end and offset + length - start <= max_bytes):
            requests.append(Request(segment, start, end - start, dest_start, tuple(run)))
            run = []
        if not run:
            segment, start, dest_start = seg, offset, dest
        run.append(pair)
        end, dest_end, joinable = offset + length, dest + raw_length, raw
    if run:
        requests.append(Request(segment, start, end - start, dest_start, tuple(run)))
    return requests


@dataclass(frozen=True)
class Span:
    """One ranged read covering several requests of one object, and the gaps between them."""

    segment: str
    offset: int
    length: int
    parts: tuple[Request, ...]


def spans(requests: Sequence[Request], max_bytes: int, max_gap: int) -> list[Span]:
    """Requests of the same object whose bytes lie close (gaps of at most ``max_gap``) merged
    into reads of at most ``max_bytes``: a differential checkpoint's blocks lie in short runs
    across the segments of several saves, and one larger read beats many small ones. The gap
    bytes are read and dropped. The spans come file by file, in the order the requests first
    name each file, each front to back: the order a window read in place submits them in
    (``Reader._submit``)."""
    out: list[Span] = []
    by_segment: dict[str, list[Request]] = {}
    for r in requests:
        by_segment.setdefault(r.segment, []).append(r)
    for segment, reqs in by_segment.items():
        reqs.sort(key=lambda r: r.offset)
        run = [reqs[0]]
        for r in reqs[1:]:
            end = run[-1].offset + run[-1].length
            if 0 <= r.offset - end <= max_gap and r.offset + r.length - run[0].offset <= max_bytes:
                run.append(r)
            else:
                out.append(_span(segment, run))
                run = [r]
        out.append(_span(segment, run))
    return out


Target = tuple[memoryview, str]
"""Where a request's bytes land, and what they are (for the errors that name it)."""


def _span(segment: str, run: list[Request]) -> Span:
    return Span(segment, run[0].offset, run[-1].offset + run[-1].length - run[0].offset,
                tuple(run))


class Fetcher:
    """A pool of reader threads over one store. Use as a context manager."""

    def __init__(self, store: Store, threads: int,
                 stall_s: float = STALL_S) -> None:
        self.store = store
        self.stall_s = stall_s
        """``results`` gives up after this long without a read done (dckpt.watchdog)."""
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dckpt-read")
        self._lock = threading.Lock()
        self.io_s = 0.0
        """Thread-seconds spent reading (summed over the reader threads)."""
        self.verify_s = 0.0
        """Thread-seconds spent decoding and checking digests."""
        self.bytes_read = 0
        """Stored bytes read so far (what a long load's progress says)."""

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is Stalled:  # readers blocked in the kernel: neither waited for nor their
            self._pool.shutdown(wait=False, cancel_futures=True)  # files closed under them
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close_files()

    def results(self, futures: Sequence[Future[int]]) -> list[int]:
        """The futures' results (bytes read), in order; Stalled past ``stall_s`` without
        one done: a failed load leaves its destination tensors undefined, and here they may
        still change, if the storage answers again."""
        return wait_all(futures, self.stall_s, f"reads from {self.store.url}")

    def submit(self, request: Request, dest: memoryview, what: str) -> Future[int]:
        return self._pool.submit(self.fetch, request, dest, what)

    def submit_span(self, span: Span, targets: Sequence[Target]) -> Future[int]:
        """Read ``span``; ``targets[i]`` receives ``span.parts[i]`` (see ``fetch_span``)."""
        if len(span.parts) == 1:
            return self.submit(span.parts[0], *targets[0])
        return self._pool.submit(self.fetch_span, span, targets)

    def fetch_span(self, span: Span, targets: Sequence[Target]) -> int:
        """Read a span's requests, each into its target (the requests of several tensors
        share a span: a state of many small tensors is read in a few large reads, not one
        per tensor), and verify them, as ``fetch`` would for each; returns the bytes read.

        Local files: vectored reads straight into the destinations, one per run of adjacent
        requests; the gaps are not read (with gaps of up to 1 MiB read, a differential
        checkpoint's restore read 1.45x the bytes and its read phase took 1.1-1.3x as long:
        docs/benchmarks.md).
        Elsewhere (and for compressed blocks): the whole span, gaps and all, into a buffer of
        its own, then copied: one request to an object store costs more than the gap."""
        if self.store.vectored and all(p.blocks[0][0].codec == "raw" for p in span.parts):
            return self._fetch_span_vectored(span, targets)
        buf = memoryview(bytearray(span.length))
        self.fetch(Request(span.segment, span.offset, span.length, 0, ()), buf, targets[0][1])
        for req, (dest, what) in zip(span.parts, targets):
            rel = req.offset - span.offset
            piece = buf[rel: rel + req.length]
            t0 = time.perf_counter()
            ref, pos = req.blocks[0]
            if ref.codec != "raw":
                decode(ref.codec, piece, dest[pos: pos + ref.raw_length], what=what)
            else:
                dest[req.dest_start: req.dest_start + req.length] = piece
            for ref, pos in req.blocks:
                check(dest[pos: pos + ref.raw_length], ref, what=what)
            with self._lock:
                self.verify_s += time.perf_counter() - t0
        return span.length

    def _fetch_span_vectored(self, span: Span, targets: Sequence[Target]) -> int:
        calls: list[tuple[int, list[memoryview], list[str]]] = []
        views: list[memoryview] = []
        whats: list[str] = []
        start = end = span.offset
        for part, (dest, what) in zip(span.parts, targets):
            if part.offset != end:
                calls.append((start, views, whats))
                views, whats, start = [], [], part.offset
            views.append(dest[part.dest_start: part.dest_start + part.length])
            whats.append(what)
            end = part.offset + part.length
        calls.append((start, views, whats))
        t0 = time.perf_counter()
        read = sum(self._read(span.segment, offset, outs, whats[0], whats)
                   for offset, outs, whats in calls)
        t1 = time.perf_counter()
        for part, (dest, what) in zip(span.parts, targets):
            for ref, pos in part.blocks:
                check(dest[pos: pos + ref.raw_length], ref, what=what)
        self._timed(t0, t1, time.perf_counter())
        return read

    def _read(self, segment: str, offset: int, outs: list[memoryview], what: str,
              whats: Sequence[str] = ()) -> int:
        """Fill ``outs`` from ``offset`` of ``segment`` (one buffer: any store; several: a
        vectored read); a missing or short object is an IntegrityError, naming ``what`` (or
        ``whats[i]``, what ``outs[i]`` is for, the first buffer the object came short of)."""
        want = sum(len(v) for v in outs)
        try:
            n = (self.store.read_into(segment, offset, outs[0]) if len(outs) == 1
                 else self.store.read_vectored(segment, offset, outs))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):  # a file or a
            raise IntegrityError(  # folder where its folder or itself belongs: as gone
                f"{what}: object {segment} is missing from {self.store.url}") from None
        except OSError as e:
            if e.errno not in UNREADABLE:
                raise
            raise IntegrityError(f"{what}: object {segment} of {self.store.url} cannot be "
                                 f"read ({e.strerror or e})") from None
        if n != want:
            if whats:  # the first buffer not filled
                filled = 0
                for view, name in zip(outs, whats):
                    filled += len(view)
                    if filled > n:
                        what = name
                        break
            raise IntegrityError(
                f"{what}: object {segment} is truncated: asked {want} bytes at offset "
                f"{offset}, got {n}")
        with self._lock:
            self.bytes_read += n
        return n

    def _timed(self, t0: float, t1: float, t2: float) -> None:
        """Reading from t0 to t1, decoding and checking from t1 to t2."""
        with self._lock:
            self.io_s += t1 - t0
            self.verify_s += t2 - t1

    def submit_check(self, request: Request, what: str) -> Future[int]:
        """Read and verify a request into a buffer of its own (memory: one per thread)."""
        return self._pool.submit(self._check, request, what)

    def _check(self, req: Request, what: str) -> int:
        shifted = Request(req.segment, req.offset, req.length, 0,
                          tuple((ref, pos - req.dest_start) for ref, pos in req.blocks))
        size = max(pos + ref.raw_length for ref, pos in shifted.blocks)
        return self.fetch(shifted, memoryview(bytearray(size)), what)

    def fetch(self, req: Request, dest: memoryview, what: str) -> int:
        """Read one request into ``dest`` (decoding a compressed block) and verify its blocks;
        returns the stored bytes read."""
        encoded = bool(req.blocks) and req.blocks[0][0].codec != "raw"  # then the only block
        if encoded:
            out = memoryview(bytearray(req.length))
        else:
            out = dest[req.dest_start: req.dest_start + req.length]
        t0 = time.perf_counter()
        n = self._read(req.segment, req.offset, [out], what)
        t1 = time.perf_counter()
        if encoded:
            ref, pos = req.blocks[0]
            decode(ref.codec, out, dest[pos: pos + ref.raw_length], what=what)
        for ref, pos in req.blocks:
            check(dest[pos: pos + ref.raw_length], ref, what=what)
        self._timed(t0, t1, time.perf_counter())
        return n


READ_THREADS = 8
READ_REQUEST_BYTES = 16 << 20
"""Whole-item reads (status, health, export): threads, and bytes per coalesced request."""


def read_stored_sample(store: Store, m: Manifest, nbytes: int) -> int:
    """Read (and verify) stored data of ``m`` until ``nbytes`` are read: the bytes read."""
    done = 0
    try:
        with Fetcher(store, READ_THREADS) as fetcher:
            for fqn, d in m.datas():
                if done >= nbytes:
                    return done
                done += len(read_stored(fetcher, d, f"item {fqn!r} of step {m.step}"))
    finally:
        store.close_files()
    return done


def read_stored(fetcher: Fetcher, data: StoredData, what: str) -> bytearray:
    """The raw bytes of one stored item, every block verified (coalesced parallel reads)."""
    out = bytearray(data.nbytes)
    _, picked = blocks_in_range(data, 0, data.nbytes)
    fetcher.results([fetcher.submit(req, memoryview(out), what)
                     for req in coalesce(picked, READ_REQUEST_BYTES)])
    return out

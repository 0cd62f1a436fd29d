"""DCP StorageReader: parallel, coalesced, verified reads of one committed checkpoint.

Call order (DCP's ``load`` drives it)::

    (all ranks)   read_metadata          the manifest, as DCP Metadata
    (all ranks)   set_up_storage_reader -> prepare_local_plan
    (coordinator) prepare_global_plan
    (all ranks)   read_data              reads, verifies and copies this rank's boxes

Tensor boxes that land whole in a contiguous CPU tensor of the same dtype are read straight
into it; other boxes go through host buffers bounded by ``LoadConfig.read_buffer_bytes``, and
only the blocks that hold the needed bytes are read where the needed box is contiguous.

The buffered boxes are read in windows of at most half that bound, two at a time: the reads
of the next window run while the caller's thread copies the last one out. Windows bound for
the GPU are smaller (``PINNED_WINDOW_BYTES``), in pinned memory that the caching host
allocator hands from one window to the next: pinning costs about 0.5 s per GiB, and with a
1 GiB window a load of 4 GiB from the memory tier onto an H200 took 1.02-1.07 s, with these
0.47 s (docs/benchmarks.md, The H200 machine).
"""

from __future__ import annotations

import dataclasses
import io
import time
from concurrent.futures import Future as PoolFuture
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dckpt import dist
from dckpt.arguments import check_checkpoint_id, check_config, check_step
from dckpt.config import LoadConfig
from dckpt.dtypes import dtype_from_name, flat_bytes
from dckpt.errors import ArgumentError
from dckpt.manifest import ChunkEntry, Manifest, StoredData
from dckpt.overlaps import ReadApart
from dckpt.planner import SafeLoadPlanner
from dckpt.read_plan import Shared, box_range, share_replicated, to_dcp_metadata
from dckpt.reads import Fetcher, Request, Target, blocks_in_range, coalesce, spans
from dckpt.repository import read_manifest
from dckpt.storage import Store
from dckpt.torch_internals import narrow_tensor_by_index
from dckpt.values import RawBytes, safe_load
from dckpt.watchdog import reported

__all__ = ["Reader"]

SPAN_GAP_BYTES = 1 << 20
"""Requests of one object at most this far apart are read as one (the gap is dropped)."""
PINNED_WINDOW_BYTES = 64 << 20
"""A window of boxes bound for the GPU holds at most this much pinned memory; a box larger
than this goes through ordinary memory and a blocking copy (pinning it would cost more)."""
PINNED_REQUEST_BYTES = 8 << 20
"""The longest read into a pinned window: 8 or more reads in flight in each."""


@dataclass
class _Value:
    """One stored non-tensor value being read: its buffer and the reads filling it."""

    fqn: str
    encoding: str
    items: list[ReadItem]
    buf: bytearray
    futures: list[PoolFuture[int]]


@dataclass
class _Job:
    """One stored tensor box and the read items (destinations) that need bytes from it."""

    fqn: str
    dtype: torch.dtype
    chunk: ChunkEntry
    items: list[ReadItem]
    targets: list[torch.Tensor]
    buffer: torch.Tensor            # uint8: the destination itself when ``direct``, else
                                    # made when its window is submitted (``_submit``)
    first: int                      # raw byte offset of the chunk where ``buffer`` begins
    direct: bool
    nbytes: int = 0                 # the buffer's size, when not ``direct``
    pinned: bool = False            # ``buffer`` is pinned; its copy to the GPU is asynchronous
    futures: list[PoolFuture[int]] = field(default_factory=list)


@dataclass
class _Window:
    """Tensors whose reads are submitted together, and those reads."""

    jobs: list[_Job]
    futures: list[PoolFuture[int]]


def _raw_value(buf: bytearray, planner: LoadPlanner) -> io.BytesIO:
    """A stored io.BytesIO's contents as ``planner.load_bytes`` takes them: dckpt's planner
    takes them as they are; DCP's own unpickles what it is given, so it gets the BytesIO
    pickled here, from these bytes (nothing from the checkpoint is unpickled)."""
    if isinstance(planner, SafeLoadPlanner):
        return RawBytes(buf)
    out = io.BytesIO()
    torch.save(io.BytesIO(bytes(buf)), out)
    out.seek(0)
    return out


_UNMADE = torch.empty(0, dtype=torch.uint8)
"""A buffered box's buffer until its window is submitted."""

REQUEST_BYTES = 16 << 20
"""The longest ranged read by default (``LoadConfig.read_request_bytes=None``)."""


class Reader(StorageReader):
    """Reads the checkpoint of ``step`` (None: the newest committed) from ``url``;
    ``manifest``: that checkpoint's, already read (``dckpt.inspect``), not read again."""

    def __init__(self, url: str, *, step: int | None = None, storage_options: dict | None = None,
                 config: LoadConfig | None = None, manifest: Manifest | None = None) -> None:
        super().__init__()
        self.store = Store(url, storage_options)
        self.step = check_step(step, optional=True)
        self.config = check_config(config, LoadConfig) or LoadConfig()
        self.store.stall_s = self.config.io_stall_timeout_s
        self.request_bytes = self.config.read_request_bytes or REQUEST_BYTES
        """The longest ranged read (``LoadConfig.read_request_bytes``, or its default)."""
        self.manifest = check_manifest(manifest, self.step)
        self.bytes_read = 0
        self.phase_s: dict[str, float] = {}
        """After a load, this rank: plan (DCP's planning up to the first read), read (the
        reads, checks and copies, wall), io_thread / verify_thread (thread-seconds in reads
        and in decoding and checking), copy (wall, into destinations not read in place)."""
        self._t_plan = 0.0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._storage: dict[MetadataIndex, tuple[str, ChunkEntry | StoredData]] = {}
        self._items: list[ReadItem] | None = None  # this rank's, while the coordinator plans
        self.keep_items = False
        """Set by dckpt's load, whose planner's global plan needs no rank's reads."""

    def reset(self, checkpoint_id: object = None) -> None:
        check_checkpoint_id(checkpoint_id, self.store.url, "Reader")
        self.bytes_read = 0
        self.phase_s = {}
        self._items = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: object) -> bool:
        return False

    def read_metadata(self) -> Metadata:
        self._t_plan = time.perf_counter()
        if self.manifest is None:
            self.manifest = read_manifest(self.store, self.step)
        md = to_dcp_metadata(self.manifest)
        self._storage = md.storage_data
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: object,
                              **kwargs: object) -> None:
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """(all ranks) The plan as the coordinator needs it: without its items (a read per
        tensor box, pickled, gathered and sent back: 1.2 s of a 3.3 s load of 25,000 small
        tensors per rank on 2 ranks) unless the global plan moves them (``plans_items``);
        ``read_data`` takes them back. Only under dckpt's own planner (``keep_items``):
        another's global plan may look at them."""
        if self.plans_items or not self.keep_items:
            return plan
        self._items = plan.items
        return dataclasses.replace(plan, items=[])

    @property
    def plans_items(self) -> bool:
        """Whether the coordinator's global plan changes which rank reads what."""
        return self.broadcasts

    @property
    def broadcasts(self) -> bool:
        mode = self.config.replicated
        return mode == "broadcast" or (mode == "auto" and not self.store.local)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """(coordinator) Read-once replicated state: a stored box that every rank reads
        whole, into one tensor, is read by one rank (spread by bytes) and broadcast."""
        if not self.broadcasts or len(plans) < 2:
            return plans
        return share_replicated(plans, self._storage)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        t_read = time.perf_counter()
        if self._items is not None:
            assert not plan.items  # the coordinator's plan, without them
            plan, self._items = dataclasses.replace(plan, items=self._items), None
        self._copy_s = 0.0
        shared: list[Shared] = plan.storage_data or []
        apart: ReadApart | None = None
        try:
            flat = getattr(planner, "state_dict", None)  # dckpt's planner reads ties apart
            if not isinstance(planner, SafeLoadPlanner) and isinstance(flat, dict):
                apart = ReadApart(flat)
            self._read_items(plan, planner)
        except BaseException:
            if apart is not None:
                apart.finish(read=False)
            if shared:  # the peers learn of it and skip the broadcasts; DCP reports this
                dist.any_true(True, self._group())
            raise
        self.phase_s = {"plan": t_read - self._t_plan if self._t_plan else 0.0,
                        "read": time.perf_counter() - t_read, "io_thread": self._io_s,
                        "verify_thread": self._verify_s, "copy": self._copy_s}
        if shared and not dist.any_true(False, self._group()):
            t0 = time.perf_counter()
            self._broadcast(shared, planner)
            self.phase_s["broadcast"] = time.perf_counter() - t0
        if apart is not None:  # after every collective: a refusal here leaves none waiting
            apart.finish(read=True)
        self.phase_s["read"] = time.perf_counter() - t_read
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _group(self) -> dist.ProcessGroup | None:
        return dist.checkpoint_group(self.config.collective_timeout_s)

    def _broadcast(self, shared: list[Shared], planner: LoadPlanner) -> None:
        """Every rank, the same order: each owner sends what it read, the others receive."""
        me = dist.rank()
        group = self._group()
        for s in shared:
            target = planner.resolve_tensor(s.item).detach()  # see _job
            # as bytes: gloo refuses float8, int16 and uint16-64 ("Invalid scalar type");
            # through the host, for gloo carries CPU tensors
            if plain_cpu(target):
                staging = target
            elif me == s.owner:
                staging = target.resolve_conj().resolve_neg().to("cpu", copy=True).contiguous()
            else:
                staging = torch.empty(target.shape, dtype=target.dtype)
            if staging.numel():
                dist.broadcast_tensor(flat_bytes(staging), s.owner, group)
            if me != s.owner:
                if staging is not target:
                    target.copy_(staging)
                planner.commit_tensor(s.item, target)

    def _read_items(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        self._io_s = self._verify_s = 0.0
        try:
            self._read_windows(plan, planner)
        finally:
            self._wait_copies()

    def _read_windows(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        groups: dict[MetadataIndex, list[ReadItem]] = {}
        for item in plan.items:
            groups.setdefault(item.storage_index, []).append(item)
        step = self.manifest.step if self.manifest else self.step
        with Fetcher(self.store, self.config.reader_threads,
                     self.config.io_stall_timeout_s) as fetcher, reported(
                f"rank {dist.rank()}: load of step {step} from {self.store.url}",
                lambda: fetcher.bytes_read, loud=dist.rank() == 0):
            window: list[_Job] = []
            window_bytes = 0
            reading: _Window | None = None  # submitted, its copies not yet made
            half = max(1, self.config.read_buffer_bytes // 2)  # two windows at once
            pinned = False  # the window holds a pinned buffer
            values: list[_Value] = []  # small: read beside the tensors, delivered last
            for index, items in groups.items():
                kind, stored = self._storage[index]
                if isinstance(stored, StoredData):
                    values.append(self._start_value(fetcher, index.fqn, stored, kind, items))
                    continue
                job = self._job(index.fqn, dtype_from_name(kind), stored, items, planner)
                bound = min(half, PINNED_WINDOW_BYTES) if pinned or job.pinned else half
                if window and window_bytes + job.nbytes > bound:
                    reading = self._advance(fetcher, window, reading, planner)
                    window, window_bytes, pinned = [], 0, False
                window.append(job)
                window_bytes += job.nbytes
                pinned = pinned or job.pinned
            reading = self._advance(fetcher, window, reading, planner)
            if reading is not None:
                self._finish(fetcher, reading, planner)
            for value in values:
                self.bytes_read += sum(fetcher.results(value.futures))
                self.deliver_value(value.buf, value.fqn, value.encoding, value.items, planner)
        self._io_s, self._verify_s = fetcher.io_s, fetcher.verify_s

    # -- internals ---------------------------------------------------------------------

    def _what(self, kind: str, fqn: str) -> str:
        step = self.manifest.step if self.manifest else self.step
        return f"{kind} {fqn!r} of checkpoint step {step} in {self.store.url}"

    def _start_value(self, fetcher: Fetcher, fqn: str, data: StoredData, encoding: str,
                     items: list[ReadItem]) -> _Value:
        """A stored value's reads, submitted: the reader threads fetch the many small values
        of a state dict (optimizer hyper-parameters, scheduler state) in parallel."""
        buf = bytearray(data.nbytes)
        _, picked = blocks_in_range(data, 0, data.nbytes)
        what = self._what("value", fqn)
        futures = [fetcher.submit(req, memoryview(buf), what)
                   for req in coalesce(picked, self.request_bytes)]
        return _Value(fqn, encoding, items, buf, futures)

    def deliver_value(self, buf: bytearray, fqn: str, encoding: str, items: list[ReadItem],
                      planner: LoadPlanner) -> None:
        """A value's checked bytes into the state dict."""
        what = self._what("value", fqn)
        if encoding == "bytes":  # an io.BytesIO's contents, never unpickled
            for item in items:
                planner.load_bytes(item, _raw_value(buf, planner))
            return
        if not isinstance(planner, SafeLoadPlanner):
            safe_load(buf, what)  # refuses before another planner unpickles it
        for item in items:
            planner.load_bytes(item, io.BytesIO(buf))

    def _job(self, fqn: str, dtype: torch.dtype, chunk: ChunkEntry, items: list[ReadItem],
             planner: LoadPlanner) -> _Job:
        # detached: a parameter that requires grad (``named_parameters()``) takes no
        # in-place copy otherwise; its memory is the same
        targets = [planner.resolve_tensor(item).detach() for item in items]
        t = targets[0]
        whole = (len(items) == 1 and tuple(items[0].lengths) == chunk.sizes
                 and not any(items[0].storage_offsets))
        if whole and plain_cpu(t) and t.dtype == dtype and chunk.data.nbytes > 0:
            dest = flat_bytes(t)
            return _Job(fqn, dtype, chunk, items, targets, dest, 0, True)
        ranges = [box_range(chunk.sizes, tuple(i.storage_offsets), tuple(i.lengths)) for i in items]
        if all(r is not None for r in ranges):
            lo = min(r[0] for r in ranges) * dtype.itemsize  # type: ignore[index]
            hi = max(r[1] for r in ranges) * dtype.itemsize  # type: ignore[index]
        else:
            lo, hi = 0, chunk.data.nbytes
        first, picked = blocks_in_range(chunk.data, lo, hi)
        size = sum(ref.raw_length for ref, _ in picked)
        # CUDA destinations: a pinned buffer, so that the copy to the device runs
        # asynchronously while the next reads go on (see _finish), unless it is large
        pinned = size <= PINNED_WINDOW_BYTES and any(t.device.type == "cuda" for t in targets)
        return _Job(fqn, dtype, chunk, items, targets, _UNMADE, first, False, size, pinned)

    def _advance(self, fetcher: Fetcher, window: list[_Job], reading: _Window | None,
                 planner: LoadPlanner) -> _Window | None:
        """Submit ``window``'s reads, then deliver the window read before it: the next
        window's reads run while this thread copies the last one's bytes out."""
        submitted = self._submit(fetcher, window) if window else None
        if reading is not None:
            self._finish(fetcher, reading, planner)
        return submitted

    def _submit(self, fetcher: Fetcher, window: list[_Job]) -> _Window:
        """Start a window's reads. The requests of every tensor in the window are merged
        into spans, so that tensors stored side by side are read together (20,000 tensors of
        64 bytes: a few reads, not 20,000, and the reader threads no longer take the
        interpreter from the caller's thread 20,000 times). Spans go to the pool in the
        order of the first tensor they fill, the order they are delivered in, when a
        tensor is copied out of a buffer; a window read in place delivers nothing, and its
        spans keep the order ``spans`` makes: each file front to back, one file after the
        other, the reads in flight over one or two files instead of all of them (cold, four
        segment files per rank: one process x 2 GiB 1.12-1.18x faster, two ranks x 1 GiB
        1.31x; docs/benchmarks.md, Read settings and order)."""
        longest = self.request_bytes
        if any(job.pinned for job in window):
            longest = min(longest, PINNED_REQUEST_BYTES)
        parts: list[Request] = []
        owners: dict[int, tuple[int, Target]] = {}  # id(request): (its job's index, target)
        for i, job in enumerate(window):
            if not job.direct:  # made now, not when planned: two windows' buffers at most
                job.buffer = torch.empty(job.nbytes, dtype=torch.uint8, pin_memory=job.pinned)
            _, picked = blocks_in_range(job.chunk.data, job.first,
                                        job.first + job.buffer.numel())
            target = (memoryview(job.buffer.numpy()), self._what("tensor", job.fqn))  # type: ignore[arg-type]
            for req in coalesce(picked, longest):
                parts.append(req)
                owners[id(req)] = (i, target)
        merged = spans(parts, longest, SPAN_GAP_BYTES)
        if not all(job.direct for job in window):
            merged.sort(key=lambda span: min(owners[id(p)][0] for p in span.parts))
        futures = []
        for span in merged:
            future = fetcher.submit_span(span, [owners[id(p)][1] for p in span.parts])
            futures.append(future)
            for i in {owners[id(p)][0] for p in span.parts}:
                window[i].futures.append(future)
        return _Window(window, futures)

    def _finish(self, fetcher: Fetcher, reading: _Window, planner: LoadPlanner) -> None:
        """Deliver a submitted window: wait for each tensor's reads, in order, and copy it
        into its destinations."""
        waited: set[int] = set()  # a span shared by many tensors is waited for once
        for job in reading.jobs:
            fresh = [f for f in job.futures if id(f) not in waited]
            if fresh:
                fetcher.results(fresh)
                waited.update(map(id, fresh))
            for item, target in zip(job.items, job.targets):
                if not job.direct:
                    t0 = time.perf_counter()
                    if target.device.type == "cuda":
                        # on a side stream; from pinned memory it returns at once, and the
                        # caching host allocator keeps the buffer until the copy is done
                        bits, values = plain_bits(target, self._source(job, item))
                        with torch.cuda.stream(self._h2d_stream(target.device)):
                            bits.copy_(values, non_blocking=job.pinned)
                    else:
                        target.copy_(self._source(job, item))
                    self._copy_s += time.perf_counter() - t0
                planner.commit_tensor(item, target)
        self.bytes_read += sum(fetcher.results(reading.futures))

    def _h2d_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _wait_copies(self) -> None:
        """The destinations are complete when read_data returns."""
        for stream in self._streams.values():
            stream.synchronize()

    def _source(self, job: _Job, item: ReadItem) -> torch.Tensor:
        sizes = job.chunk.sizes
        rng = box_range(sizes, tuple(item.storage_offsets), tuple(item.lengths))
        isz = job.dtype.itemsize
        if rng is not None:
            a, b = rng[0] * isz - job.first, rng[1] * isz - job.first
            return job.buffer[a:b].view(job.dtype).reshape(tuple(item.lengths))
        whole = job.buffer.view(job.dtype).reshape(sizes)
        return narrow_tensor_by_index(whole, item.storage_offsets, item.lengths)


def check_manifest(manifest: object, step: int | None) -> Manifest | None:
    """``Reader(manifest=)``: a Manifest of ``step`` when one is named. Another step's would
    load that step's values under this one's name."""
    if manifest is None:
        return None
    if not isinstance(manifest, Manifest):
        raise ArgumentError("Reader: manifest must be a dckpt.Manifest (dckpt.inspect(url, "
                            f"step=...)) or None, got {type(manifest).__name__}")
    if step is not None and manifest.step != step:
        raise ArgumentError(f"Reader: step={step} but the manifest given is step "
                            f"{manifest.step}'s; name one step, or pass the manifest alone")
    return manifest


def plain_bits(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target``'s memory seen without its lazy conjugation or negation, and ``source``'s
    values as that memory must hold them: a copy between the two moves bits alone. torch
    2.11's non-blocking copies between host and GPU dropped a lazy negation."""
    if target.is_conj():
        target, source = target.conj(), source.conj()
    if target.is_neg():
        target, source = torch._neg_view(target), torch._neg_view(source)
    return target, source.resolve_conj().resolve_neg()


def plain_cpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory holds its values as they read, in order: a contiguous CPU tensor
    that is no lazy conjugate or negation (those read as the conjugate of their memory)."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()

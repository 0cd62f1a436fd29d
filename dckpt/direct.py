"""Local files written with ``O_DIRECT``: the pages of a buffer go from the caller's memory
to the disk without a copy into the page cache (docs/design.md, Direct I/O). ``Store`` opens
them for local segments (``open_write(direct=True)``)."""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import threading

import numpy as np

from dckpt.mounts import mount_source, watched_filesystem

__all__ = ["DirectFile", "DIRECT_ALIGN", "Windows", "WINDOWS", "address", "direct_pad",
           "huge_page_share", "pages_cap_requests", "tensors_on_huge_pages"]

DIRECT_ALIGN = 4096


class Windows:
    """Page-aligned buffers that writes copy their bytes through, kept from save to save.

    Why copy at all: a process's first allocations, where a training's model and optimizer
    usually lie, get its most scattered physical pages, and a disk whose requests take one
    descriptor per run of pages (virtio without indirect descriptors) then takes 1 MiB
    requests, one at a time, from them. The same bytes copied into windows on huge pages,
    made once, wrote 1.09-1.20x faster on the 2-core machine's disk, the copy included.
    Windows on 4 KiB pages lie no better than the state where memory is fragmented (a
    window mapped afresh for every file, or faulted in by four writer threads at once,
    wrote slower than no copy), so they are used only where the kernel gives them huge
    pages (``lies_well``), the tensors do not lie on such pages already
    (``tensors_on_huge_pages``: there the copy cost up to 6%), and the disk is one that
    takes scattered pages slowly (``pages_cap_requests``; elsewhere the copy would buy
    nothing): docs/benchmarks.md, Writes through reused windows.
    """

    def __init__(self) -> None:
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._well: dict[int, bool] = {}
        self._lock = threading.Lock()
        self.made = 0
        """Windows mapped so far (each is reused after)."""

    def lies_well(self, nbytes: int) -> bool:
        """Whether windows of ``nbytes`` get huge pages in this process (the first one made
        tells, once: 20 ms to read ``/proc/self/smaps``)."""
        with self._lock:
            well = self._well.get(nbytes)
            if well is None:
                window = self._make(nbytes)
                well = self._well[nbytes] = huge_page_share(window) >= 0.5
                if well:
                    self._idle.setdefault(nbytes, []).append(window)
                else:
                    window.close()
            return well

    def take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            idle = self._idle.get(nbytes)
            return idle.pop() if idle else self._make(nbytes)

    def give(self, window: mmap.mmap) -> None:
        with self._lock:
            self._idle.setdefault(len(window), []).append(window)

    def _make(self, nbytes: int) -> mmap.mmap:
        """(under the lock) A window, its pages faulted in here, in order and one window at a
        time: writer threads that fault theirs in at once, by their first copies,
        interleave them."""
        self.made += 1
        # private: a shared anonymous mapping is shmem, which takes no huge pages
        window = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            window.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no transparent huge pages here
            pass
        np.frombuffer(window, dtype=np.uint8).fill(0)
        return window


@functools.cache
def tensors_on_huge_pages() -> bool:
    """Whether torch's CPU allocator puts large tensors on transparent huge pages, where they
    write as fast as from any window (asked for with ``THP_MEM_ALLOC_ENABLE=1``, or given to
    every allocation in the kernel's mode ``always``)."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return True
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


VIRTIO_RING_F_INDIRECT_DESC = 28
"""The virtio feature bit of a ring whose requests take one slot, whatever their pages."""


def _block_folder(path: str, sys_root: str, mounts: list[str] | None) -> str | None:
    """The sysfs folder of the block device that holds ``path``: by the file system's
    device number, else by the ``/dev`` node its mount names (btrfs reports a number of its
    own)."""
    st_dev = os.stat(path).st_dev
    folder = f"{sys_root}/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"
    if os.path.isdir(folder):
        return os.path.realpath(folder)
    if mounts is None:
        try:
            with open("/proc/self/mounts") as f:
                mounts = f.read().splitlines()
        except OSError:
            return None
    source = mount_source(path, mounts)
    if source.startswith("/dev/"):
        folder = f"{sys_root}/class/block/{os.path.basename(os.path.realpath(source))}"
        if os.path.isdir(folder):
            return os.path.realpath(folder)
    return None


def _slot_per_page(folder: str, depth: int = 0) -> bool:
    """Whether the block device at sysfs ``folder`` is a virtio disk without indirect
    descriptors (a partition: its disk's; a device-mapper or md device: all of the disks
    under it), and a request's segment may be longer than a page."""
    slaves = os.path.join(folder, "slaves")
    names = sorted(os.listdir(slaves)) if os.path.isdir(slaves) else []
    if names:
        return depth < 4 and all(
            _slot_per_page(os.path.realpath(os.path.join(slaves, n)), depth + 1)
            for n in names)
    queue = next((q for q in (os.path.join(folder, "queue"),
                              os.path.join(os.path.dirname(folder), "queue"))
                  if os.path.isdir(q)), None)
    try:
        with open(os.path.join(queue or folder, "max_segment_size")) as f:
            if int(f.read().split()[0]) <= DIRECT_ALIGN:
                return False  # a huge page's run makes as many segments as single pages
    except (OSError, ValueError, IndexError):
        pass
    up = folder
    for _ in range(8):  # vda1 -> vda -> block -> virtio1
        up = os.path.dirname(up)
        subsystem = os.path.realpath(os.path.join(up, "subsystem"))
        if os.path.basename(subsystem) == "virtio" and os.path.isfile(
                os.path.join(up, "features")):
            with open(os.path.join(up, "features")) as f:
                bits = f.read().strip()
            return len(bits) > VIRTIO_RING_F_INDIRECT_DESC and \
                bits[VIRTIO_RING_F_INDIRECT_DESC] == "0"
    return False


_SLOT_PER_PAGE: dict[int, bool] = {}


def pages_cap_requests(path: str, sys_root: str = "/sys",
                       mounts: list[str] | None = None) -> bool:
    """Whether the disk under ``path`` takes fewer requests at once from memory in scattered
    4 KiB pages than from runs of pages: a virtio disk without indirect descriptors, whose
    ring gives every run of pages of a request a slot of its own (the 2-core machine's: a
    request of 254 single pages fills it, and the next waits). NVMe, or virtio with indirect
    descriptors, takes a request's pages as one list: no. False where the device is
    unknown (tmpfs, a network or FUSE file system, no sysfs). A path not made yet is asked
    of the nearest folder above it. Cached per file system."""
    path = os.path.abspath(path)
    if sys_root == "/sys" and watched_filesystem(path):  # not a disk; and its calls may hang
        return False
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st_dev = os.stat(path).st_dev
        if sys_root == "/sys" and st_dev in _SLOT_PER_PAGE:
            return _SLOT_PER_PAGE[st_dev]
        folder = _block_folder(path, sys_root, mounts)
        answer = folder is not None and _slot_per_page(folder)
    except (OSError, ValueError):  # sysfs unreadable, or not what it should be: unknown
        return False
    if sys_root == "/sys":
        _SLOT_PER_PAGE[st_dev] = answer
    return answer


def huge_page_share(window: mmap.mmap) -> float:
    """The share of the mapping that holds ``window`` that lies on transparent huge pages
    (``AnonHugePages`` in ``/proc/self/smaps``, over the mapping's size: the kernel merges
    neighbouring mappings of the same kind, other windows among them, into one; 0 where
    that cannot be read)."""
    start = address(memoryview(window))
    try:
        with open("/proc/self/smaps") as f:
            size = 0
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    size = hi - lo if lo <= start < hi else 0
                elif size and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024 / size
    except (OSError, ValueError):
        pass
    return 0.0


WINDOWS = Windows()
"""The process's windows (``SaveConfig.write_window_bytes``): as many as writer threads
ever wrote at once."""
if hasattr(os, "register_at_fork"):  # a child forked while a thread held the lock
    os.register_at_fork(after_in_child=lambda: setattr(WINDOWS, "_lock", threading.Lock()))


class DirectFile:
    """A local file written through ``O_DIRECT``, for the bytes of large buffers.

    ``write`` sends the pages of a buffer straight from its memory to the disk (no copy)
    whenever its first page-aligned address falls on a page boundary of the file, and
    everything else through an aligned bounce buffer. A buffer's bytes before its first
    page-aligned address complete the bounce buffer's partial page, so a caller that places
    an item at a file offset congruent to its memory address (``direct_pad``) has all but
    its first and last page written without a copy, from any address (a tensor's memory is
    64-byte aligned, not page-aligned: measured, the copy through the bounce buffer cost 30%
    of a save's throughput on 2 cores). ``close`` writes the last partial page padded, cuts
    the file to the bytes written, and fsyncs it. A filesystem that refuses ``O_DIRECT`` (at
    open or at the first write) gets buffered writes instead. The file holds exactly the
    bytes written, as a buffered file would.

    ``window_bytes``: every byte goes through a window of this size taken from ``WINDOWS``
    (given back at the end) instead, none straight from the caller's memory, which then
    needs no placement (``direct_pad``).
    """

    BOUNCE_BYTES = 4 << 20

    def __init__(self, path: str, window_bytes: int = 0) -> None:
        self.path = path
        self.direct = True
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.direct = False
        self.size = 0  # bytes accepted
        self.windowed = window_bytes > 0
        self._bounce = (WINDOWS.take(window_bytes) if self.windowed
                        else mmap.mmap(-1, self.BOUNCE_BYTES))  # page-aligned
        self._fill = 0

    def write(self, data: object) -> int:
        mv = memoryview(data).cast("B")  # type: ignore[arg-type]
        n = len(mv)
        if self.windowed:
            self._buffer(mv)
            self.size += n
            return n
        # bytes before the first page-aligned address (no page in less than one: a state's
        # many small tensors go to the bounce buffer without asking their address)
        head = -address(mv) % DIRECT_ALIGN if n >= DIRECT_ALIGN else 0
        if n - head >= DIRECT_ALIGN and (self._fill + head) % DIRECT_ALIGN == 0:
            self._buffer(mv[:head])  # completes the bounce buffer's partial page
            if self._fill:
                self._flush_bounce()
            k = (n - head) // DIRECT_ALIGN * DIRECT_ALIGN
            self._write_all(mv[head: head + k])
            mv = mv[head + k:]
        self._buffer(mv)
        self.size += n
        return n

    def _buffer(self, mv: memoryview) -> None:
        room = len(self._bounce)
        while len(mv):
            take = min(len(mv), room - self._fill)
            self._bounce[self._fill: self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == room:
                self._flush_bounce()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        """Write what the bounce buffer holds, cut the file to its size, make it durable."""
        if self._fill:
            pad = -self._fill % DIRECT_ALIGN
            self._bounce[self._fill: self._fill + pad] = bytes(pad)
            self._fill += pad
            self._flush_bounce()
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        self._release()

    def abort(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.windowed:
            self.windowed = False
            WINDOWS.give(self._bounce)  # a view a failed write's traceback holds only reads
            return
        try:
            self._bounce.close()
        except BufferError:  # a failed write's traceback still holds a view of it: the
            pass  # mapping goes with that view; its error, not this one, is the news

    def _flush_bounce(self) -> None:
        with memoryview(self._bounce) as mv:
            self._write_all(mv[: self._fill])
        self._fill = 0

    def _write_all(self, mv: memoryview) -> None:
        while len(mv):
            try:
                n = os.write(self.fd, mv)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # IMPORTANT: some filesystems accept O_DIRECT at open and refuse the write
                fcntl.fcntl(self.fd, fcntl.F_SETFL,
                            fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            mv = mv[n:]


def address(mv: memoryview) -> int:
    """The memory address of a buffer's first byte (0 for an empty one)."""
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if len(mv) else 0


def direct_pad(offset: int, buf: memoryview) -> int:
    """Zero bytes to write at file ``offset`` before ``buf`` so that a ``DirectFile`` writes
    all of ``buf``'s whole pages from its memory: the file offset of its first page-aligned
    address becomes page-aligned."""
    return -(offset + (-address(buf) % DIRECT_ALIGN)) % DIRECT_ALIGN

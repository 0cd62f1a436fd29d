"""O_DIRECT segment writes: the same bytes as a buffered write, whatever the alignment."""

from __future__ import annotations

import mmap
import os
import random

import numpy as np
import pytest
import torch

import dckpt
from dckpt.config import SaveConfig
from dckpt.direct import DIRECT_ALIGN, DirectFile, address, direct_pad
from dckpt.storage import Store
from dckpt.writer import SegmentOut


def _aligned_buffer(nbytes: int, seed: int) -> memoryview:
    m = mmap.mmap(-1, max(nbytes, 1))
    m[:nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    return memoryview(m)[:nbytes]


@pytest.mark.parametrize("seed", range(4))
def test_pieces_of_any_size_and_alignment_land_byte_for_byte(tmp_path, seed):
    rng = random.Random(seed)
    big = _aligned_buffer(9 << 20, seed)
    path = tmp_path / "seg"
    expected = bytearray()
    f = DirectFile(str(path))
    for _ in range(12):
        start = rng.choice([0, DIRECT_ALIGN, 2 * DIRECT_ALIGN, rng.randrange(0, 1 << 20)])
        length = rng.choice([0, 1, 4095, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 7,
                             rng.randrange(1, 5 << 20)])
        piece = big[start: start + length]
        assert f.write(piece) == len(piece)
        expected += piece
    f.write(b"tail")
    expected += b"tail"
    assert f.tell() == len(expected)
    f.close()
    assert path.read_bytes() == bytes(expected)


def test_aligned_buffer_goes_straight_to_disk_and_the_tail_is_cut(tmp_path):
    buf = _aligned_buffer(2 * DIRECT_ALIGN + 100, 1)
    f = DirectFile(str(tmp_path / "seg"))
    f.write(buf)
    assert f._fill == 100  # the aligned part did not pass through the bounce buffer
    f.close()
    assert os.path.getsize(tmp_path / "seg") == 2 * DIRECT_ALIGN + 100
    assert (tmp_path / "seg").read_bytes() == bytes(buf)


class CountingFile(DirectFile):
    """Counts the bytes that pass through the bounce buffer (copied) and those written
    straight from the caller's memory."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.copied = self.straight = 0

    def _flush_bounce(self) -> None:
        self.copied += self._fill
        super()._flush_bounce()

    def _write_all(self, mv: memoryview) -> None:
        if address(mv) != address(memoryview(self._bounce)):
            self.straight += len(mv)
        super()._write_all(mv)


@pytest.mark.parametrize("shift", [16, 64, 512, 4000])
def test_unaligned_memory_placed_by_direct_pad_is_written_without_a_copy(tmp_path, shift):
    """A tensor's memory is 64-byte aligned, not page-aligned: an item placed at the file
    offset ``direct_pad`` gives has every whole page written from its memory; only its first
    and last partial pages pass through the bounce buffer, and the bytes land exactly."""
    backing = _aligned_buffer(3 * (1 << 20) + 2 * DIRECT_ALIGN, shift)
    item = backing[shift: shift + 3 * (1 << 20) + 123]  # starts `shift` bytes past a page
    f = CountingFile(str(tmp_path / "seg"))
    f.write(b"header!")  # the file's offset is not page-aligned either
    pad = direct_pad(f.tell(), item)
    assert 0 <= pad < DIRECT_ALIGN and (f.tell() + pad + (-shift % DIRECT_ALIGN)) % DIRECT_ALIGN == 0
    f.write(bytes(pad))
    f.write(item)
    f.write(b"after")
    f.close()
    assert f.copied < 3 * DIRECT_ALIGN and f.straight >= len(item) - 2 * DIRECT_ALIGN
    data = (tmp_path / "seg").read_bytes()
    assert data == b"header!" + bytes(pad) + bytes(item) + b"after"


def test_segment_out_places_an_unaligned_tensor_for_direct_writes(tmp_path):
    t = torch.arange(600_000, dtype=torch.float32)[5:]  # 20 bytes past the allocation
    mv = memoryview(t.numpy()).cast("B")
    assert address(mv) % DIRECT_ALIGN != 0
    f = CountingFile(str(tmp_path / "seg"))
    out = SegmentOut(f, "seg", 256 << 10, align=DIRECT_ALIGN)
    out.append(memoryview(b"small value"))
    blocks = out.append(mv)
    f.close()
    assert f.copied < 3 * DIRECT_ALIGN  # the pages of the tensor went straight to the disk
    data = (tmp_path / "seg").read_bytes()
    first = blocks[0].offset
    assert data[first: first + len(mv)] == bytes(mv)
    assert (first + (-address(mv) % DIRECT_ALIGN)) % DIRECT_ALIGN == 0


def test_store_writes_direct_only_on_plain_local_files(tmp_path):
    assert Store(str(tmp_path)).direct_capable
    assert not Store(f"memory://{tmp_path.name}").direct_capable
    with Store(str(tmp_path)).open_write("a/b", direct=True) as f:
        assert isinstance(f, DirectFile)
        f.write(b"x" * 5000)
    assert (tmp_path / "a" / "b").read_bytes() == b"x" * 5000


def test_a_failed_direct_write_leaves_no_durable_object_claimed(tmp_path):
    with pytest.raises(RuntimeError):
        with Store(str(tmp_path)).open_write("seg", direct=True) as f:
            f.write(b"y" * 10)
            raise RuntimeError("boom")
    assert f.fd == -1  # closed, nothing fsynced


def test_segment_out_aligns_large_items_and_packs_small_ones(tmp_path):
    with Store(str(tmp_path)).open_write("seg", direct=True) as f:
        out = SegmentOut(f, "seg", 1 << 20, align=DIRECT_ALIGN)
        small = out.append(memoryview(b"abc"))
        large = out.append(_aligned_buffer(SegmentOut.ALIGN_FROM_BYTES + 5, 2))
        small2 = out.append(memoryview(b"de"))
    assert small[0].offset == 0
    assert large[0].offset == DIRECT_ALIGN
    assert small2[0].offset == DIRECT_ALIGN + SegmentOut.ALIGN_FROM_BYTES + 5


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(700_001, generator=g), "b": torch.randn(3, generator=g),
            "h": torch.randn(300, 1025, generator=g).half(), "n": 7}


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_save_load_round_trip_with_and_without_direct_io(tmp_path, direct, mode):
    state = _state(3)
    config = SaveConfig(direct_io=direct, block_size_bytes=1 << 20)
    url = str(tmp_path / "repo")
    if mode == "sync":
        dckpt.save(state, url, step=1, config=config)
    else:
        saver = dckpt.AsyncSaver()
        try:
            saver.async_save(state, url, step=1, config=config).wait(60)
        finally:
            saver.close()
    assert dckpt.verify(url).ok
    out = {"w": torch.zeros(700_001), "b": torch.zeros(3), "h": torch.zeros(300, 1025).half(),
           "n": 0}
    dckpt.load(out, url)
    for k in ("w", "b", "h"):
        assert torch.equal(out[k], state[k]), k
    assert out["n"] == 7


def test_a_large_item_whose_blocks_are_all_known_writes_not_even_padding(tmp_path):
    from dckpt.dedup import BlockIndex

    index = BlockIndex(None)
    big = _aligned_buffer(SegmentOut.ALIGN_FROM_BYTES + 5, 3)
    with Store(str(tmp_path)).open_write("a", direct=True) as f:
        SegmentOut(f, "a", 1 << 20, align=DIRECT_ALIGN, index=index).append(big)
    with Store(str(tmp_path)).open_write("b", direct=True) as f:
        out = SegmentOut(f, "b", 1 << 20, align=DIRECT_ALIGN, index=index)
        out.append(memoryview(b"xyz"))
        refs = out.append(big)
    assert all(r.segment == "a" for r in refs)
    assert (tmp_path / "b").read_bytes() == b"xyz"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_saves_info_says_where_this_ranks_time_went(tmp_path, mode):
    from dckpt.writer import RANK_PHASES

    state = {"w": torch.randn(4 << 20), "v": torch.randn(3 << 20), "n": 3}  # 28 MiB
    if mode == "sync":
        info = dckpt.save(state, str(tmp_path), step=1)
    else:
        saver = dckpt.AsyncSaver()
        info = saver.async_save(state, str(tmp_path), step=1).wait()
        saver.close()
        assert info.phase_s["stage"] > 0
    phases = info.phase_s
    assert set(RANK_PHASES) | {"rank_wait"} <= set(phases)
    assert phases["rank_io"] > 0 and phases["rank_hash"] > 0 and phases["rank_close"] > 0
    assert phases["rank_compress"] < 0.05 and phases["rank_copy"] == 0  # off locally; on CPU
    # wall time of the writes bounds each thread's share of it
    assert phases["rank_write"] >= phases["rank_io"] / dckpt.SaveConfig().writer_threads * 0.5
    assert phases["total"] >= phases["rank_write"] >= 0 and phases["rank_wait"] >= 0


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("nbytes", [0, 1, DIRECT_ALIGN + 3, (2 << 20) + 5])
def test_the_benchmarks_raw_host_memory_is_aligned_zeroed_and_written_straight(tmp_path, huge,
                                                                                nbytes):
    from dckpt.bench.methods import _aligned

    buf = _aligned(nbytes, huge)
    assert len(buf) == nbytes and not buf.readonly
    if not nbytes:
        return
    assert address(buf) % (2 << 20 if huge else DIRECT_ALIGN) == 0
    assert bytes(buf) == bytes(nbytes)  # touched: every page present, zeros
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    np.frombuffer(buf, dtype=np.uint8)[:] = data
    f = CountingFile(str(tmp_path / "raw"))
    f.write(buf)
    f.close()
    assert f.straight == nbytes // DIRECT_ALIGN * DIRECT_ALIGN  # no copy but the tail
    assert (tmp_path / "raw").read_bytes() == data.tobytes()


def test_tensor_bytes_are_the_row_major_values_of_every_kind_of_tensor():
    """Contiguous host tensors of numpy's dtypes take a path of their own: the same bytes
    as the general one, an element's bits in row-major order."""
    from dckpt.segments import tensor_bytes

    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 4, generator=g)
    z = torch.randn(8, dtype=torch.complex64, generator=g)
    for t in [base, base.t(), base[::2], base[0, 0], torch.zeros(0, 3), base.bfloat16(),
              base.to(torch.float8_e4m3fn), (base > 0), base.to(torch.int16), z, z.conj(),
              base._neg_view(), base.clone().requires_grad_(), torch.zeros(5, dtype=torch.uint16)]:
        want = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        got = tensor_bytes(t)
        assert got.nbytes == want.numel() and bytes(got) == want.numpy().tobytes(), t


# -- writes through reused windows (SaveConfig.write_window_bytes) ---------------------------

@pytest.fixture
def windows_here(monkeypatch):
    """Windows taken whatever this machine's huge pages: the same code runs where they are."""
    from dckpt import writer
    from dckpt.direct import WINDOWS

    monkeypatch.setattr(writer, "tensors_on_huge_pages", lambda: False)
    monkeypatch.setattr(writer, "pages_cap_requests", lambda path: True)
    monkeypatch.setattr(WINDOWS, "lies_well", lambda nbytes: True)
    return WINDOWS


class Spy:
    """Counts the windows taken and given back, and the DirectFiles opened with one."""

    def __init__(self, monkeypatch, windows):
        self.taken = self.given = 0
        take, give = windows.take, windows.give

        def counted_take(nbytes):
            self.taken += 1
            return take(nbytes)

        def counted_give(window):
            self.given += 1
            give(window)

        monkeypatch.setattr(windows, "take", counted_take)
        monkeypatch.setattr(windows, "give", counted_give)


@pytest.mark.parametrize("seed", range(3))
def test_a_windowed_file_lands_pieces_of_any_size_and_alignment_and_copies_every_byte(
        tmp_path, seed):
    rng = random.Random(seed)
    big = _aligned_buffer(9 << 20, seed)
    expected = bytearray()

    class Counting(CountingFile):
        def __init__(self, path: str) -> None:
            DirectFile.__init__(self, path, window_bytes=1 << 20)  # flushed many times
            self.copied = self.straight = 0

    f = Counting(str(tmp_path / "seg"))
    for _ in range(12):
        start = rng.choice([0, DIRECT_ALIGN, rng.randrange(0, 1 << 20)])
        piece = big[start: start + rng.choice([0, 1, 4095, DIRECT_ALIGN, rng.randrange(1, 5 << 20)])]
        assert f.write(piece) == len(piece)
        expected += piece
    assert f.tell() == len(expected)
    f.close()
    assert (tmp_path / "seg").read_bytes() == bytes(expected)
    assert f.straight == 0 and f.copied >= len(expected)  # nothing from the caller's memory


def test_windows_are_made_once_and_reused_from_file_to_file(tmp_path, monkeypatch):
    from dckpt.direct import Windows

    windows = Windows()
    monkeypatch.setattr("dckpt.direct.WINDOWS", windows)
    seen = set()
    for i in range(4):
        with Store(str(tmp_path)).open_write(f"s{i}", direct=True, window_bytes=1 << 20) as f:
            seen.add(address(memoryview(f._bounce)))
            f.write(b"z" * (3 << 20))
        assert (tmp_path / f"s{i}").read_bytes() == b"z" * (3 << 20)
    assert windows.made == 1 and len(seen) == 1


def test_a_failed_write_gives_its_window_back(tmp_path, monkeypatch):
    from dckpt.direct import Windows

    windows = Windows()
    monkeypatch.setattr("dckpt.direct.WINDOWS", windows)

    def full(self, mv):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DirectFile, "_write_all", full)
    with pytest.raises(OSError):
        with Store(str(tmp_path)).open_write("seg", direct=True, window_bytes=1 << 20) as f:
            f.write(b"q" * (2 << 20))  # the first window's flush fails
    assert not (tmp_path / "seg").exists()
    assert windows.take(1 << 20) is f._bounce and windows.made == 1  # back, and reused


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sync_saves_write_through_windows_and_async_saves_from_their_staging(
        tmp_path, monkeypatch, windows_here, mode):
    spy = Spy(monkeypatch, windows_here)
    state = _state(5)
    url = str(tmp_path / "repo")
    if mode == "sync":
        info = dckpt.save(state, url, step=1, config=SaveConfig(block_size_bytes=1 << 20))
    else:
        saver = dckpt.AsyncSaver()
        info = saver.async_save(state, url, step=1,
                                config=SaveConfig(block_size_bytes=1 << 20)).wait(60)
        saver.close()
    segments = [p for p in (tmp_path / "repo" / "data").rglob("*.seg")]
    if mode == "sync":
        assert spy.taken == spy.given == len(segments) > 0
        # packed: no zeros placed before large items, the files hold the bytes alone
        assert sum(p.stat().st_size for p in segments) == info.bytes_written
    else:
        assert spy.taken == 0
    out = {"w": torch.zeros(700_001), "b": torch.zeros(3), "h": torch.zeros(300, 1025).half(),
           "n": 0}
    dckpt.load(out, url)
    assert all(torch.equal(out[k], state[k]) for k in ("w", "b", "h")) and out["n"] == 7


def test_a_differential_save_through_windows_references_the_blocks_it_skips(
        tmp_path, windows_here):
    url = str(tmp_path / "repo")
    config = SaveConfig(block_size_bytes=256 << 10)
    state = {"a": torch.randn(3 << 20)[7:], "b": torch.arange(5_000_001, dtype=torch.int64),
             "c": torch.randn(100, 1000).to(torch.bfloat16)}  # unaligned, odd sizes
    first = dckpt.save(state, url, step=1, config=config)
    before = {k: v.clone() for k, v in state.items()}
    state["a"][: 1 << 18] += 1  # a few blocks change
    second = dckpt.save(state, url, step=2, config=config)
    assert second.bytes_written < first.bytes_written / 4
    for step, expect in ((1, before), (2, state)):
        out = {k: torch.zeros_like(v) for k, v in expect.items()}
        dckpt.load(out, url, step=step)
        assert all(torch.equal(out[k], expect[k]) for k in out)
    assert dckpt.verify(url, step=1).ok and dckpt.verify(url, step=2).ok


def test_windows_are_left_out_where_tensors_lie_on_huge_pages_or_windows_would_not(
        tmp_path, monkeypatch):
    from dckpt import direct, writer
    from dckpt.writer import Writer

    w = Writer(str(tmp_path), step=1)
    monkeypatch.setattr(writer, "tensors_on_huge_pages", lambda: False)
    monkeypatch.setattr(direct.WINDOWS, "lies_well", lambda nbytes: True)
    asked = []
    monkeypatch.setattr(writer, "pages_cap_requests", lambda path: asked.append(path) or True)
    assert w.window_bytes(True) == 16 << 20
    assert asked == [str(tmp_path)]  # the disk under the repository
    monkeypatch.setattr(writer, "pages_cap_requests", lambda path: False)
    assert w.window_bytes(True) == 0  # a disk that takes scattered pages as well
    monkeypatch.setattr(writer, "pages_cap_requests", lambda path: True)
    assert w.window_bytes(False) == 0  # buffered writes copy anyway
    w.from_staging = True
    assert w.window_bytes(True) == 0
    w.from_staging = False
    assert Writer(str(tmp_path), step=1,
                  config=SaveConfig(write_window_bytes=0)).window_bytes(True) == 0
    monkeypatch.setattr(direct.WINDOWS, "lies_well", lambda nbytes: False)
    assert w.window_bytes(True) == 0
    monkeypatch.setattr(direct.WINDOWS, "lies_well", lambda nbytes: True)
    monkeypatch.setattr(writer, "tensors_on_huge_pages", lambda: True)
    assert w.window_bytes(True) == 0


def test_torchs_huge_page_allocations_are_recognised(monkeypatch):
    from dckpt.direct import tensors_on_huge_pages

    tensors_on_huge_pages.cache_clear()
    try:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
        assert tensors_on_huge_pages()
        tensors_on_huge_pages.cache_clear()
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                always = "[always]" in f.read()
        except OSError:  # a kernel without transparent huge pages
            always = False
        assert tensors_on_huge_pages() == always
    finally:
        tensors_on_huge_pages.cache_clear()


def test_a_window_that_gets_no_huge_pages_is_not_used_and_not_kept(monkeypatch):
    from dckpt import direct

    windows = direct.Windows()
    monkeypatch.setattr(direct, "huge_page_share", lambda window: 0.0)
    assert not windows.lies_well(1 << 20) and not windows.lies_well(1 << 20)
    assert windows.made == 1 and not windows._idle  # asked once; the window unmapped
    monkeypatch.setattr(direct, "huge_page_share", lambda window: 1.0)
    assert windows.lies_well(2 << 20) and windows.made == 2
    assert len(windows.take(2 << 20)) == 2 << 20 and windows.made == 2  # the one asked


def test_huge_page_share_is_of_the_windows_own_mapping_merged_with_its_neighbours_or_not():
    """Mappings of the same kind side by side are one mapping to the kernel: the share, not
    the bytes, tells (the bytes were 24 MiB of an 8 MiB window once)."""
    from dckpt.direct import huge_page_share

    privates = [mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                for _ in range(3)]
    shared = mmap.mmap(-1, 8 << 20)  # shmem: never on transparent huge pages here
    for m in privates:
        m.madvise(mmap.MADV_HUGEPAGE)
        np.frombuffer(m, dtype=np.uint8).fill(1)
    np.frombuffer(shared, dtype=np.uint8).fill(1)
    assert all(0.0 <= huge_page_share(m) <= 1.0 for m in privates)
    assert huge_page_share(shared) == 0.0


# -- which disks take scattered pages slowly (dckpt.direct.pages_cap_requests) --------------

def _link(path, target) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


def _virtio_disk(sys_root, features: str, *, partition: bool = False,
                 max_segment_size: int = 4294967295) -> str:
    """A fake sysfs: a virtio disk ``vda`` (and ``vda1``) with these feature bits; returns
    the block folder the file system's device number leads to."""
    virtio = sys_root / "devices" / "pci0000:00" / "0000:00:02.0" / "virtio1"
    disk = virtio / "block" / "vda"
    (disk / "queue").mkdir(parents=True)
    (disk / "vda1").mkdir()
    (disk / "queue" / "max_segment_size").write_text(f"{max_segment_size}\n")
    (disk / "queue" / "max_segments").write_text("254\n")
    (virtio / "features").write_text(features + "\n")
    (sys_root / "bus" / "virtio").mkdir(parents=True)
    _link(str(virtio / "subsystem"), str(sys_root / "bus" / "virtio"))
    return str(disk / "vda1") if partition else str(disk)


def _features(*bits: int) -> str:
    return "".join("1" if i in bits else "0" for i in range(64))


def _device_of(sys_root, path, folder: str) -> None:
    st_dev = os.stat(path).st_dev
    _link(str(sys_root / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}"), folder)


@pytest.mark.parametrize("partition", [False, True])
def test_a_virtio_disk_without_indirect_descriptors_takes_scattered_pages_slowly(
        tmp_path, partition):
    from dckpt.direct import pages_cap_requests

    sys_root, repo = tmp_path / "sys", tmp_path / "repo"
    repo.mkdir()
    _device_of(sys_root, repo, _virtio_disk(sys_root, _features(1, 9, 29, 32),
                                            partition=partition))
    assert pages_cap_requests(str(repo), str(sys_root), mounts=[])
    # a repository not made yet is asked of the folder above it
    assert pages_cap_requests(str(repo / "not" / "yet"), str(sys_root), mounts=[])


def test_indirect_descriptors_nvme_short_segments_or_an_unknown_disk_take_no_windows(tmp_path):
    from dckpt.direct import pages_cap_requests

    repo = tmp_path / "repo"
    repo.mkdir()
    indirect = tmp_path / "indirect"  # the ring takes a request's pages as one list
    _device_of(indirect, repo, _virtio_disk(indirect, _features(9, 28, 29, 32)))
    assert not pages_cap_requests(str(repo), str(indirect), mounts=[])
    short = tmp_path / "short"  # a huge page makes as many segments as single pages
    _device_of(short, repo, _virtio_disk(short, _features(9, 29), max_segment_size=4096))
    assert not pages_cap_requests(str(repo), str(short), mounts=[])
    nvme = tmp_path / "nvme"
    disk = nvme / "devices" / "pci0000:00" / "0000:00:04.0" / "nvme" / "nvme0" / "nvme0n1"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue" / "max_segment_size").write_text("4294967295\n")
    _link(str(disk.parent.parent / "subsystem"), str(nvme / "class" / "nvme"))
    _device_of(nvme, repo, str(disk))
    assert not pages_cap_requests(str(repo), str(nvme), mounts=[])
    empty = tmp_path / "empty"  # no sysfs entry, a mount that names no /dev node
    empty.mkdir()
    assert not pages_cap_requests(str(repo), str(empty), mounts=[f"tmpfs {repo} tmpfs rw 0 0"])
    weird = tmp_path / "weird"  # short or odd feature bits: unknown, so no
    _device_of(weird, repo, _virtio_disk(weird, "0101"))
    assert not pages_cap_requests(str(repo), str(weird), mounts=[])
    garbled = tmp_path / "garbled"  # bytes that are no text: unknown too, not an error
    _device_of(garbled, repo, _virtio_disk(garbled, ""))
    (garbled / "devices" / "pci0000:00" / "0000:00:02.0" / "virtio1" / "features"
     ).write_bytes(b"\xff\xfe" * 40)
    assert not pages_cap_requests(str(repo), str(garbled), mounts=[])


def test_a_disk_found_by_its_mount_source_or_under_a_device_mapper(tmp_path):
    """btrfs reports a device number of its own; LVM puts dm-0 over the disk."""
    from dckpt.direct import pages_cap_requests

    repo = tmp_path / "repo"
    repo.mkdir()
    by_source = tmp_path / "by_source"
    disk = _virtio_disk(by_source, _features(29, 32))
    _link(str(by_source / "class" / "block" / "vdz"), disk)
    assert not pages_cap_requests(str(repo), str(by_source), mounts=[])
    mounts = ["/dev/root / ext4 rw 0 0", f"/dev/vdz {tmp_path} btrfs rw 0 0"]
    assert pages_cap_requests(str(repo), str(by_source), mounts=mounts)

    mapped = tmp_path / "mapped"
    vda = _virtio_disk(mapped, _features(29, 32))
    dm = mapped / "devices" / "virtual" / "block" / "dm-0"
    (dm / "queue").mkdir(parents=True)
    (dm / "queue" / "max_segment_size").write_text("4294967295\n")
    _link(str(dm / "slaves" / "vda"), vda)
    _device_of(mapped, repo, str(dm))
    assert pages_cap_requests(str(repo), str(mapped), mounts=[])
    (dm / "slaves" / "nvme0n1").mkdir()  # one disk under it that does not: no
    assert not pages_cap_requests(str(repo), str(mapped), mounts=[])


def test_this_machines_answer_agrees_with_its_sysfs(tmp_path):
    """The real /sys: whatever the disk under the tests, the answer follows its virtio
    features, and a tmpfs or unknown path says no."""
    from dckpt.direct import pages_cap_requests

    st_dev = os.stat(tmp_path).st_dev
    folder = os.path.realpath(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    expected = False
    up = folder
    for _ in range(8):
        up = os.path.dirname(up)
        if os.path.basename(os.path.realpath(os.path.join(up, "subsystem"))) == "virtio":
            with open(os.path.join(up, "features")) as f:
                expected = f.read()[28] == "0"
            break
    if os.path.isdir(os.path.join(folder, "slaves")) and os.listdir(
            os.path.join(folder, "slaves")):
        pytest.skip("a device-mapper disk here: the fake sysfs tests cover it")
    assert pages_cap_requests(str(tmp_path)) == expected
    assert pages_cap_requests(str(tmp_path / "a" / "b")) == expected
    assert pages_cap_requests("/proc") is False

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

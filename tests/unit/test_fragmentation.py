"""Differential saves of a sparsely updated tensor scatter its blocks over the segments of
many saves, and a restore then reads it in many short pieces. ``min_read_run_bytes`` writes
such a tensor whole again: these tests count the reads the policy sees, check that it
rewrites exactly when the runs get short, that a rewritten table keeps being saved
differentially afterwards, and that the values stay bit-exact."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt.manifest import BlockRef
from dckpt.segments import read_runs, too_fragmented
from dckpt.storage import Store

KiB = 1024


def ref(obj: str, offset: int, n: int = 10) -> BlockRef:
    return BlockRef(obj, offset, n, n, f"{obj}{offset}")


def test_reads_of_block_lists_in_storage_order():
    contiguous = [ref("a", 0), ref("a", 10), ref("a", 20)]
    assert read_runs(contiguous) == 1 and read_runs([]) == 0
    assert read_runs([None, None]) == 1  # an item's new blocks are written in one run
    # one change in the middle of a contiguous base: the base in two reads, the new block
    assert read_runs([ref("a", 0), None, ref("a", 20)]) == 3
    # blocks from two segments, each object's read in storage order: b's two are adjacent
    assert read_runs([ref("a", 0), ref("b", 0), None, ref("a", 20), ref("b", 10)]) == 4
    # out of order in the item but adjacent on disk: one read; a block used twice: one
    assert read_runs([ref("a", 10), ref("a", 0)]) == 1 and read_runs([ref("a", 0)] * 3) == 1
    assert read_runs([ref("a", 0), ref("a", 30)]) == 2  # a gap: two reads


def test_too_fragmented_compares_the_mean_run_with_the_bound():
    assert not too_fragmented([ref("a", 0), ref("a", 10)], 20, 1 << 30)  # one run: never
    assert too_fragmented([ref("a", 0), ref("a", 20)], 20, 11)  # 2 runs of 10 bytes
    assert not too_fragmented([ref("a", 0), ref("a", 20)], 20, 10)


def sparse_saves(url: str, saves: int, config: dckpt.SaveConfig) -> list[dckpt.CheckpointInfo]:
    """A table of 4 MiB; each save changes 8 rows far apart, in other places each save
    (measured without a bound, a restore's reads after 1-10 saves: 9, 11, 14, 16, 18, 21,
    23, 24, 25, 27)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(8192, 128, generator=g)  # 512-byte rows
    infos = [dckpt.save({"t": table}, url, step=0, config=config)]
    for step in range(1, saves + 1):
        for k in range(8):
            table[(step * 977 + k * 1031) % 8192] += 1.0
        infos.append(dckpt.save({"t": table}, url, step=step, config=config))
    out = {"t": torch.zeros_like(table)}
    dckpt.load(out, url)
    assert torch.equal(out["t"], table)
    return infos


def fractions(infos: list[dckpt.CheckpointInfo]) -> list[float]:
    return [i.bytes_written / i.bytes_logical for i in infos]


def test_a_sparse_tensor_is_rewritten_whole_when_its_runs_get_short(tmp_path):
    config = dckpt.SaveConfig(block_size_bytes=32 * KiB, min_read_run_bytes=256 * KiB)
    written = fractions(sparse_saves(str(tmp_path / "bounded"), 8, config))
    assert written[0] == pytest.approx(1.0, abs=0.01) and written[1] < 0.1
    rewrites = [k for k, w in enumerate(written) if k and w > 0.9]
    assert rewrites, written  # the bound was passed in 8 saves ...
    assert all(w < 0.1 for k, w in enumerate(written) if k and k not in rewrites)
    assert rewrites[0] >= 3  # ... and not before a few saves had scattered the blocks
    never = sparse_saves(str(tmp_path / "never"), 8,
                         dckpt.SaveConfig(block_size_bytes=32 * KiB, min_read_run_bytes=None))
    assert all(w < 0.1 for w in fractions(never)[1:])


def test_a_rewritten_table_keeps_its_small_blocks_and_saves_differentially_next(tmp_path):
    # the default block sizes: the table starts in 256 KiB blocks, moves to 32 KiB ones
    # once its saves show sparse changes, and a rewrite for fragmentation must not send it
    # back to 256 KiB (which would write it whole once more, and then again on the way back)
    config = dckpt.SaveConfig(min_read_run_bytes=256 * KiB)
    infos = sparse_saves(str(tmp_path), 10, config)
    written = fractions(infos)
    rewrites = [k for k, w in enumerate(written) if k > 2 and w > 0.9]
    assert rewrites, written
    for k in rewrites:
        assert k + 1 > 10 or written[k + 1] < 0.1, written


def newest_runs(url: str) -> int:
    from dckpt.repository import read_manifest

    m = read_manifest(Store(url), None)
    return read_runs(list(m.items["t"].chunks[0].data.blocks))


def test_the_newest_checkpoint_reads_in_fewer_runs_with_the_bound(tmp_path):
    bounded, never = str(tmp_path / "bounded"), str(tmp_path / "never")
    sparse_saves(bounded, 8, dckpt.SaveConfig(block_size_bytes=32 * KiB,
                                              min_read_run_bytes=256 * KiB))
    sparse_saves(never, 8, dckpt.SaveConfig(block_size_bytes=32 * KiB, min_read_run_bytes=None))
    # without the bound every save adds reads (the changed blocks of 8 saves, 9 segments);
    # with it the table's reads stay at most 4 MiB / 256 KiB
    assert newest_runs(never) > 4096 // 256 + 4
    assert newest_runs(bounded) <= 4096 // 256


@pytest.mark.parametrize("bad", [0, -1, 0.5, 1.5, "4", float("nan"), True])
def test_a_bound_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(dckpt.ArgumentError):
        dckpt.SaveConfig(min_read_run_bytes=bad)

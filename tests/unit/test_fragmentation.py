"""Differential saves of a sparsely updated tensor scatter its blocks over the segments of
many saves, and a restore then reads it in many short pieces. ``max_fragmentation`` writes
such a tensor whole again: these tests measure the fragmentation the policy sees, check
that it rewrites exactly when the bound is passed, and that the values stay bit-exact."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt.manifest import BlockRef
from dckpt.segments import fragmentation, read_runs
from dckpt.storage import Store


def ref(obj: str, offset: int, n: int = 10) -> BlockRef:
    return BlockRef(obj, offset, n, n, f"{obj}{offset}")


def test_runs_and_fragmentation_of_block_lists():
    contiguous = [ref("a", 0), ref("a", 10), ref("a", 20)]
    assert read_runs(contiguous) == 1 and fragmentation(contiguous) == 1.0
    assert read_runs([None, None]) == 1 and fragmentation([]) == 1.0
    # one change in the middle of a contiguous base: three runs, the least there can be
    once = [ref("a", 0), None, ref("a", 20)]
    assert read_runs(once) == 3 and fragmentation(once) == 1.0
    # the base itself in pieces from two segments: twice the runs of a contiguous one
    twice = [ref("a", 0), ref("b", 0), None, ref("a", 20), ref("b", 10)]
    assert read_runs(twice) == 5 and fragmentation(twice) == pytest.approx(5 / 3)
    # a gap in one object is a new run too
    assert read_runs([ref("a", 0), ref("a", 30)]) == 2


def sparse_saves(url: str, saves: int, config: dckpt.SaveConfig) -> list[dckpt.CheckpointInfo]:
    """A table of 4 MiB in 32 KiB blocks; each save changes one row in a different block."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(8192, 128, generator=g)  # 512-byte rows
    infos = [dckpt.save({"t": table}, url, step=0, config=config)]
    for step in range(1, saves + 1):
        for k in range(8):  # 8 rows far apart: 8 changed blocks, in other places each save
            table[(step * 977 + k * 1031) % 8192] += 1.0
        infos.append(dckpt.save({"t": table}, url, step=step, config=config))
    out = {"t": torch.zeros_like(table)}
    dckpt.load(out, url)
    assert torch.equal(out["t"], table)
    return infos


def test_a_sparse_tensor_is_rewritten_whole_when_its_blocks_scatter(tmp_path):
    config = dckpt.SaveConfig(block_size_bytes=32 * 1024, max_fragmentation=3.0)
    infos = sparse_saves(str(tmp_path / "bounded"), 8, config)
    written = [i.bytes_written / i.bytes_logical for i in infos]
    assert written[0] == pytest.approx(1.0, abs=0.01) and written[1] < 0.1
    rewrites = [k for k, w in enumerate(written) if k and w > 0.9]
    assert rewrites, written  # the bound was passed in 8 saves ...
    assert all(w < 0.1 for k, w in enumerate(written) if k and k not in rewrites)
    assert rewrites[0] >= 3  # ... and not before a few saves had scattered the blocks
    never = sparse_saves(str(tmp_path / "never"), 8,
                         dckpt.SaveConfig(block_size_bytes=32 * 1024, max_fragmentation=None))
    assert all(i.bytes_written / i.bytes_logical < 0.1 for i in never[1:])


def newest_runs(url: str) -> int:
    from dckpt.repository import read_manifest

    m = read_manifest(Store(url), None)
    return read_runs(list(m.items["t"].chunks[0].data.blocks))


def test_the_newest_checkpoint_reads_in_fewer_runs_with_the_bound(tmp_path):
    bounded, never = str(tmp_path / "bounded"), str(tmp_path / "never")
    sparse_saves(bounded, 8, dckpt.SaveConfig(block_size_bytes=32 * 1024, max_fragmentation=3.0))
    sparse_saves(never, 8, dckpt.SaveConfig(block_size_bytes=32 * 1024, max_fragmentation=None))
    # without the bound every save adds runs (the changed blocks of 8 saves, 9 segments);
    # with it the rewrite made the table one run again
    assert newest_runs(never) > 40
    assert newest_runs(bounded) * 4 < newest_runs(never)


@pytest.mark.parametrize("bad", [0, 0.5, -1, "4", float("nan")])
def test_a_bound_below_one_is_refused(bad):
    with pytest.raises(dckpt.ArgumentError):
        dckpt.SaveConfig(max_fragmentation=bad)

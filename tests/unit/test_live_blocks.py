"""gc's count of live blocks (dckpt.live_blocks) against the plain one it replaced: the
bytes of each object's distinct live blocks, whatever the order and sharing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt import live_blocks
from dckpt.block_table import BlockTable
from dckpt.decoder import reference_rows, references
from dckpt.live_blocks import LiveBlocks


def _plain(checkpoints: list[list[tuple[str, int, int]]]) -> dict[str, int]:
    """The count gc made before, a Python set per object."""
    seen: dict[str, set[int]] = {}
    out: dict[str, int] = {}
    for refs in checkpoints:
        for segment, offset, length in refs:
            if offset not in seen.setdefault(segment, set()):
                seen[segment].add(offset)
                out[segment] = out.get(segment, 0) + length
    return out


# a block is its object and offset: one length per (object, offset), as objects are written
_block = st.tuples(st.sampled_from(["data/a/r0.seg", "data/a/r1.seg", "data/b/r0.seg"]),
                   st.integers(0, 40))


def _length(segment: str, offset: int) -> int:
    return (hash((segment, offset)) % 5000) + 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_block, max_size=30), max_size=8), st.booleans())
def test_distinct_bytes_per_object_equal_the_plain_count(checkpoints, big_offsets):
    scale = 1 << 58 if big_offsets else 4096  # past 64 bits with the object number: lexsort
    refs = [[(s, o * scale, _length(s, o)) for s, o in ckpt] for ckpt in checkpoints]
    live = LiveBlocks()
    for ckpt in refs:
        live.add(ckpt)
    assert live.bytes_per_object() == _plain(refs)
    assert len(live) == len({(s, o) for ckpt in refs for s, o, _ in ckpt})


def test_both_sorts_order_by_object_then_offset():
    ids = np.array([2, 0, 1, 0, 2], dtype=np.uint32)
    packed = np.array([5, 9, 0, 3, 1], dtype=np.uint64)
    wide = packed << np.uint64(61)  # 3 bits of object number beside it: no room
    for offset in (packed, wide):
        order = live_blocks._order(ids, offset)
        got = list(zip(ids[order].tolist(), offset[order].tolist()))
        assert got == sorted(zip(ids.tolist(), offset.tolist()))


def test_a_block_table_counts_as_its_references(tmp_path):
    """A real differential checkpoint's table, in place, and as tuples: the same count."""
    url = str(tmp_path / "r")
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(4096, generator=g) for i in range(6)}
    cfg = dckpt.SaveConfig(block_size_bytes=4096)
    dckpt.save(state, url, step=1, config=cfg)
    state["t2"] += 1
    dckpt.save(state, url, step=2, config=cfg)
    raws = [open(f"{url}/manifests/{s:012d}.json", "rb").read() for s in (1, 2)]
    tables = [reference_rows(raw)[1] for raw in raws]
    assert all(isinstance(t, BlockTable) for t in tables)
    live = LiveBlocks()
    for t in tables:
        live.add(t)
    as_tuples = [references(raw)[1] for raw in raws]
    assert live.bytes_per_object() == _plain(as_tuples)
    assert len(live.bytes_per_object()) == 2  # step 2 wrote one object of its own


def test_gc_of_a_repository_of_shared_blocks_keeps_and_reports_what_is_live(tmp_path):
    """Three differential checkpoints, the middle one deleted: gc keeps every object a live
    one needs and reports the bytes no live one references as waste, as before."""
    url = str(tmp_path / "r")
    cfg = dckpt.SaveConfig(block_size_bytes=4096)
    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(4096, generator=g) for i in range(4)}
    dckpt.save(state, url, step=1, config=cfg)
    dckpt.save(dict(state, t1=state["t1"] + 1), url, step=2, config=cfg)
    state = dict(state, t2=state["t2"] + 1)  # t1 as at step 1
    dckpt.save(state, url, step=3, config=cfg)
    dckpt.delete(url, step=2)
    report = dckpt.gc(url, min_age_s=0, deleted_min_age_s=0)
    assert report.live_checkpoints == (1, 3)
    assert len(report.deleted) == 1  # step 2's object: only the deleted one used its blocks
    assert report.wasted_bytes == 0
    out = {k: torch.empty_like(v) for k, v in state.items()}
    assert dckpt.load(out, url).step == 3
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_an_empty_or_tiny_set(rows):
    live = LiveBlocks()
    live.add([])
    refs = [("data/a/x.seg", i * 10, 10) for i in range(rows)]
    live.add(refs)
    live.add(refs)
    assert live.bytes_per_object() == ({"data/a/x.seg": 10 * rows} if rows else {})
    live.clear()
    assert live.bytes_per_object() == {} and len(live) == 0

"""The format: encode/decode, the golden manifest, names, and the pure planning helpers."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import shutil
import struct

import pytest
import torch
from dckpt_testing import as_rows, reseal
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt import layout
from dckpt.blocks import check, cut, digest
from dckpt.decoder import decode, references, reusing, summary
from dckpt.dtypes import dtype_from_name, dtype_name
from dckpt.errors import DckptError, FormatError, IntegrityError
from dckpt.manifest import (
    BlockRef,
    ChunkEntry,
    Manifest,
    StoredData,
    TensorEntry,
    ValueEntry,
    encode,
    extents,
    seal,
)
from dckpt.read_plan import box_range
from dckpt.reads import blocks_in_range, coalesce

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "repo-v1")
GOLDEN_V2 = os.path.join(os.path.dirname(__file__), "golden", "repo-v2")


def test_golden_repository_keeps_loading(tmp_path):
    repo = shutil.copytree(GOLDEN, tmp_path / "repo")
    m = dckpt.inspect(str(repo))
    assert (m.step, m.world_size, m.metrics, m.block_size_bytes) == (42, 1, {"loss": 0.25}, 4096)
    assert m.bytes_logical == 2652 and m.attempt == "s42-t1795384259711-3599d887"
    assert isinstance(m.items["w"], TensorEntry) and m.items["w"].size == (4, 6)
    assert isinstance(m.items["meta.name"], ValueEntry)
    state = {"w": torch.zeros(4, 6), "b": torch.zeros(3, dtype=torch.int64),
             "h": torch.zeros(5, dtype=torch.bfloat16), "meta": {"epoch": 0, "name": ""}}
    info = dckpt.load(state, str(repo))
    assert info.step == 42
    assert torch.equal(state["w"], torch.arange(24, dtype=torch.float32).reshape(4, 6))
    assert state["b"].tolist() == [1, -2, 3]
    assert torch.equal(state["h"], torch.arange(5, dtype=torch.bfloat16))
    assert state["meta"] == {"epoch": 3, "name": "golden"}
    assert dckpt.verify(str(repo)).ok


def test_golden_second_version_repository_keeps_loading(tmp_path):
    """Written by dckpt before the block table (format version 2): a differential save over
    compressed and raw blocks, an empty tensor, values of both encodings. Both steps load
    bit-equal and verify, their references are their decodes', and a save into the same
    repository (version 3) takes its blocks as a base and loads back."""
    import io

    repo = str(shutil.copytree(GOLDEN_V2, tmp_path / "repo"))
    raw = open(os.path.join(repo, layout.manifest_name(8)), "rb").read()
    assert raw.startswith(b'{"format":"dckpt.manifest","version":2,')
    assert references(raw) == (8, _refs(decode(raw)))
    w = torch.arange(3000, dtype=torch.float32).reshape(30, 100)
    n = torch.randn(2048, generator=torch.Generator().manual_seed(7))
    for step, epoch in ((7, 3), (8, 4)):
        state = {"w": torch.zeros(30, 100), "n": torch.zeros(2048),
                 "b": torch.zeros(3, dtype=torch.int64), "h": torch.zeros(5, dtype=torch.bfloat16),
                 "e": torch.ones(0), "meta": {"epoch": 0, "name": ""}, "buf": io.BytesIO()}
        assert dckpt.load(state, repo, step=step).step == step
        expected_n = n.clone()
        if step == 8:
            expected_n[:10] += 1
        assert torch.equal(state["w"], w) and torch.equal(state["n"], expected_n)
        assert state["b"].tolist() == [1, -2, 3]
        assert torch.equal(state["h"], torch.arange(5, dtype=torch.bfloat16))
        assert state["e"].shape == (0,) and state["meta"] == {"epoch": epoch, "name": "golden"}
        assert state["buf"].getvalue() == b"rng\0state"
    assert dckpt.verify(repo, all_steps=True).ok
    codecs = {b.codec for b in decode(raw).refs()}
    assert codecs == {"raw", "zstd", "zstd-planes-4"}
    state["meta"]["epoch"] = 5
    info = dckpt.save(state, repo, step=9, config=dckpt.SaveConfig(block_size_bytes=4096,
                                                                   compression="on"))
    assert info.bytes_written < info.bytes_logical / 2  # the second version's blocks reused
    new = open(os.path.join(repo, layout.manifest_name(9)), "rb").read()
    assert new.startswith(b'{"format":"dckpt.manifest","version":3,')
    back = {k: (v.clone().zero_() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    back["meta"] = {"epoch": 0, "name": ""}
    back["buf"] = io.BytesIO()
    dckpt.load(back, repo, step=9)
    assert torch.equal(back["n"], state["n"]) and back["meta"]["epoch"] == 5


def _manifest() -> Manifest:
    seg = "data/s1-t0-00000000/r00000-000.seg"
    blocks = (BlockRef(seg, 0, 4096, 4096, "0" * 32), BlockRef(seg, 4096, 4, 4, "f" * 32))
    return Manifest(step=1, attempt="s1-t0-00000000", created_at=12.5, world_size=2,
                    items={"w": TensorEntry("float32", (1025,), True,
                                            (ChunkEntry((0,), (1025,), StoredData(4100, blocks)),)),
                           "v": ValueEntry(StoredData(0, ()))},
                    metrics={"loss": float("nan"), "ok": True}, bytes_logical=4100,
                    bytes_written=4100, phase_s={"plan": 0.5}, block_size_bytes=4096,
                    dcp_version="1.0.0", planner_data={"w": ["w"]})


def test_encode_decode_round_trip():
    m = _manifest()
    back = decode(encode(m))
    assert back.items == m.items
    assert back.metrics == {"loss": "nan", "ok": True}
    assert (back.step, back.world_size, back.phase_s, back.dcp_version) == (1, 2, {"plan": 0.5},
                                                                            "1.0.0")
    assert back.segments() == ["data/s1-t0-00000000/r00000-000.seg"]


def _header(m):
    return (m.step, m.attempt, m.created_at, m.world_size, m.metrics, m.bytes_logical,
            m.bytes_written, m.phase_s)


@pytest.mark.parametrize("metrics", [{}, {"items": 1, "segments": "x", "planner_data": None},
                                     {',"items":{': ',"items":{'}])
def test_a_summary_is_the_decoded_header(tmp_path, metrics):
    """Keys and values that spell the cut (a metric named items, a state key named items or
    segments, whose planner path is a list) are read right or decoded whole."""
    url = str(tmp_path)
    state = {"items": torch.ones(3), "segments": {"items": torch.zeros(2)}, "x": [1, 2]}
    dckpt.save(state, url, step=7, metrics=metrics)
    raw = open(os.path.join(url, layout.manifest_name(7)), "rb").read()
    assert _header(summary(raw)) == _header(decode(raw))
    assert summary(raw).metrics == metrics


def test_a_summary_reads_no_item(monkeypatch):
    raw = encode(_manifest())
    expected = _header(decode(raw))
    monkeypatch.setattr("dckpt.decoder.entry", None)  # an item decoded would raise
    assert _header(summary(raw)) == expected
    with pytest.raises(FormatError, match="NoneType"):
        decode(raw)


def test_a_summary_checks_what_it_reads():
    raw = encode(_manifest())
    with pytest.raises(IntegrityError, match="its checksum says"):
        summary(raw.replace(b'"step":1', b'"step":2'))
    with pytest.raises(FormatError, match="not valid JSON"):  # as decode says it
        summary(raw[:-10])
    seg = b'"segments":["data/s1-t0-00000000/r00000-000.seg"]'
    for old, new, message in [(b'"world_size":2', b'"world_size":0', "world_size"),
                              (b'"created_at":12.5', b'"created_at":-1.0', "1970"),
                              (b'"phase_s":{"plan":0.5}', b'"phase_s":[]', "phase_s"),
                              (seg, b'"segments":["../x"]', "relative")]:
        assert old in raw, old
        doc = raw.replace(old, new)
        with pytest.raises(FormatError, match=message):  # resealed: the checks behind it
            summary(seal(doc[: doc.rindex(b',"checksum"')] + b"}"))
    # another order of the same fields, resealed: decoded whole
    forged = reseal(json.loads(raw))
    assert _header(summary(forged)) == _header(decode(raw))


def test_stored_data_pickles_whole_with_its_block_references():
    """DCP's gather pickles every rank's references: they come back equal, as BlockRefs,
    through the plain-tuple reduction, every field (the codec's default too)."""
    import pickle

    data = StoredData(12, (BlockRef("data/a/r00000-000.seg", 0, 5, 8, "ab" * 16),
                           BlockRef("data/a/r00000-000.seg", 5, 3, 4, "cd" * 16, "zstd-planes")))
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(data, protocol=protocol))
        assert back == data and all(type(b) is BlockRef for b in back.blocks)
        assert back.blocks[1].codec == "zstd-planes" and back.blocks[0].codec == "raw"
    assert pickle.loads(pickle.dumps(StoredData(0, ()))) == StoredData(0, ())


_SEGS = [f"data/s{i}-t0-00000000/r0000{i % 2}-00{i % 3}.seg" for i in range(5)]
_a_ref = st.builds(BlockRef, st.sampled_from(_SEGS), st.integers(0, 2**50 - 2**30),
                   st.integers(0, 2**20), st.integers(2**20, 2**30),
                   st.binary(min_size=16, max_size=16).map(bytes.hex),
                   st.sampled_from(["zstd", "zstd-planes-4"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_a_ref, max_size=150), min_size=1, max_size=5), st.data())
def test_items_gathered_as_tables_encode_as_their_references(datas, data):
    """A stored item of 64 blocks or more pickles (DCP's gather) as a block table, a
    decoded manifest's item as its table's rows; the coordinator encodes those rows as they
    are. The bytes are what the references themselves encode to, whole or for some items
    of a decoded manifest, and the items unpickle equal."""
    import pickle

    def manifest(ds: dict[str, StoredData]) -> Manifest:
        items = {k: TensorEntry("int8", (d.nbytes,), False, (ChunkEntry((0,), (d.nbytes,), d),))
                 for k, d in ds.items()}
        return dataclasses.replace(_manifest(), items=items, planner_data=None,
                                   bytes_logical=sum(d.nbytes for d in ds.values()))

    original = {f"t{i}": StoredData(sum(b.raw_length for b in blocks), tuple(blocks))
                for i, blocks in enumerate(datas)}
    m = manifest(original)
    gathered = {k: pickle.loads(pickle.dumps(d)) for k, d in original.items()}
    assert gathered == original
    assert [d._table is not None for d in gathered.values()] == [len(b) >= 64 for b in datas]
    assert encode(manifest(gathered)) == encode(m) == _reference_encode(m)
    decoded = decode(encode(m))
    keep = data.draw(st.lists(st.sampled_from(sorted(decoded.items)), unique=True))
    part = manifest({k: decoded.items[k].chunks[0].data for k in keep})
    again = {k: pickle.loads(pickle.dumps(decoded.items[k].chunks[0].data)) for k in keep}
    plain = manifest({k: StoredData(d.nbytes, tuple(d.blocks)) for k, d in again.items()})
    assert encode(part) == encode(plain) == _reference_encode(plain)
    assert encode(manifest(again)) == encode(plain)


def test_compressed_blocks_decode_column_wise_as_block_wise():
    from dckpt.decode_items import _blocks_checked, _blocks_fast

    segs = ["data/a/r0.seg", "data/b/r1.seg"]
    rows = [[i % 2, i * 100, 100 - i % 3, 100, f"{i:032x}", ("raw", "zstd")[i % 3 > 0]]
            for i in range(300)]
    for r in rows:
        if r[5] == "raw":
            r[2] = 100
    fast = _blocks_fast(rows, segs)
    assert fast is not None and fast == _blocks_checked(rows, "x", segs)
    assert fast[1] == BlockRef("data/b/r1.seg", 100, 99, 100, f"{1:032x}", "zstd")


def _block(doc: dict, i: int) -> list:
    return doc["items"]["w"]["chunks"][0]["blocks"][i]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=0), "version 0 is not supported"),
    (lambda d: d.pop("items"), "missing fields \\['items'\\]"),
    (lambda d: d["items"]["w"]["chunks"][0].update(nbytes=4), "blocks hold 4100 bytes"),
    (lambda d: d["items"]["w"].update(dtype="float128"), "unknown dtype 'float128'"),
    (lambda d: d["items"]["w"]["chunks"][0]["blocks"][0].__setitem__(0, 7), "out of range"),
    (lambda d: d["items"]["w"]["chunks"][0]["blocks"][0].__setitem__(5, "lz4"), "unknown codec"),
    (lambda d: d["items"]["w"]["chunks"][0].update(sizes=[2000]), "does not fit"),
    # each block field: the column-wise check refuses it, the block-wise one names it
    (lambda d: _block(d, 1).__setitem__(0, -1), "blocks\\[1\\]: expected an integer in \\[0, "),
    (lambda d: _block(d, 1).__setitem__(1, True), "blocks\\[1\\]: expected an integer"),
    (lambda d: _block(d, 1).__setitem__(2, 4.0), "blocks\\[1\\]: expected an integer"),
    (lambda d: _block(d, 1).__setitem__(3, "4"), "blocks\\[1\\]: expected an integer"),
    (lambda d: _block(d, 1).__setitem__(4, "F" * 32), "blocks\\[1\\]: digest 'FFFF"),
    (lambda d: _block(d, 1).__setitem__(4, "f" * 31), "blocks\\[1\\]: digest"),
    (lambda d: _block(d, 1).__setitem__(4, 7), "blocks\\[1\\]: expected a string"),
    (lambda d: _block(d, 1).__setitem__(5, ["raw"]), "blocks\\[1\\]: expected a string"),
    (lambda d: _block(d, 1).__setitem__(2, 3), "blocks\\[1\\]: 3 stored bytes for 4 raw"),
    (lambda d: _block(d, 1).pop(), "blocks\\[1\\]: expected \\[segment"),
    (lambda d: _block(d, 1).__setitem__(5, "zstd") or _block(d, 1).__setitem__(2, 5),
     "blocks\\[1\\]: 5 stored bytes for 4 raw bytes is impossible for codec 'zstd'"),
    (lambda d: d.update(format="other"), "not a dckpt manifest"),
])
def test_decode_refuses_what_the_spec_does_not_allow(edit, message):
    """A second version's manifest (block rows in JSON) edited and resealed."""
    doc = _v2_doc()
    edit(doc)
    with pytest.raises(FormatError, match=message):
        decode(reseal(doc))


def _table_edit(column: str, row: int, value: int):
    """An edit of one field of the block table's row, in place in its bytes."""
    n = 2  # _manifest's rows: w's two blocks
    at, fmt = {"offset": (0, "<Q"), "segment": (8 * n, "<I"), "length": (12 * n, "<I"),
               "raw_length": (16 * n, "<I"), "codec": (20 * n, "<B")}[column]

    def edit(doc: dict) -> None:
        table = bytearray(base64.b64decode(doc["block_table"]))
        struct.pack_into(fmt, table, at + struct.calcsize(fmt) * row, value)
        doc["block_table"] = base64.b64encode(bytes(table)).decode()
    return edit


def _w_rows(value) -> object:
    return lambda d: d["items"]["w"]["chunks"][0].update(blocks=value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("block_table"), "missing fields \\['block_table'\\]"),
    (lambda d: d.update(block_table=[1]), "block_table must be a string"),
    (lambda d: d.update(block_table="!" + d["block_table"][1:]), "block_table is not base64"),
    (lambda d: d.update(block_table=d["block_table"][:-4]), "whole number of 37-byte rows"),
    (lambda d: d.update(block_table=base64.b64encode(_reference_table(
        [*_manifest().refs(), BlockRef(d["segments"][0], 0, 0, 0, "0" * 32)],
        {d["segments"][0]: 0})).decode()), "holds 3 rows, the items use 2"),
    (_table_edit("segment", 1, 1), "block_table row 1: segment 1 of 1"),
    (_table_edit("codec", 0, 5), "block_table row 0: .* codec 5"),
    (_table_edit("length", 1, 3), "block_table row 1: .* length 3, raw length 4, codec 0"),
    (_table_edit("length", 0, 4097), "block_table row 0: .* length 4097, raw length 4096"),
    (_table_edit("raw_length", 0, 2 ** 30 + 1), "block_table row 0"),
    (_table_edit("offset", 1, 2 ** 50 - 2), "block_table row 1: .* offset 1125899906842622"),
    (_table_edit("offset", 0, 2 ** 64 - 1), "block_table row 0"),
    (lambda d: _table_edit("raw_length", 1, 5)(d) or _table_edit("length", 1, 5)(d),
     "blocks hold 4101 bytes, nbytes says 4100"),
    (_w_rows([1, 1]), "rows from 1, where the item before ends at row 0"),
    (_w_rows([0, 3]), "rows 0..2 of a table of 2"),
    (_w_rows([0, 1]), "blocks hold 4096 bytes"),
    (_w_rows([0, -2]), "expected \\[first row, row count\\]"),
    (_w_rows([0, 2.0]), "expected \\[first row, row count\\]"),
    (_w_rows([[0, 0, 4096, 4096, "0" * 32, "raw"]]), "expected \\[first row, row count\\]"),
    (_w_rows([0, True]), "expected \\[first row, row count\\]"),
    (lambda d: d["items"]["v"].update(blocks=[2, 0]) or d["items"].update(
        v=d["items"].pop("v"), w=d["items"].pop("w")), "rows from 2, where"),
])
def test_decode_refuses_a_block_table_the_spec_does_not_allow(edit, message):
    """A third version's manifest, edited and resealed: the table's bytes, its rows'
    bounds, and the items' ranges of rows (in order, each row once, every row used)."""
    doc = json.loads(encode(_manifest()))
    assert doc["version"] == 3 and doc["items"]["w"]["chunks"][0]["blocks"] == [0, 2]
    edit(doc)
    with pytest.raises(FormatError, match=message):
        decode(reseal(doc))


_a_row = st.tuples(st.integers(0, 2), st.one_of(st.integers(0, 2 ** 64 - 1),
                                                st.sampled_from([0, 2 ** 50 - 8, 2 ** 50])),
                   st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 4, 8])),
                   st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([4, 8, 2 ** 30])),
                   st.binary(min_size=16, max_size=16), st.integers(0, 6))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_a_row, max_size=6), min_size=1, max_size=3), st.data())
def test_a_block_table_decodes_as_the_same_rows_in_json(items, data):
    """Rows of any values, split over value items, as a third version's table and as a
    second version's JSON rows: both decode to the same manifest, or both are refused."""
    codes = ["raw", "zstd", "zstd-planes-2", "zstd-planes-4", "zstd-planes-8", "lz4", "x"]
    segments = ["data/a/r0.seg", "data/b/r1.seg"]  # a third index is out of range
    table = [r for rows in items for r in rows]
    nbytes = [sum(r[3] for r in rows) + data.draw(st.sampled_from([0, 0, 1])) for rows in items]
    head = {"format": "dckpt.manifest", "step": 3, "attempt": "s3-t0-00000000",
            "created_at": 1.0, "world_size": 1, "metrics": {}, "bytes_written": 0,
            "phase_s": {}, "block_size_bytes": 4096, "dcp_version": None, "planner_data": None,
            "segments": segments, "bytes_logical": sum(nbytes)}
    v2 = {**head, "version": 2, "items": {
        f"v{i}": {"kind": "value", "encoding": "bytes", "nbytes": n,
                  "blocks": [[s, o, ln, r, d.hex(), codes[c]] for s, o, ln, r, d, c in rows]}
        for i, (rows, n) in enumerate(zip(items, nbytes))}}
    columns = [b"".join(struct.pack(f, r[i]) for r in table)
               for i, f in ((1, "<Q"), (0, "<I"), (2, "<I"), (3, "<I"), (5, "<B"))]
    firsts = [sum(len(rows) for rows in items[:i]) for i in range(len(items))]
    v3 = {**head, "version": 3, "items": {
        f"v{i}": {"kind": "value", "encoding": "bytes", "nbytes": n, "blocks": [f, len(rows)]}
        for i, (rows, n, f) in enumerate(zip(items, nbytes, firsts))},
        "block_table": base64.b64encode(b"".join(columns + [r[4] for r in table])).decode()}
    outcomes = []
    for doc in (v2, v3):
        try:
            m = decode(reseal(doc))
            outcomes.append([(k, e.nbytes, e.data.blocks) for k, e in m.items.items()])
        except FormatError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1], (items, nbytes)


def test_a_third_version_item_builds_its_blocks_when_first_asked(monkeypatch):
    """Decoding builds no reference; an item's are built once, on first use, and equal the
    encoded ones; the manifest's other items stay unbuilt."""
    from dckpt.block_table import BlockTable

    seg = "data/s1-t0-00000000/r00000-000.seg"
    items = {f"t{i}": TensorEntry("int8", (3,), False, (ChunkEntry((0,), (3,), StoredData(
        3, (BlockRef(seg, 10 * i, 2, 2, f"{i:032x}"), BlockRef(seg, 10 * i + 2, 1, 1,
                                                                "f" * 32, "raw")))),))
             for i in range(5)}
    m = dataclasses.replace(_manifest(), items=items, bytes_logical=15, planner_data=None)
    built = []
    real = BlockTable.refs
    monkeypatch.setattr(BlockTable, "refs", lambda self, first, count: built.append(
        (first, count)) or real(self, first, count))
    back = decode(encode(m))
    assert built == []
    assert back.items["t3"].chunks[0].data.blocks == items["t3"].chunks[0].data.blocks
    assert back.items["t3"].chunks[0].data.blocks is back.items["t3"].chunks[0].data.blocks
    assert built == [(6, 2)]
    assert back.items == m.items and len(built) == 5


def test_threads_that_build_one_items_references_at_once_get_equal_ones():
    import threading

    seg = "data/s1-t0-00000000/r00000-000.seg"
    blocks = tuple(BlockRef(seg, i, 1, 1, f"{i:032x}") for i in range(20_000))
    m = dataclasses.replace(_manifest(), items={"t": TensorEntry("int8", (20_000,), False, (
        ChunkEntry((0,), (20_000,), StoredData(20_000, blocks)),))}, bytes_logical=20_000,
        planner_data=None)
    for _ in range(5):
        data = decode(encode(m)).items["t"].chunks[0].data
        start, found = threading.Barrier(8), []

        def build(data=data, start=start, found=found):
            start.wait()
            found.append(data.blocks)

        threads = [threading.Thread(target=build) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(found) == 8 and all(b == blocks for b in found)


def test_extents_and_spans_of_a_decoded_manifest_are_its_references():
    """From the table's rows, for the whole manifest, a part of its items, and after some
    items built their references: what ``extents`` of every reference says."""
    segs = [f"data/s{i}-t0-00000000/r00000-000.seg" for i in range(3)]
    items = {f"t{i}": TensorEntry("int8", (4,), False, (ChunkEntry((0,), (4,), StoredData(
        4, (BlockRef(segs[i % 3], 100 * i, 3, 3, f"{i:032x}"),
            BlockRef(segs[(i + 1) % 3], 7 * i, 1, 1, "f" * 32)))),)) for i in range(7)}
    m = dataclasses.replace(_manifest(), items=items, bytes_logical=28, planner_data=None)
    every = extents(m.refs())
    back = decode(encode(m))
    assert back.extents() == every and back.segments() == sorted(segs)
    some = {k: back.items[k] for k in ("t1", "t4", "t5")}
    part = dataclasses.replace(back, items=some)
    assert part.extents() == extents(dataclasses.replace(m, items={
        k: m.items[k] for k in some}).refs())
    spans = [(b.segment, b.offset, b.length) for b in m.refs()]
    assert list(back.spans()) == spans
    back.items["t2"].chunks[0].data.blocks  # built: the rest still from the table
    assert back.extents() == every and extents(back.refs()) == every
    assert list(back.spans()) == spans and list(m.spans()) == spans


def test_a_newer_format_stops_a_load_where_damage_falls_back(tmp_path):
    """A sound manifest of a version this dckpt does not know yet is news, not damage: a load
    of the newest step stops at it (falling back would silently lose the training since)
    and names it; the same bytes damaged, or a version that is not a number, are damage, and
    the load falls back to the step before. gc stops at it and removes nothing."""
    url = str(tmp_path / "repo")
    dckpt.save({"w": torch.ones(3)}, url, step=1)
    dckpt.save({"w": torch.full((3,), 2.0)}, url, step=2)
    path = os.path.join(url, layout.manifest_name(2))
    doc = json.loads(open(path, "rb").read())
    newer = reseal(dict(doc, version=4, future={"field": 1}))
    with pytest.raises(dckpt.NewerFormatError, match="format version 4 is newer"):
        decode(newer)
    for raw, loads in [(newer, None), (newer.replace(b'"version": 4', b'"version": 5'), 1),
                       (reseal(dict(doc, version="4")), 1), (newer[:-3], 1)]:
        open(path, "wb").write(raw)
        out = {"w": torch.zeros(3)}
        if loads is None:
            with pytest.raises(dckpt.NewerFormatError, match="upgrade dckpt"):
                dckpt.load(out, url)
            assert torch.equal(out["w"], torch.zeros(3))  # nothing loaded
            assert dckpt.load(out, url, step=1).step == 1  # an older step, asked by number
            with pytest.raises(dckpt.FormatError):
                dckpt.gc(url, min_age_s=0)
            assert dckpt.verify(url, step=1).ok and not dckpt.verify(url, step=2).ok
        else:
            info = dckpt.load(out, url)
            assert info.step == 1 and [s for s, _ in info.skipped] == [2]
            assert torch.equal(out["w"], torch.ones(3))
    assert os.path.exists(path) and len(os.listdir(os.path.join(url, "data"))) == 2


_TRICKY = [True, False, 0, 1, -1, 1.0, 0.0, 2 ** 63, 2 ** 70, None, "", "x", "raw", "zstd",
           "float32", [], [0], [2, 3], [True, 3], [2.0, 3], {}, "ab" * 16, "AB" * 16, 24, 48]


def _tensor_doc() -> dict:
    return {"kind": "tensor", "dtype": "float32", "size": [2, 3], "requires_grad": False,
            "chunks": [{"offsets": [0, 0], "sizes": [2, 3], "nbytes": 24,
                        "blocks": [[0, 0, 16, 16, "ab" * 16, "raw"],
                                   [1, 8, 8, 8, "cd" * 16, "raw"]]}]}


def _edit(node, path, value):
    """``node`` with the value at ``path`` replaced, where the path still leads somewhere."""
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if not (isinstance(node, dict) and (key in node or last)
                or isinstance(node, list) and isinstance(key, int) and key < len(node)):
            return
        if last:
            node[key] = value
            return
        node = node[key]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([
    ("dtype",), ("size",), ("requires_grad",), ("chunks",), ("kind",),
    ("chunks", 0, "offsets"), ("chunks", 0, "sizes"), ("chunks", 0, "nbytes"),
    ("chunks", 0, "blocks"), ("chunks", 0, "offsets", 1), ("chunks", 0, "sizes", 0),
    *[("chunks", 0, "blocks", b, f) for b in (0, 1) for f in range(6)]]),
    st.sampled_from(_TRICKY)), max_size=3))
def test_the_fast_tensor_entry_decodes_as_the_checked_one(edits):
    """The decoder's fast path for a tensor stored in one chunk takes exactly what the
    checked path takes, and builds the same entry; anything else it leaves to the checked
    path, which names what is wrong."""
    from dckpt.decode_items import _entry_checked, _whole_tensor_fast

    doc = _tensor_doc()
    for path, value in edits:
        _edit(doc, path, copy.deepcopy(value))  # the examples' values are shared: not theirs
    segments = ["data/a", "data/b"]
    fast = _whole_tensor_fast(doc, segments) if isinstance(doc, dict) else None
    try:
        checked = _entry_checked("w", doc, segments, 2)
    except FormatError:
        assert fast is None, edits
        return
    assert fast is None or fast == checked, edits


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([
    ("dtype",), ("size",), ("chunks",), ("chunks", 0, "offsets"), ("chunks", 0, "sizes"),
    ("chunks", 0, "nbytes"), ("chunks", 0, "blocks"), ("chunks", 0, "blocks", 0),
    ("chunks", 0, "blocks", 1)]), st.sampled_from(_TRICKY)), max_size=3))
def test_the_fast_tensor_entry_takes_table_rows_as_the_checked_one(edits):
    """The same, for a third version's item, whose blocks are rows of the table: each path
    takes the same rows, or neither takes any."""
    from dckpt.block_table import BlockTable
    from dckpt.decode_items import Rows, _entry_checked, _whole_tensor_fast

    doc = _tensor_doc()
    doc["chunks"][0]["blocks"] = [0, 2]
    for path, value in edits:
        _edit(doc, path, copy.deepcopy(value))
    segments = ["data/a", "data/b"]
    rows = [BlockRef("data/a", 0, 16, 16, "ab" * 16), BlockRef("data/b", 8, 8, 8, "cd" * 16)]
    table = BlockTable(_reference_table(rows, {"data/a": 0, "data/b": 1}), segments)
    fast_rows, checked_rows = Rows(table), Rows(table)
    fast = _whole_tensor_fast(doc, fast_rows) if isinstance(doc, dict) else None
    try:
        checked = _entry_checked("w", doc, checked_rows, 3)
    except FormatError:
        assert fast is None and fast_rows.next == 0, edits
        return
    assert fast is None or (fast == checked and fast_rows.next == checked_rows.next), edits
    if not checked.chunks:  # an empty tensor (size [0]) with no chunk: no rows taken
        assert checked.size == (0,) and checked_rows.next == 0, edits
        return
    assert checked.chunks[0].data.blocks == tuple(rows) and checked_rows.next == 2


def _reference_table(rows: list[BlockRef], index: dict[str, int]) -> bytes:
    """docs/format.md's block table, packed a row at a time with struct."""
    codes = ["raw", "zstd", "zstd-planes-2", "zstd-planes-4", "zstd-planes-8"]
    return b"".join([
        b"".join(struct.pack("<Q", r.offset) for r in rows),
        b"".join(struct.pack("<I", index[r.segment]) for r in rows),
        b"".join(struct.pack("<I", r.length) for r in rows),
        b"".join(struct.pack("<I", r.raw_length) for r in rows),
        bytes(codes.index(r.codec) for r in rows),
        b"".join(bytes.fromhex(r.digest) for r in rows)])


def _reference_encode(m: Manifest, version: int = 3) -> bytes:
    """The manifest as a dict given to json.dumps: what ``encode`` writes from templates
    (version 3), or what the encoder of version 2 wrote."""
    segments = m.segments()
    index = {name: i for i, name in enumerate(segments)}
    rows: list[BlockRef] = []

    def data_json(d: StoredData) -> dict:
        if version == 2:
            return {"nbytes": d.nbytes,
                    "blocks": [[index[s], o, n, r, h, c] for s, o, n, r, h, c in d.blocks]}
        rows.extend(d.blocks)
        return {"nbytes": d.nbytes, "blocks": [len(rows) - len(d.blocks), len(d.blocks)]}

    items: dict[str, dict] = {}
    for fqn, e in m.items.items():
        if isinstance(e, TensorEntry):
            items[fqn] = {"kind": "tensor", "dtype": e.dtype, "size": list(e.size),
                          "requires_grad": e.requires_grad,
                          "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                                      **data_json(c.data)} for c in e.chunks]}
        else:
            items[fqn] = {"kind": "value", "encoding": e.encoding, **data_json(e.data)}
    doc = {"format": "dckpt.manifest", "version": version, "step": m.step,
           "attempt": m.attempt, "created_at": m.created_at, "world_size": m.world_size,
           "metrics": {k: v if not isinstance(v, float) or v == v and abs(v) != float("inf")
                       else str(v) for k, v in m.metrics.items()},
           "bytes_logical": m.bytes_logical, "bytes_written": m.bytes_written,
           "phase_s": m.phase_s, "block_size_bytes": m.block_size_bytes,
           "dcp_version": m.dcp_version, "planner_data": m.planner_data,
           "segments": segments, "items": items}
    if version == 3:
        doc["block_table"] = base64.b64encode(_reference_table(rows, index)).decode()
    return seal(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


def _v2_doc() -> dict:
    return json.loads(_reference_encode(_manifest(), version=2))


_SEGMENTS = ["data/s1-t0-00000000/r00000-000.seg", "data/s0-t0-00000000/r00001-002.seg"]
_a_block = st.builds(BlockRef, st.sampled_from(_SEGMENTS), st.integers(0, 2**50),
                     st.integers(0, 2**30), st.integers(0, 2**30),
                     st.sampled_from(["0" * 32, "0123456789abcdef" * 2]),
                     st.sampled_from(["raw", "zstd"]))
_a_data = st.builds(StoredData, st.integers(0, 2**40), st.lists(_a_block, max_size=3).map(tuple))
_some_ints = st.lists(st.integers(0, 2**40), max_size=3).map(tuple)
_an_entry = st.one_of(
    st.builds(ValueEntry, _a_data, st.sampled_from(["torch", "bytes"])),
    st.builds(TensorEntry, st.sampled_from(["float32", "bfloat16", "int8", "bool"]), _some_ints,
              st.booleans(), st.lists(st.builds(ChunkEntry, _some_ints, _some_ints, _a_data),
                                      max_size=3).map(tuple)))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _an_entry, max_size=6))
def test_encode_writes_what_json_dumps_of_the_manifest_would(items):
    """Keys with quotes, backslashes, control characters and any unicode, values, tensors
    of any number of chunks and blocks, both codecs: byte for byte json.dumps's output."""
    m = dataclasses.replace(_manifest(), items=items, planner_data=None)
    assert encode(m) == _reference_encode(m)


def test_encode_of_a_saved_manifest_is_byte_for_byte_the_dumps_one(tmp_path):
    url = str(tmp_path)
    state = {"w": torch.arange(5000.0), 'we"ird\\key\n': torch.ones(3, 2),
             "meta": {"epoch": 3}, "b": torch.zeros(0), "h": torch.ones(40, 30).bfloat16()}
    dckpt.save(state, url, step=1, config=dckpt.SaveConfig(block_size_bytes=4096,
                                                           compression="on"),
               metrics={"loss": float("nan"), "acc": 0.5})
    raw = open(os.path.join(url, layout.manifest_name(1)), "rb").read()
    assert encode(decode(raw)) == _reference_encode(decode(raw)) == raw


def test_a_saved_manifest_and_its_second_version_form_decode_alike(tmp_path):
    """Saved checkpoints (compressed and raw blocks, a differential save over two segments,
    values of both encodings, an empty tensor): the manifest as written and the same
    references as a second version's JSON rows decode to the same manifest, which encodes
    back to the bytes written."""
    import io

    url = str(tmp_path / "repo")
    cfg = dckpt.SaveConfig(block_size_bytes=4096, compression="on")
    state = {"w": torch.arange(5000.0), "n": torch.randn(3000), "e": torch.zeros(0),
             "meta": {"epoch": 3}, "buf": io.BytesIO(b"x" * 100)}
    dckpt.save(state, url, step=1, config=cfg)
    state["w"][:10] = -1
    dckpt.save(state, url, step=2, config=cfg)
    for step in (1, 2):
        raw = open(os.path.join(url, layout.manifest_name(step)), "rb").read()
        doc = as_rows(json.loads(raw))
        doc.pop("checksum")
        v2 = seal(json.dumps(doc, separators=(",", ":")).encode())
        m3, m2 = decode(raw), decode(v2)
        assert m3 == m2 and encode(m2) == raw == encode(m3)
        assert len(m3.segments()) == step


def _refs(m: Manifest) -> list[tuple[str, int, int]]:
    return [(b.segment, b.offset, b.length) for b in m.refs()]


def test_references_are_the_decoded_manifests_for_every_kind_of_item(tmp_path):
    """Tensors in one chunk and in many, values, compressed blocks, blocks shared with the
    checkpoint before (a differential save), and a first version's manifest."""
    url = str(tmp_path / "repo")
    state = {"w": torch.arange(5000.0), "meta": {"epoch": 3, "name": "x"},
             "h": torch.zeros(40, 30, dtype=torch.bfloat16)}
    cfg = dckpt.SaveConfig(block_size_bytes=4096, compression="on")
    dckpt.save(state, url, step=1, config=cfg)
    state["w"][:10] = -1
    dckpt.save(state, url, step=2, config=cfg)
    golden = os.path.join(GOLDEN, layout.manifest_name(42))
    for path, step in [(os.path.join(url, layout.manifest_name(1)), 1),
                       (os.path.join(url, layout.manifest_name(2)), 2), (golden, 42)]:
        raw = open(path, "rb").read()
        assert references(raw) == (step, _refs(decode(raw)))
    assert len(references(open(os.path.join(url, layout.manifest_name(2)), "rb").read())[1]) > 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([
    ("items",), ("items", "w"), ("items", "w", "kind"), ("items", "w", "chunks"),
    ("items", "w", "chunks", 0), ("items", "w", "chunks", 0, "blocks"),
    ("items", "v", "kind"), ("items", "v", "blocks"), ("segments",), ("segments", 0),
    ("step",), ("version",),
    *[("items", "w", "chunks", 0, "blocks", b, f) for b in (0, 1) for f in range(6)]]),
    st.sampled_from([*_TRICKY, {"kind": "tensor"}, {"kind": "value", "blocks": []},
                     [[0, 0, 4, 4, "ab" * 16, "raw"]]])), max_size=3))
def test_references_are_decodes_or_checked_rows(edits):
    """A forged manifest (resealed after the edits): where decode accepts it, references
    returns exactly its blocks; where decode refuses it, references either refuses it too
    or returns only rows whose segment, offset and length decode's checks would pass (a
    second version's manifest: the third's rows are in its block table, tested below)."""
    doc = _v2_doc()
    for path, value in edits:
        _edit(doc, path, copy.deepcopy(value))  # the examples' values are shared: not theirs
    raw = reseal(doc)
    try:
        expected = _refs(decode(raw))
    except DckptError:
        try:
            _, found = references(raw)
        except DckptError:
            return
        segments = doc["segments"]
        assert all(seg in segments and type(o) is int and type(n) is int and o >= 0 and n >= 0
                   for seg, o, n in found), edits
        return
    assert references(raw) == (doc["step"], expected), edits


def test_references_within_reusing_are_the_memos_manifest(monkeypatch):
    raw = encode(_manifest())
    memo: dict = {}
    with reusing(memo, 1 << 20):
        assert references(raw) == (1, _refs(decode(raw)))
    assert len(memo) == 1  # decoded whole, for the next run
    monkeypatch.setattr("dckpt.decoder.entry", None)  # an item decoded would raise
    with reusing(memo, 1 << 20):
        assert references(raw)[0] == 1
    assert references(raw) == (1, _refs(_manifest()))  # outside: items never decoded


@pytest.mark.parametrize("name, ok", [
    ("data/s1-t2-abcdef01/r00000-000.seg", True),
    ("data/x/y.seg", True),
    ("data/../etc/passwd", False),
    ("/data/x.seg", False),
    ("/etc/passwd", False),
    ("s3://bucket/data/x.seg", False),
    ("manifests/000000000001.json", False),
    ("data/x/../../y", False),
    ("data\\x", False),
    ("data/.hidden", False),
    ("", False),
    (7, False),
])
def test_object_names_are_checked(name, ok):
    if ok:
        assert layout.check_object_name(name) == name
    else:
        with pytest.raises(FormatError):
            layout.check_object_name(name)


def test_layout_names_parse_back():
    assert layout.manifest_name(7) == "manifests/000000000007.json"
    assert layout.parse_manifest_name("000000000007.json") == 7
    assert layout.parse_manifest_name(".tmp-s7-t1-0000aaaa.json") is None
    attempt = layout.new_attempt(7, now_s=1000.5)
    assert attempt.startswith("s7-t1000500-") and layout.attempt_started_s(attempt) == 1000.5
    assert layout.segment_name(attempt, 3, 1) == f"data/{attempt}/r00003-001.seg"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64,
                                   torch.uint8, torch.int64])
def test_dtype_table_round_trips(dtype):
    assert dtype_from_name(dtype_name(dtype)) == dtype


@pytest.mark.parametrize("nbytes, size, expected", [
    (0, 4, []), (3, 4, [(0, 3)]), (8, 4, [(0, 4), (4, 4)]), (9, 4, [(0, 4), (4, 4), (8, 1)]),
])
def test_cut(nbytes, size, expected):
    assert cut(nbytes, size) == expected


def test_check_names_the_block_and_the_damage():
    data = b"abcdefgh"
    ref = BlockRef("data/a/b.seg", 16, 8, 8, digest(data))
    check(data, ref, what="tensor 'w'")
    with pytest.raises(IntegrityError, match="tensor 'w': block at data/a/b.seg@16"):
        check(b"abcdefgX", ref, what="tensor 'w'")
    with pytest.raises(IntegrityError, match="truncated"):
        check(b"abc", ref, what="tensor 'w'")


def _blocks(spec):
    return [(BlockRef(seg, off, n, n, "0" * 32), dest) for seg, off, n, dest in spec]


@pytest.mark.parametrize("spec, max_bytes, expected", [
    ([("a", 0, 4, 0), ("a", 4, 4, 4), ("a", 8, 4, 8)], 100, [("a", 0, 12, 0, 3)]),
    ([("a", 0, 4, 0), ("a", 4, 4, 4), ("a", 8, 4, 8)], 8, [("a", 0, 8, 0, 2), ("a", 8, 4, 8, 1)]),
    ([("a", 0, 4, 0), ("b", 4, 4, 4)], 100, [("a", 0, 4, 0, 1), ("b", 4, 4, 4, 1)]),
    ([("a", 0, 4, 0), ("a", 8, 4, 4)], 100, [("a", 0, 4, 0, 1), ("a", 8, 4, 4, 1)]),
])
def test_coalesce(spec, max_bytes, expected):
    got = [(r.segment, r.offset, r.length, r.dest_start, len(r.blocks))
           for r in coalesce(_blocks(spec), max_bytes)]
    assert got == expected


def _coalesce_by_the_rule(blocks, max_bytes):
    """The rule, plainly: a block joins the read before it when it follows it in the same
    object and in the destination, both are stored raw, and the read stays within max_bytes."""
    runs = []
    for ref, dest in blocks:
        if runs:
            prev, prev_dest = runs[-1][-1]
            first = runs[-1][0][0]
            if (ref.segment == prev.segment and ref.offset == prev.offset + prev.length
                    and dest == prev_dest + prev.raw_length and ref.codec == prev.codec == "raw"
                    and ref.offset + ref.length - first.offset <= max_bytes):
                runs[-1].append((ref, dest))
                continue
        runs.append([(ref, dest)])
    return [(run[0][0].segment, run[0][0].offset,
             run[-1][0].offset + run[-1][0].length - run[0][0].offset, run[0][1], tuple(run))
            for run in runs]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3), st.integers(1, 8),
                          st.sampled_from(["raw", "raw", "zstd"]), st.integers(0, 2)),
                max_size=12),
       st.integers(1, 40))
def test_coalesce_follows_the_rule(spec, max_bytes):
    """Blocks laid out mostly back to back (gaps, other objects and compressed blocks mixed
    in): every read coalesce plans is the rule's, and the ``extents`` of the blocks are each
    object's furthest end."""
    blocks, offsets, dest = [], {"a": 0, "b": 0}, 0
    for seg, gap, n, codec, dest_gap in spec:
        offsets[seg] += gap
        raw = n if codec == "raw" else n + 3
        blocks.append((BlockRef(seg, offsets[seg], n, raw, "0" * 32, codec), dest + dest_gap))
        offsets[seg] += n
        dest += dest_gap + raw
    got = [(r.segment, r.offset, r.length, r.dest_start, r.blocks)
           for r in coalesce(blocks, max_bytes)]
    assert got == _coalesce_by_the_rule(blocks, max_bytes)
    ends = {}
    for ref, _ in blocks:
        ends[ref.segment] = max(ends.get(ref.segment, 0), ref.offset + ref.length)
    assert extents(ref for ref, _ in blocks) == ends


def test_blocks_in_range():
    refs = tuple(BlockRef("a", i * 4, 4, 4, "0" * 32) for i in range(4))
    data = StoredData(16, refs)
    first, picked = blocks_in_range(data, 5, 9)
    assert first == 4 and [(r.offset, pos) for r, pos in picked] == [(4, 0), (8, 4)]
    assert blocks_in_range(data, 0, 16)[0] == 0 and len(blocks_in_range(data, 0, 16)[1]) == 4


@pytest.mark.parametrize("sizes, offsets, lengths, expected", [
    ((4, 6), (1, 0), (2, 6), (6, 18)),      # rows: contiguous
    ((4, 6), (0, 2), (4, 2), None),         # columns: not
    ((4, 6), (2, 3), (1, 2), (15, 17)),     # part of one row
    ((2, 3, 4), (1, 1, 0), (1, 2, 4), (16, 24)),
    ((), (), (), (0, 1)),                   # 0-dim
    ((5,), (0,), (0,), (0, 0)),
])
def test_box_range(sizes, offsets, lengths, expected):
    assert box_range(sizes, offsets, lengths) == expected


def test_paused_gc_from_many_threads_keeps_the_collector_off_inside_and_as_it_was_after():
    """An async save's commit pauses the collector beside a load's decoding: inside every
    pause it is off, whatever the other threads do, and after the last it runs again (or
    stays off where the caller had turned it off)."""
    import gc
    import random
    import sys
    import threading
    import time

    from dckpt.gcpause import paused_gc

    seen_on: list[int] = []
    barrier = threading.Barrier(6)

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        barrier.wait()
        for _ in range(300):
            with paused_gc():
                time.sleep(0)  # another thread's turn, inside the pause
                if gc.isenabled():
                    seen_on.append(seed)
                if rnd.random() < 0.3:
                    with paused_gc():
                        if gc.isenabled():
                            seen_on.append(seed)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        assert gc.isenabled()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert seen_on == [] and gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

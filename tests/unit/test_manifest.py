"""The format: encode/decode, the golden manifest, names, and the pure planning helpers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import pytest
import torch
from dckpt_testing import reseal
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
from dckpt.reader import box_range
from dckpt.reads import blocks_in_range, coalesce

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "repo-v1")


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
    (lambda d: d.update(version=3), "version 3 is not supported"),
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
    import json

    doc = json.loads(encode(_manifest()))
    edit(doc)
    with pytest.raises(FormatError, match=message):
        decode(reseal(doc))


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
        _edit(doc, path, value)
    segments = ["data/a", "data/b"]
    fast = _whole_tensor_fast(doc, segments) if isinstance(doc, dict) else None
    try:
        checked = _entry_checked("w", doc, segments, 2)
    except FormatError:
        assert fast is None, edits
        return
    assert fast is None or fast == checked, edits


def _reference_encode(m: Manifest) -> bytes:
    """The manifest as a dict given to json.dumps: what ``encode`` writes from templates."""
    segments = m.segments()
    index = {name: i for i, name in enumerate(segments)}

    def data_json(d: StoredData) -> dict:
        return {"nbytes": d.nbytes,
                "blocks": [[index[s], o, n, r, h, c] for s, o, n, r, h, c in d.blocks]}

    items: dict[str, dict] = {}
    for fqn, e in m.items.items():
        if isinstance(e, TensorEntry):
            items[fqn] = {"kind": "tensor", "dtype": e.dtype, "size": list(e.size),
                          "requires_grad": e.requires_grad,
                          "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                                      **data_json(c.data)} for c in e.chunks]}
        else:
            items[fqn] = {"kind": "value", "encoding": e.encoding, **data_json(e.data)}
    doc = {"format": "dckpt.manifest", "version": 2, "step": m.step, "attempt": m.attempt,
           "created_at": m.created_at, "world_size": m.world_size,
           "metrics": {k: v if not isinstance(v, float) or v == v and abs(v) != float("inf")
                       else str(v) for k, v in m.metrics.items()},
           "bytes_logical": m.bytes_logical, "bytes_written": m.bytes_written,
           "phase_s": m.phase_s, "block_size_bytes": m.block_size_bytes,
           "dcp_version": m.dcp_version, "planner_data": m.planner_data,
           "segments": segments, "items": items}
    return seal(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


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
    or returns only rows whose segment, offset and length decode's checks would pass."""
    doc = json.loads(encode(_manifest()))
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

"""Differential saves, compression, delete + gc, export: every checkpoint stays bit-exact."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt.cli import main as cli
from dckpt.config import SaveConfig
from dckpt_testing import arm, disarm

BLOCK = 64 << 10  # small blocks: small tensors span several


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(40_000 + 1000 * i, generator=g) for i in range(8)} | {
        "emb": torch.randn(512, 64, generator=g).bfloat16(), "step": 0}


def _zeros(state: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in state.items()}


def _load(url: str, step: int, like: dict) -> dict:
    out = _zeros(like)
    dckpt.load(out, url, step=step)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _chain(url: str, saves: int = 5, seed: int = 0, config: SaveConfig | None = None):
    """``saves`` checkpoints; before each but the first a random subset of tensors changes."""
    config = config or SaveConfig(block_size_bytes=BLOCK)
    rng = torch.Generator().manual_seed(seed + 100)
    state, snapshots, infos = _state(seed), {}, {}
    for step in range(1, saves + 1):
        if step > 1:
            for k in [k for k in state if isinstance(state[k], torch.Tensor)]:
                if torch.rand(1, generator=rng).item() < 0.4:
                    state[k] += 1
        state["step"] = step
        infos[step] = dckpt.save(state, url, step=step, config=config)
        snapshots[step] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                           for k, v in state.items()}
    return snapshots, infos


@pytest.mark.parametrize("seed", [0, 1])
def test_a_chain_of_differential_saves_loads_bit_exact(tmp_path, seed):
    url = str(tmp_path / "repo")
    snapshots, infos = _chain(url, seed=seed)
    full = infos[1].bytes_written
    assert full == infos[1].bytes_logical  # the first save writes everything
    for step in range(2, 6):
        assert infos[step].bytes_written < full  # only what changed
    for step, want in snapshots.items():
        _assert_same(_load(url, step, want), want)
    assert dckpt.verify(url, all_steps=True).ok
    assert [i.bytes_written for i in dckpt.list_checkpoints(url)] == \
        [infos[s].bytes_written for s in range(1, 6)]


def test_an_unchanged_state_writes_nothing_and_identical_blocks_are_written_once(tmp_path):
    url = str(tmp_path / "repo")
    same = torch.randn(3 * BLOCK // 4)
    state = {"a": same, "b": same.clone(), "n": 1}
    first = dckpt.save(state, url, step=1, config=SaveConfig(block_size_bytes=BLOCK))
    value_bytes = first.bytes_logical - 2 * same.numel() * 4
    assert first.bytes_written == same.numel() * 4 + value_bytes
    second = dckpt.save(state, url, step=2, config=SaveConfig(block_size_bytes=BLOCK))
    assert second.bytes_written == 0
    off = dckpt.save(state, url, step=3, config=SaveConfig(block_size_bytes=BLOCK, dedup=False))
    assert off.bytes_written == off.bytes_logical
    _assert_same(_load(url, 2, state), state)


@pytest.mark.parametrize("middle", [2, 3, 4])
def test_delete_a_middle_checkpoint_then_gc_keeps_the_others_whole(tmp_path, middle):
    url = str(tmp_path / "repo")
    snapshots, _ = _chain(url)
    dckpt.delete(url, step=middle)
    graced = dckpt.gc(url)  # within the grace period its blocks stay
    assert graced.deleted == () and middle in graced.live_checkpoints
    dry = dckpt.gc(url, min_age_s=0, dry_run=True)
    report = dckpt.gc(url, min_age_s=0)
    assert report.deleted == dry.deleted and report.bytes_freed == dry.bytes_freed
    assert middle not in report.live_checkpoints
    assert all(not os.path.exists(tmp_path / "repo" / name) for name in report.deleted)
    assert os.listdir(tmp_path / "repo" / "deleted") == []  # the expired tombstone went too
    for step, want in snapshots.items():
        if step != middle:
            _assert_same(_load(url, step, want), want)
    assert dckpt.verify(url, all_steps=True).ok
    again = dckpt.gc(url, min_age_s=0)
    assert again.deleted == ()


def test_gc_removes_the_data_of_a_deleted_checkpoint_that_nothing_shares(tmp_path):
    url = str(tmp_path / "repo")
    config = SaveConfig(block_size_bytes=BLOCK)
    dckpt.save(_state(1), url, step=1, config=config)
    two = dict(_state(2), step=2)  # shares no block with step 1
    dckpt.save(two, url, step=2, config=config)
    size_before = sum(os.path.getsize(os.path.join(d, f))
                      for d, _, fs in os.walk(tmp_path / "repo" / "data") for f in fs)
    dckpt.delete(url, step=1)
    report = dckpt.gc(url, min_age_s=0)
    assert report.deleted and report.bytes_freed > 0.4 * size_before
    assert report.partly_referenced == ()
    assert not os.path.exists(tmp_path / "repo" / "data" / report.deleted[0].split("/")[1])
    _assert_same(_load(url, 2, two), two)


@pytest.mark.parametrize("damage", ["truncated", "folder"])
def test_a_damaged_record_of_a_deleted_checkpoint_stops_gc_saying_how_long(tmp_path, damage):
    """Within its grace period its blocks may be a save's base: gc takes nothing and says
    when the record expires; after that, gc goes on."""
    url = str(tmp_path / "repo")
    dckpt.save(_state(1), url, step=1)
    dckpt.save(_state(2), url, step=2)
    dckpt.delete(url, step=1)
    (record,) = (tmp_path / "repo" / "deleted").iterdir()
    if damage == "truncated":
        record.write_bytes(record.read_bytes()[:20])
    else:
        record.unlink()
        record.mkdir()
    with pytest.raises(dckpt.FormatError, match="gc stopped: the record of deleted checkpoint "
                       r"deleted/0+1-\d+\.json .* expires 3600 s after the delete"):
        dckpt.gc(url)
    assert dckpt.gc(url, min_age_s=0, dry_run=True).live_checkpoints == (2,)  # expired


def test_gc_reports_the_waste_of_a_partly_referenced_segment(tmp_path):
    url = str(tmp_path / "repo")
    config = SaveConfig(block_size_bytes=BLOCK, writer_threads=1)
    one = {"keep": torch.randn(BLOCK // 4), "drop": torch.randn(BLOCK // 4)}
    dckpt.save(one, url, step=1, config=config)
    two = {"keep": one["keep"], "drop": torch.randn(BLOCK // 4)}
    dckpt.save(two, url, step=2, config=config)
    dckpt.delete(url, step=1)
    report = dckpt.gc(url, min_age_s=0)
    assert report.deleted == ()  # step 1's segment still holds step 2's "keep"
    [(name, size, wasted)] = report.partly_referenced
    assert wasted == BLOCK and size >= 2 * BLOCK


def test_gc_racing_a_save_deletes_nothing_referenced_and_the_save_commits(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    states = {k: dict(_state(k), step=k) for k in (1, 2, 3)}  # no block in common
    dckpt.save(states[1], url, step=1)
    dckpt.save(states[2], url, step=2)
    dckpt.delete(url, step=1)
    result = {}

    def save() -> None:
        result["info"] = dckpt.save(states[3], url, step=3)

    arm("slow", delay_s=0.05)
    try:
        t = threading.Thread(target=save)
        t.start()
        deadline = time.monotonic() + 30  # a segment, not only its folder (made just before)
        while not list((tmp_path / "repo" / "data").glob("s3-*/r00000-*.seg")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        report = dckpt.gc(url)  # while step 3 is being written
        t.join(60)
    finally:
        disarm()
    assert not t.is_alive() and result["info"].step == 3
    assert report.deleted == () and report.kept_young  # step 3's objects, in flight
    final = dckpt.gc(url, min_age_s=0)
    assert final.deleted  # step 1's data, once its grace ran out
    _assert_same(_load(url, 3, states[3]), states[3])
    _assert_same(_load(url, 2, states[2]), states[2])


@pytest.mark.parametrize("race, op", [
    ("deleted", "gc"), ("deleted", "ls"), ("deleted", "verify"),
    ("its record expired", "gc"), ("collected", "verify"), ("collected", "verify step 1")])
def test_gc_verify_and_ls_racing_another_process_see_no_damage(tmp_path, monkeypatch, race, op):
    """A job's retention deletes and collects while an operator runs gc, verify or ls: a
    checkpoint that vanishes after the listing is neither damage nor a reason for gc to stop,
    and gc still keeps a just-deleted checkpoint's blocks for their grace period."""
    from dckpt.storage import Store

    from dckpt import repository

    url, repo = str(tmp_path / "repo"), tmp_path / "repo"
    states = {k: dict(_state(k), step=k) for k in (1, 2, 3)}  # no block in common
    for k, state in states.items():
        dckpt.save(state, url, step=k)
    folder_1 = {b.segment.rsplit("/", 1)[0] for b in dckpt.inspect(url, step=1).refs()}
    if race == "its record expired":
        dckpt.delete(url, step=1)
    read_bytes, read_manifest, raced = Store.read_bytes, repository.read_manifest, []

    def read_racing(self, name: str) -> bytes:  # the other process acts after the listing
        if not raced and name.startswith("manifests/000000000001" if race == "deleted"
                                          else "deleted/"):
            raced.append(name)
            if race == "deleted":
                dckpt.delete(url, step=1)
            else:  # a gc with deleted_min_age_s=0 took the record
                os.unlink(repo / name)
        return read_bytes(self, name)

    def read_then_collected(store, step):  # verify read the manifest; then it all went
        m = read_manifest(store, step)
        if step == 1 and race == "collected" and not raced:
            raced.append(step)
            dckpt.delete(url, step=1)
            dckpt.gc(url, min_age_s=0)
        return m

    monkeypatch.setattr(Store, "read_bytes", read_racing)
    monkeypatch.setattr(repository, "read_manifest", read_then_collected)
    if op == "gc":
        report = dckpt.gc(url, min_age_s=0, deleted_min_age_s=3600)
        if race == "deleted":  # its record is live: its blocks stay
            assert report.deleted == () and report.live_checkpoints == (2, 3, 1)
        else:
            assert report.live_checkpoints == (2, 3)
            assert {n.rsplit("/", 1)[0] for n in report.deleted} == folder_1
    elif op == "ls":
        assert [(i.step, i.problem) for i in dckpt.list_checkpoints(url)] == [(2, None),
                                                                              (3, None)]
    elif op == "verify":
        report = dckpt.verify(url, all_steps=True)
        assert report.ok and report.steps == (2, 3), report.problems
    else:
        with pytest.raises(dckpt.CheckpointNotFoundError, match="deleted while it was verif"):
            dckpt.verify(url, step=1)
    assert raced
    monkeypatch.undo()
    for k in (2, 3):
        _assert_same(_load(url, k, states[k]), states[k])
    assert dckpt.verify(url, all_steps=True).ok


def test_health_racing_a_delete_does_not_count_the_deleted_as_unrecoverable(tmp_path,
                                                                            monkeypatch):
    """Steps 3 and 2 lost their data; step 1 is deleted (a job's retention) while health
    reads it: it was listed as unrecoverable, "no committed checkpoint for step 1"."""
    from dckpt.storage import Store

    url, repo = str(tmp_path / "repo"), tmp_path / "repo"
    for k in (1, 2, 3):
        dckpt.save(dict(_state(k), step=k), url, step=k)
    for k in (2, 3):
        for b in dckpt.inspect(url, step=k).refs():
            (repo / b.segment).unlink(missing_ok=True)
    read_bytes, reads, raced = Store.read_bytes, [], []

    def read_racing(self, name: str) -> bytes:
        if name == "manifests/000000000001.json" and not raced:
            reads.append(name)
            if len(reads) == 2:  # health's own read, after the listing's
                raced.append(name)
                dckpt.delete(url, step=1)
        return read_bytes(self, name)

    monkeypatch.setattr(Store, "read_bytes", read_racing)
    report = dckpt.health(url)
    assert raced and report.recoverable_step is None
    assert [s for s, _ in report.unrecoverable] == [3, 2], report.unrecoverable


def _slow_save_in_thread(url: str, state: dict, step: int, out: dict) -> threading.Thread:
    def save() -> None:
        try:
            out["info"] = dckpt.save(state, url, step=step)
        except dckpt.CommitError as e:
            out["error"] = e

    t = threading.Thread(target=save)
    t.start()
    return t


def test_deleting_the_base_of_a_save_in_flight_keeps_its_blocks_for_the_grace(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    base = _state(1)
    dckpt.save(base, url, step=1)
    changed = dict(base, t0=base["t0"] + 1)  # the rest references step 1's blocks
    out: dict = {}
    arm("slow", delay_s=0.5)
    try:
        t = _slow_save_in_thread(url, changed, 2, out)
        deadline = time.monotonic() + 30  # past the plan, which references step 1's blocks
        while (not list((tmp_path / "repo" / "data").glob("s2-*/r00000-*.seg"))
               and time.monotonic() < deadline):
            time.sleep(0.005)
        dckpt.delete(url, step=1)
        report = dckpt.gc(url, min_age_s=1.5)
        t.join(60)
    finally:
        disarm()
    assert report.deleted == () and report.live_checkpoints == (1,)  # the tombstone's
    assert out["info"].step == 2
    _assert_same(_load(url, 2, changed), changed)


def test_a_save_whose_referenced_objects_vanished_does_not_commit(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    base = _state(1)
    dckpt.save(base, url, step=1)
    [segment] = dckpt.inspect(url).segments()
    changed = dict(base, t0=base["t0"] + 1)
    out: dict = {}
    arm("slow", delay_s=0.5)
    try:
        t = _slow_save_in_thread(url, changed, 2, out)
        # past the plan (the base was sound then), into the writes, each of which waits
        # 0.5 s first: as soon as the save's segment exists (a fixed sleep raced the save on
        # a loaded machine)
        deadline = time.monotonic() + 30
        while (not list((tmp_path / "repo" / "data").glob("s2-*/r00000-*.seg"))
               and time.monotonic() < deadline):
            time.sleep(0.005)
        os.remove(tmp_path / "repo" / segment)  # what a gc with too short a grace would do
        t.join(60)
    finally:
        disarm()
    assert "missing or short" in str(out["error"]) and "a gc whose min_age_s" in str(out["error"])
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1]


def test_a_corrupted_block_shared_by_several_checkpoints_is_reported_by_each(tmp_path):
    url = str(tmp_path / "repo")
    frozen = torch.randn(BLOCK)  # 4 blocks, in every checkpoint
    config = SaveConfig(block_size_bytes=BLOCK, writer_threads=1)
    for step in (1, 2, 3):
        dckpt.save({"frozen": frozen, "moving": torch.full((100,), float(step))}, url,
                   step=step, config=config)
    m = dckpt.inspect(url, step=3)
    ref = m.items["frozen"].chunks[0].data.blocks[1]
    assert all(dckpt.inspect(url, step=s).items["frozen"].chunks[0].data.blocks[1] == ref
               for s in (1, 2))
    path = tmp_path / "repo" / ref.segment
    raw = bytearray(path.read_bytes())
    raw[ref.offset + 7] ^= 0xFF
    path.write_bytes(bytes(raw))
    report = dckpt.verify(url, all_steps=True)
    assert sorted({p.step for p in report.problems}) == [1, 2, 3]
    assert all(p.item == "frozen" for p in report.problems)
    for step in (1, 2, 3):
        with pytest.raises(dckpt.IntegrityError, match="frozen"):
            dckpt.load({"frozen": torch.zeros(BLOCK), "moving": torch.zeros(100)}, url,
                       step=step)


def test_compression_splits_floats_into_byte_planes_and_leaves_noise_raw(tmp_path):
    url = str(tmp_path / "repo")
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(200_000, generator=g) * 0.02).bfloat16()  # narrow exponents
    noise = torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=g)
    state = {"w": weights, "noise": noise, "zeros": torch.zeros(50_000)}
    info = dckpt.save(state, url, step=1, config=SaveConfig(compression="on"))
    m = dckpt.inspect(url)
    codecs = {k: {b.codec for c in m.items[k].chunks for b in c.data.blocks} for k in state}
    assert codecs == {"w": {"zstd-planes-2"}, "noise": {"raw"}, "zeros": {"zstd-planes-4"}}
    w_stored = sum(b.length for b in m.items["w"].chunks[0].data.blocks)
    assert w_stored < 0.8 * weights.numel() * 2  # the exponent plane shrinks
    assert info.bytes_written < info.bytes_logical
    _assert_same(_load(url, 1, state), state)
    assert dckpt.verify(url).bytes_checked == info.bytes_logical
    off = dckpt.save(dict(state, zeros=torch.ones(50_000)), url, step=2,
                     config=SaveConfig(compression="off", dedup=False))
    assert off.bytes_written == off.bytes_logical


def test_a_damaged_compressed_block_is_an_integrity_error(tmp_path):
    url = str(tmp_path / "repo")
    state = {"z": torch.zeros(100_000)}
    dckpt.save(state, url, step=1, config=SaveConfig(compression="on"))
    ref = dckpt.inspect(url).items["z"].chunks[0].data.blocks[0]
    path = tmp_path / "repo" / ref.segment
    raw = bytearray(path.read_bytes())
    raw[ref.offset + ref.length // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(dckpt.IntegrityError, match="'z'"):
        dckpt.load({"z": torch.ones(100_000)}, url, step=1)
    assert not dckpt.verify(url).ok


def _read_safetensors(path: str) -> tuple[dict, dict]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    meta = header.pop("__metadata__")
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(raw[8 + n + a: 8 + n + b]),
                                  dtype=names[v["dtype"]]).reshape(v["shape"])
    return out, meta


@pytest.mark.parametrize("compression", ["on", "off"])
def test_export_round_trips_in_every_format(tmp_path, compression):
    url = str(tmp_path / "repo")
    config = SaveConfig(block_size_bytes=BLOCK, compression=compression)
    state = _state(3)
    dckpt.save(state, url, step=1, config=config)
    state["t0"] += 1
    state["step"] = 2
    dckpt.save(state, url, step=2, config=config)  # references step 1's blocks

    copy = str(tmp_path / "copy")
    dckpt.export(url, copy, step=2, format="dckpt")
    assert [i.step for i in dckpt.list_checkpoints(copy)] == [2]
    assert dckpt.verify(copy).ok
    _assert_same(_load(copy, 2, state), state)  # self-contained: nothing from the source

    pt = str(tmp_path / "state.pt")
    dckpt.export(url, pt, step=2, format="torch")
    loaded = torch.load(pt, weights_only=True)
    _assert_same(loaded, state)

    st = str(tmp_path / "state.safetensors")
    dckpt.export(url, st, step=2, format="safetensors")
    tensors, meta = _read_safetensors(st)
    _assert_same(tensors, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert json.loads(meta["step"]) == 2 and meta["dckpt.step"] == "2"


def test_every_dtype_exports_to_safetensors_or_is_refused_naming_the_way(tmp_path):
    """safetensors' own loader reads back every dtype it names (the fnuz float8s and
    complex64 were refused); the others are refused before anything is written."""
    from safetensors.torch import load_file

    from dckpt.export import _SAFETENSORS_DTYPES
    from dckpt.manifest import DTYPE_SIZES

    url = str(tmp_path / "repo")
    g = torch.Generator().manual_seed(1)
    state = {name: torch.randint(0, 2 if name == "bool" else 256, (3, 4 * DTYPE_SIZES[name]),
                                 dtype=torch.uint8, generator=g).view(getattr(torch, name))
             for name in DTYPE_SIZES}
    dckpt.save(state, url, step=1)
    named = {k: v for k, v in state.items() if k in _SAFETENSORS_DTYPES}
    assert set(state) - set(named) == {"complex128", "complex32", "float8_e8m0fnu",
                                       "float4_e2m1fn_x2"}
    refused = str(tmp_path / "refused.safetensors")
    with pytest.raises(dckpt.StateDictError, match="no safetensors name; export --format torch"):
        dckpt.export(url, refused, format="safetensors")
    assert not os.path.exists(refused)
    dckpt.save(named, url, step=2)
    out = str(tmp_path / "all.safetensors")
    dckpt.export(url, out, step=2, format="safetensors")
    back = load_file(out)
    assert {k: t.dtype for k, t in back.items()} == {k: t.dtype for k, t in named.items()}
    assert all(torch.equal(back[k].view(torch.uint8), t.view(torch.uint8))
               for k, t in named.items())


def test_export_of_a_sharded_checkpoint_assembles_the_full_tensor(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata  # noqa: F401
    url = str(tmp_path / "repo")
    full = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    dckpt.save({"m": {"w": full}}, url, step=1)
    pt = str(tmp_path / "m.pt")
    dckpt.export(url, pt, format="torch")
    assert torch.equal(torch.load(pt, weights_only=True)["m"]["w"], full)


def test_cli_delete_gc_and_export(tmp_path, capsys):
    url = str(tmp_path / "repo")
    _chain(url, saves=3)
    assert cli(["delete", url, "--step", "1"]) == 0
    assert "deleted step 1" in capsys.readouterr().out
    assert cli(["gc", url, "--dry-run", "--min-age", "0", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and 1 not in dry["live_checkpoints"]
    assert cli(["gc", url, "--min-age", "0"]) == 0
    assert "removed" in capsys.readouterr().out
    out = tmp_path / "s.pt"
    assert cli(["export", url, "--step", "3", "--to", str(out), "--format", "torch"]) == 0
    assert out.exists()
    assert cli(["export", url, "--step", "9", "--to", str(out)]) == 2
    assert "step 9" in capsys.readouterr().err


def test_a_sparsely_updated_table_moves_to_small_blocks_and_a_dense_one_does_not(tmp_path):
    url = str(tmp_path / "repo")
    # no fragmentation bound: the table's 8 changed blocks in 16 would have it rewritten
    config = SaveConfig(block_size_bytes=64 << 10, sparse_block_size_bytes=4 << 10,
                        min_read_run_bytes=None)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4096, 64, generator=g)  # 1 MiB, 256-byte rows
    dense = torch.randn(4096, 64, generator=g)
    written, snapshots = [], {}
    for step in range(1, 6):
        if step > 1:
            rows = torch.randperm(4096, generator=g)[:8]  # 8 rows: 8 of 16 big blocks at most
            table[rows] += 1
            dense += 1
        info = dckpt.save({"table": table, "dense": dense}, url, step=step, config=config)
        snapshots[step] = (table.clone(), dense.clone())
        written.append(info.bytes_written - dense.numel() * 4)  # the table's share
    sizes = {k: {b.raw_length for b in dckpt.inspect(url, step=5).items[k].chunks[0].data.blocks}
             for k in ("table", "dense")}
    assert sizes == {"table": {4 << 10}, "dense": {64 << 10}}
    assert written[1] < 0.7 * (1 << 20)  # 64 KiB blocks: about half the table
    assert written[2] >= 1 << 20  # the move to 4 KiB blocks writes it once more
    assert written[3] <= 8 * (4 << 10) and written[4] <= 8 * (4 << 10)  # then only the rows
    for step, (t, d) in snapshots.items():
        out = {"table": torch.zeros(4096, 64), "dense": torch.zeros(4096, 64)}
        dckpt.load(out, url, step=step)
        assert torch.equal(out["table"], t) and torch.equal(out["dense"], d)
    # a new process (no memory of the last save) restores, and keeps the small blocks
    # from the manifest
    from dckpt import dedup
    dedup.forget()
    dckpt.load({"table": torch.zeros(4096, 64), "dense": torch.zeros(4096, 64)}, url)
    table[0] += 1
    info = dckpt.save({"table": table, "dense": dense}, url, step=6, config=config)
    assert info.bytes_written - dense.numel() * 4 <= 4 << 10


@pytest.mark.parametrize("fmt", ["dckpt", "torch", "safetensors"])
def test_export_refuses_a_damaged_checkpoint(tmp_path, fmt):
    url = str(tmp_path / "repo")
    dckpt.save({"w": torch.randn(70_000)}, url, step=1)
    ref = dckpt.inspect(url).items["w"].chunks[0].data.blocks[0]
    path = tmp_path / "repo" / ref.segment
    raw = bytearray(path.read_bytes())
    raw[ref.offset + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(dckpt.IntegrityError, match="'w'"):
        dckpt.export(url, str(tmp_path / "out"), format=fmt)


def _content(size: int, kind: int) -> bytes:
    if kind == 0:
        return bytes(size)
    if kind == 1:  # noise: stored raw
        return numpy.random.default_rng(size).bytes(size)
    if kind == 2:  # the same bytes as another item of this size
        return b"\x01" * size
    return numpy.arange(size // 4, dtype=numpy.float32).tobytes()  # compressible


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.tuples(st.integers(0, 3 * 1024 + 2).map(lambda n: 4 * n),
                                st.integers(0, 3)), min_size=1, max_size=12),
       compress=st.booleans(), indexed=st.booleans())
def test_the_one_block_path_stores_an_item_as_the_general_path(items, compress, indexed):
    """SegmentOut.append stores an item of one block on a path of its own: the bytes, the
    block references, the counters and the index it leaves are the general path's."""
    import io

    from dckpt.dedup import BlockIndex
    from dckpt.segments import SegmentOut

    seen = []
    for general in (False, True):
        index = BlockIndex(None) if indexed else None
        f = io.BytesIO()
        out = SegmentOut(f, "seg", 4096, index=index, compress=compress)
        refs, changed = [], []
        for size, kind in items:
            buf = memoryview(_content(size, kind))
            refs.append(out._blocks(buf, 4, 4096, 1 << 18) if general
                        else out.append(buf, planes=4, min_run_bytes=1 << 18))
            changed.append(out.changed)
        seen.append((refs, changed, f.getvalue(), out.offset, out.written, out.raw_written,
                     out.new_blocks, sorted(index._refs.items()) if index else None))
    assert seen[0] == seen[1]
    assert any(len(r) == 1 for r in seen[0][0]) or all(n == 0 or n > 4096 for n, _ in items)


def test_an_index_read_from_a_manifest_holds_the_blocks_of_the_items_asked_for(tmp_path):
    """After a restore, a rank indexes the base's blocks of the items it is about to write
    (their key and offsets), not every rank's; the next save still writes only what
    changed, and loads back."""
    from dckpt.dedup import BlockIndex, forget

    url = str(tmp_path / "repo")
    cfg = SaveConfig(block_size_bytes=4096, compression="off", sparse_block_size_bytes=None,
                     min_read_run_bytes=None)  # no item rewritten whole for its runs
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(4096, generator=g), "b": torch.randn(3000, generator=g),
             "meta": {"epoch": 1}}
    dckpt.save(state, url, step=1, config=cfg)
    m = dckpt.inspect(url)
    a, b = m.items["a"].chunks[0].data.blocks, m.items["b"].chunks[0].data.blocks
    some = BlockIndex.of_manifest(m, {"a@0"})
    assert len(some) == 4 and all(some.get(x.digest, x.raw_length) == x for x in a)
    assert all(some.get(x.digest, x.raw_length) is None for x in b)
    assert some.history == {"a@0": (4096, None)}
    every = BlockIndex.of_manifest(m)
    assert len(every) == 4 + 3 + 1 and set(every.history) == {"a@0", "b@0"}
    forget()  # a restarted job
    out = {"a": torch.zeros(4096), "b": torch.zeros(3000), "meta": {"epoch": 0}}
    dckpt.load(out, url)
    state["b"][:10] += 1  # one block of b changes
    info = dckpt.save(state, url, step=2, config=cfg)
    assert info.bytes_written == 4096  # b's first block; a and the value found
    forget()
    back = {"a": torch.zeros(4096), "b": torch.zeros(3000), "meta": {"epoch": 0}}
    dckpt.load(back, url, step=2)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])


def _data_objects(url: str, options: dict | None, step: int) -> dict[str, int]:
    from dckpt.storage import Store

    store = Store(url, options)
    return {f"{a}/{n}": size for a in store.list_names("data") if a.startswith(f"s{step}-")
            for n, size in store.list_sizes(f"data/{a}").items()}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_writer_with_nothing_new_creates_no_object(repo, mode, monkeypatch):
    """A differential save of unchanged (or frozen) tensors made an empty segment per writer
    thread and rank, which gc then deleted: on S3 a request each way."""
    import dckpt.writer

    monkeypatch.setattr(dckpt.writer, "segments_for", lambda total, threads: threads)  # not
    url, options = repo  # one per 64 MiB: four writers for a small state
    g = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(64 << 10, generator=g) for i in range(8)}
    config = dckpt.SaveConfig(writer_threads=4)

    def save(step: int) -> None:
        if mode == "sync":
            dckpt.save(state, url, step=step, storage_options=options, config=config)
        else:
            dckpt.async_save(state, url, step=step, storage_options=options,
                             config=config).wait(timeout=60)

    save(1)
    assert len(_data_objects(url, options, 1)) == 4
    save(2)  # nothing changed
    assert _data_objects(url, options, 2) == {}
    before = dict(state)
    state["t5"] = state["t5"] + 1  # one writer has a tensor that changed
    save(3)
    made = _data_objects(url, options, 3)
    assert len(made) == 1 and all(size > 0 for size in made.values()), made
    for step in (2, 3):
        out = {k: torch.empty_like(v) for k, v in state.items()}
        dckpt.load(out, url, step=step, storage_options=options)
        want = before if step == 2 else state
        assert all(torch.equal(out[k], want[k]) for k in state)
    assert dckpt.verify(url, storage_options=options).ok
    assert dckpt.gc(url, min_age_s=0, storage_options=options).deleted == ()

"""The parts of ``dckpt bench`` that decide what its figures mean: how much of the state each
workload changes, the bit-equality check of a restore, and the ratios and targets of the
report."""

from __future__ import annotations

import json

import pytest
import torch

from dckpt.bench.report import Report, Result
from dckpt.bench.workload import Workload


def build(kind: str, dtype: str = "fp32", mib: float = 4) -> Workload:
    return Workload.build(gib_per_rank=mib / 1024, tensor_mib=0.25, layout="dense", dtype=dtype,
                          kind=kind, device="cpu", mesh=None)


def changed_fraction(w: Workload, step: int) -> float:
    before = [t.clone() for t in w.local(w.state)]
    w.change(step)
    changed = sum(int((a != b).sum()) for a, b in zip(before, w.local(w.state)))
    return changed / sum(t.numel() for t in before)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_state_has_the_size_and_dtype_asked(dtype):
    w = build("full", dtype)
    tensors = w.local(w.state)
    assert len(tensors) == 16 and {t.dtype for t in tensors} == {getattr(torch, {
        "fp32": "float32", "bf16": "bfloat16"}[dtype])}
    assert w.checkpoint_bytes == sum(t.numel() * t.element_size() for t in tensors) == 4 << 20


def test_each_workload_changes_what_it_says():
    assert changed_fraction(build("full"), 1) == 1.0
    w = build("unchanged90", mib=10)  # 40 tensors: 4 change per save, a different 4 each time
    first = [t.clone() for t in w.local(w.state)]
    assert changed_fraction(w, 1) == pytest.approx(0.1)
    assert changed_fraction(w, 2) == pytest.approx(0.1)
    assert sum(not torch.equal(a, b) for a, b in zip(first, w.local(w.state))) == 8
    sparse = build("sparse-rows")
    assert sparse.local(sparse.state)[0].shape[1] * 4 == 512  # rows of 512 bytes
    fraction = changed_fraction(sparse, 1)
    assert 0.005 < fraction <= 0.01  # 1% of the rows drawn, a few drawn twice
    rows_touched = [int((t != 0).any(dim=1).sum()) for t in sparse.local(sparse.state)]
    assert min(rows_touched) > 0  # every tensor gets some


def test_equal_sees_a_single_flipped_bit_and_the_step():
    w = build("full")
    w.scramble()
    assert not w.equal()
    for src, dst in zip(w.local(w.state), w.local(w.target)):
        dst.copy_(src)
    w.target["step"] = w.state["step"]
    assert w.equal()
    w.local(w.target)[3].view(torch.int32).view(-1)[17] ^= 1
    assert not w.equal()
    assert w.equal([k for k in w.state if k not in ("step", "layer3.weight")])
    w.target["step"] = 99
    assert not w.equal(["layer0.weight"]) and w.equal(["layer0.weight"], step=False)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        Workload.build(gib_per_rank=0, tensor_mib=1, layout="dense", dtype="fp32", kind="full",
                       device="cpu", mesh=None)
    with pytest.raises(ValueError):
        Workload.build(gib_per_rank=1, tensor_mib=1, layout="tiled", dtype="fp32", kind="full",
                       device="cpu", mesh=None)


def report_of(figures: dict[tuple[str, str], float]) -> Report:
    run = {"world_size": 2, "gib_per_rank": 1, "layout": "sharded", "dtype": "fp32",
           "workload": "full", "storage": "local files"}
    r = Report(run)
    for (method, phase), seconds in figures.items():
        r.add(Result(method, phase, seconds=[seconds * 3, seconds, seconds / 3],
                     bytes=0 if phase == "pause" else 2_000_000_000, equal=True))
    return r


def test_ratios_compare_dckpt_with_the_limits_and_peers(tmp_path):
    r = report_of({("raw", "save"): 1.0, ("raw", "restore"): 1.0, ("memcpy", "pause"): 0.2,
                   ("dckpt", "save"): 1.25, ("dckpt", "restore"): 0.8, ("dckpt", "pause"): 0.3,
                   ("dckpt", "commit"): 1.0, ("DCP", "save"): 2.5, ("DCP", "restore"): 1.0,
                   ("DCP", "pause"): 0.6, ("DCP", "commit"): 2.0})
    ratios = r.ratios()
    assert ratios["save / raw write"] == pytest.approx(0.8)  # GB/s: raw's time / dckpt's
    assert ratios["restore / raw read"] == pytest.approx(1.25)
    assert ratios["pause / memcpy"] == pytest.approx(1.5)  # seconds: dckpt's / memcpy's
    assert ratios["pause / DCP pause"] == pytest.approx(0.5)
    assert ratios["commit / DCP async commit"] == pytest.approx(2.0)
    assert not [k for k in ratios if "torch-checkpointing" in k]  # no figure, no ratio
    table = r.table()
    assert "save / raw write" in table and "MISSED" in table and "met" in table
    r.notes["torch-checkpointing"] = "not installed"
    paths = r.write(str(tmp_path))
    with open(paths[0]) as f:
        lines = [json.loads(x) for x in f]
    assert lines[0]["record"] == "run" and lines[-1]["record"] == "ratios"
    assert {"record": "note", "method": "torch-checkpointing", "note": "not installed"} in lines
    gbps = {(x["method"], x["phase"]): x.get("gbps") for x in lines if x["record"] == "result"}
    assert gbps[("dckpt", "save")] == pytest.approx(1.6) and gbps[("memcpy", "pause")] is None


def test_a_restore_that_gave_wrong_values_is_marked_in_the_table():
    r = report_of({("dckpt", "restore"): 1.0})
    r.results[("dckpt", "restore")].equal = False
    assert "WRONG" in r.table()


@pytest.mark.parametrize("gib, ranks, on_gpu, names, memory_gib, says", [
    (1, 1, False, "raw,memcpy,dckpt,DCP,torch-checkpointing", 7, None),  # 6.5 GiB
    (1, 1, False, "raw,memcpy,dckpt,DCP,torch-checkpointing", 6, "host memory"),
    (1, 8, False, "dckpt", 25, "8 rank(s) x 3 copies"),  # the state, its twin, the staging
    (1, 8, True, "dckpt", 13, None),  # the state and its twin on the GPUs: 12 GiB on the host
    (1, 8, True, "memcpy,dckpt,DCP", 20, "8 rank(s) x 3 copies"),  # pinned stagings, and the copy
    (1, 2, False, "memcpy", 6, None),  # nothing stored
    (30, 1, False, "dckpt,DCP", 1e6, "free at"),  # 90 GiB: more than the disk holds
])
def test_a_run_the_node_cannot_hold_is_refused_saying_what_it_needs(
        monkeypatch, tmp_path, gib, ranks, on_gpu, names, memory_gib, says):
    import argparse
    import shutil

    from dckpt.bench import options

    monkeypatch.setattr(options, "available_memory", lambda: int(memory_gib * options.GIB))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        100 * options.GIB, 20 * options.GIB, 80 * options.GIB))
    args = argparse.Namespace(gib_per_rank=gib, layout="sharded")
    problem = options.room(args, names.split(","), local_world=ranks, on_gpu=on_gpu,
                           local_root=str(tmp_path / "not" / "made" / "yet"))
    assert (problem is None) if says is None else says in problem, problem
    assert not (tmp_path / "not").exists()


def test_the_memory_a_process_may_take_is_known_here():
    from dckpt.bench.options import GIB, available_memory

    have = available_memory()
    assert have is not None and 0 < have < 1 << 50 and have > GIB // 4


def test_the_run_says_how_dckpts_sync_saves_write_to_this_storage(tmp_path, monkeypatch):
    from dckpt import writer
    from dckpt.bench.run import sync_saves
    from dckpt.direct import WINDOWS
    from dckpt.storage import Store

    store = Store(str(tmp_path))
    monkeypatch.setattr(writer, "tensors_on_huge_pages", lambda: False)
    monkeypatch.setattr(WINDOWS, "lies_well", lambda nbytes: True)
    monkeypatch.setattr(writer, "pages_cap_requests", lambda root: root == str(tmp_path))
    assert sync_saves(store) == ("O_DIRECT, copied through 16 MiB windows on huge pages "
                                 "(this disk takes scattered pages slowly)")
    monkeypatch.setattr(writer, "pages_cap_requests", lambda root: False)
    assert sync_saves(store) == "O_DIRECT, straight from the tensors' memory"
    monkeypatch.setattr(Store, "direct_capable", property(lambda self: False))
    assert sync_saves(store) == "buffered, then fsync'd"
    store.local = False
    assert sync_saves(store) == "to the object store"

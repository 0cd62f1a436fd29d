"""The pure decisions of the edge and plug-in modules, each tested with a table: error
translation (dist), the agreement's schedule (dist), block size choice (dedup), write
balancing (segments), the staging budget (staging), read-once replicated state (reader),
export unflattening (export) and the gc grace period (retention)."""

from __future__ import annotations

import traceback
from enum import IntEnum

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dckpt
from dckpt import dist
from dckpt.dedup import block_size_for
from dckpt.errors import headline
from dckpt.export import unflatten
from dckpt.manifest import ChunkEntry, StoredData
from dckpt.read_plan import Shared, share_replicated
from dckpt.retention import gc_min_age_s
from dckpt.segments import balance, segments_for
from dckpt.staging import aligned, fit

# ---------------------------------------------------------------- dist.translate


def _failures(**errors: BaseException) -> CheckpointException:
    wrapped = {int(r[1:]): (e, traceback.StackSummary()) for r, e in errors.items()}
    return CheckpointException("boom", wrapped)


def _payload_error() -> Exception:
    from aiohttp import ClientPayloadError

    return ClientPayloadError("Response payload is not completed")


@pytest.mark.parametrize("errors, saving, cls", [
    # saves: always CommitError, unless every rank found the step committed
    ({"r0": OSError("disk full")}, True, dckpt.CommitError),
    ({"r1": dckpt.IntegrityError("bad")}, True, dckpt.CommitError),
    ({"r0": dckpt.CheckpointExistsError("x"), "r1": dckpt.CheckpointExistsError("x")}, True,
     dckpt.CheckpointExistsError),
    ({"r0": dckpt.CheckpointExistsError("x"), "r1": OSError("y")}, True, dckpt.CommitError),
    # a state dict refused by every failing rank: a CommitError and a StateDictError both
    ({"r1": dckpt.StateDictError("s")}, True, dckpt.UnsavableStateError),
    ({"r0": dckpt.StateDictError("s"), "r1": OSError("y")}, True, dckpt.CommitError),
    # loads: the failing ranks' class when they agree; IntegrityError for integrity kinds
    ({"r0": dckpt.StateDictError("keys")}, False, dckpt.StateDictError),
    ({"r0": dckpt.FormatError("f"), "r1": dckpt.FormatError("f")}, False, dckpt.FormatError),
    ({"r0": dckpt.FormatError("f"), "r1": dckpt.IntegrityError("i")}, False,
     dckpt.IntegrityError),
    ({"r0": OSError("net"), "r1": dckpt.IntegrityError("i")}, False, dckpt.DckptError),
    # the storage's own errors, an OSError or a storage library's (a response cut short)
    ({"r0": OSError("net"), "r1": ConnectionResetError("reset")}, False, dckpt.StorageError),
    ({"r1": _payload_error()}, False, dckpt.StorageError),
    ({"r2": RuntimeError("x")}, False, dckpt.DckptError),
])
def test_one_error_for_a_collective_failure(errors, saving, cls):
    err = dist.translate(_failures(**errors), what="the thing", saving=saving)
    assert type(err) is cls
    ranks = sorted(int(r[1:]) for r in errors)
    assert list(err.failures) == ranks  # every failing rank's message, in rank order
    assert err.message.startswith(f"the thing failed on rank {', '.join(map(str, ranks))}: ")


def test_a_failure_whose_first_line_announces_a_list_keeps_the_first_item():
    problems = dckpt.StateDictError("the state dict cannot be saved (1 problem):\n"
                                    "  - w: layout torch.sparse_coo is not supported")
    err = dist.translate(_failures(r1=problems), what="save", saving=True)
    assert err.message == ("save failed on rank 1: the state dict cannot be saved (1 problem): "
                           "- w: layout torch.sparse_coo is not supported")
    assert headline("one\ntwo") == "one" and headline("\n  \n") == ""


@pytest.mark.parametrize("ranks, text", [
    ([3], "rank 3"), ([0, 1], "ranks 0-1"), ([0, 2, 3, 4, 7], "ranks 0, 2-4, 7")])
def test_ranks_are_named_in_runs(ranks, text):
    assert dist.ranks_text(ranks) == text


def test_values_are_named_with_the_ranks_that_hold_them_at_any_world_size():
    assert dist.by_value([5, 5, 6]) == "5 on ranks 0-1; 6 on rank 2"
    assert dist.by_value([7] * 63 + [8]) == "7 on ranks 0-62; 8 on rank 63"  # one line
    assert dist.by_value(["a", None, "a"]) == "a on ranks 0, 2; None on rank 1"


def test_a_permission_error_names_the_credentials():
    err = dist.translate(_failures(r0=PermissionError("Forbidden")), what="save",
                         saving=True)
    assert "credentials" in err.failures[0]


@pytest.mark.parametrize("interval_s, per_call_s, calls", [
    (0.5, 0.0, 1),          # not timed yet: every call
    (0.5, 1.0, 1),          # slower calls than the interval: every call
    (0.5, 0.01, 50),
    (0.5, 0.002, 250),
    (0.5, 1e-9, 10_000),    # capped
    (0.0, 0.01, 1),
])
def test_the_agreement_exchanges_about_every_interval(interval_s, per_call_s, calls):
    assert dist.calls_between(interval_s, per_call_s) == calls

# ---------------------------------------------------------------- dedup.block_size_for


KiB = 1 << 10


@pytest.mark.parametrize("history, nbytes, sparse, size", [
    ({}, 100 << 20, 32 * KiB, 256 * KiB),                       # never saved: the default
    ({"k": (256 * KiB, 0.05)}, 100 << 20, 32 * KiB, 32 * KiB),  # sparse updates: small blocks
    ({"k": (256 * KiB, 0.95)}, 100 << 20, 32 * KiB, 256 * KiB),  # dense: stays large
    ({"k": (32 * KiB, 0.95)}, 100 << 20, 32 * KiB, 256 * KiB),  # turned dense: back to large
    ({"k": (32 * KiB, 0.0)}, 100 << 20, 32 * KiB, 32 * KiB),    # unchanged: keeps its size
    ({"k": (32 * KiB, None)}, 100 << 20, 32 * KiB, 32 * KiB),   # size only (a manifest)
    ({"k": (256 * KiB, 0.05)}, 1 << 20, 32 * KiB, 256 * KiB),   # under 16 blocks: default
    ({"k": (256 * KiB, 0.05)}, 100 << 20, None, 256 * KiB),     # no sparse size configured
    ({"k": (256 * KiB, 0.05)}, 100 << 20, 256 * KiB, 256 * KiB),  # "sparse" not smaller
])
def test_block_size_follows_how_the_item_changed(history, nbytes, sparse, size):
    assert block_size_for(history, "k", nbytes, 256 * KiB, sparse) == size

# ---------------------------------------------------------------- segments


@pytest.mark.parametrize("sizes, bins, want", [
    ([], 4, []),
    ([10], 4, [[0]]),
    ([1, 5, 3, 4], 2, [[1, 0], [3, 2]]),   # 5+1 against 4+3
    ([8, 1, 1, 1, 1], 2, [[0], [1, 2, 3, 4]]),
    ([2, 2, 2], 5, [[0], [1], [2]]),       # empty bins dropped
])
def test_writes_are_balanced_largest_first_into_the_lightest_segment(sizes, bins, want):
    assert balance(sizes, bins) == want


@pytest.mark.parametrize("total, threads, segments", [
    (0, 4, 1), (1, 4, 1), (64 << 20, 4, 1), ((64 << 20) + 1, 4, 2), (10 << 30, 4, 4),
    (10 << 30, 1, 1),
])
def test_one_segment_per_thread_but_not_under_64_mib_each(total, threads, segments):
    assert segments_for(total, threads) == segments

# ---------------------------------------------------------------- staging.fit


MiB = 1 << 20


@pytest.mark.parametrize("sizes, budget, fits, window", [
    ([MiB, MiB], None, [0, 1], 0),                 # no budget: everything is staged
    ([MiB, MiB], 2 * MiB, [0, 1], 0),              # fits exactly
    ([MiB, 100], 2 * MiB, [0, 1], 0),
    ([4 * MiB, MiB, MiB], 4 * MiB, [1, 2], MiB),   # a quarter of the budget is the window
    ([10 * MiB], 2 * MiB, [], 512 * 1024),
    ([MiB] * 10, 1024 * MiB, list(range(10)), 0),
    ([300 * MiB, 600 * MiB], 800 * MiB, [0], 64 * MiB),  # window capped at 64 MiB; in order
    ([100, 100], 8192, [0, 1], 0),                 # slots are 4096-aligned: 8192 holds two
    ([100, 100, 100], 8192, [0], 4096),            # one block of window leaves one slot
])
def test_the_staging_budget_holds_what_fits_and_windows_the_rest(sizes, budget, fits, window):
    block = 4096 if budget is not None and budget < MiB else 256 * 1024
    got_fits, got_window = fit(sizes, budget, block)
    assert (got_fits, got_window) == (fits, window)
    if budget is not None:
        assert sum(aligned(sizes[k]) for k in got_fits) + got_window <= budget

# ------------------------------------------------------------- read_plan.share_replicated


def _item(fqn: str, lengths: list[int], offsets: list[int] | None = None) -> ReadItem:
    offsets = offsets or [0] * len(lengths)
    return ReadItem(LoadItemType.TENSOR, MetadataIndex(fqn, [0] * len(lengths)), offsets,
                    MetadataIndex(fqn, [0] * len(lengths)), [0] * len(lengths), lengths)


def _chunk(sizes: tuple[int, ...], nbytes: int) -> tuple[str, ChunkEntry]:
    return "tensor", ChunkEntry((0,) * len(sizes), sizes, StoredData(nbytes, ()))


def test_replicated_boxes_are_read_once_and_spread_by_bytes():
    storage = {MetadataIndex(k, [0]): _chunk((n,), n * 4)
               for k, n in (("big", 1000), ("mid", 600), ("small", 300), ("own", 10))}
    plans = [LoadPlan([_item("big", [1000]), _item("mid", [600]), _item("small", [300]),
                       _item("own", [5], [r * 5])]) for r in range(2)]
    out = share_replicated(plans, storage)
    owners = {s.index.fqn: s.owner for s in out[0].storage_data}
    assert owners == {"big": 0, "mid": 1, "small": 1}  # largest first, to the lightest rank
    assert [s.index.fqn for s in out[0].storage_data] == ["big", "mid", "small"]
    assert all(isinstance(s, Shared) for p in out for s in p.storage_data)
    read = [{i.storage_index.fqn for i in p.items} for p in out]
    assert read == [{"big", "own"}, {"mid", "small", "own"}]  # partial boxes stay per rank


def test_nothing_is_shared_when_a_rank_reads_part_of_a_box():
    storage = {MetadataIndex("w", [0]): _chunk((100,), 400)}
    plans = [LoadPlan([_item("w", [100])]), LoadPlan([_item("w", [50])])]
    assert share_replicated(plans, storage) == plans

# ---------------------------------------------------------------- export.unflatten


@pytest.mark.parametrize("flat, planner_data, nested", [
    ({"a": 1}, None, {"a": 1}),
    ({"a.b": 1, "a.c": 2}, {"a.b": ["a", "b"], "a.c": ["a", "c"]}, {"a": {"b": 1, "c": 2}}),
    ({"o.s.0": 5, "o.s.1": 6}, {"o.s.0": ["o", "s", 0], "o.s.1": ["o", "s", 1]},
     {"o": {"s": [5, 6]}}),
    ({"l.1.x": 7}, {"l.1.x": ["l", 1, "x"]}, {"l": [None, {"x": 7}]}),
    ({"k": 1, "p.q": 2}, {"p.q": ["p", "q"]}, {"k": 1, "p": {"q": 2}}),  # keys without a path
])
def test_export_rebuilds_the_nested_state_dict(flat, planner_data, nested):
    assert unflatten(flat, planner_data) == nested


def test_export_unflattens_a_real_optimizer_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    url = str(tmp_path / "r")
    dckpt.save({"optim": opt.state_dict()}, url, step=1)
    dckpt.export(url, str(tmp_path / "out.pt"), step=1, format="torch")
    back = torch.load(tmp_path / "out.pt", weights_only=True)["optim"]
    assert back["param_groups"] == opt.state_dict()["param_groups"]
    # DCP's flattening records dict keys as strings: the parameter ids come back as "0"
    assert torch.equal(back["state"]["0"]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])

# ---------------------------------------------------------------- retention.gc_min_age_s


@pytest.mark.parametrize("now, started, margin, age", [
    (1000.0, [], 60.0, 60.0),                       # nothing in flight: the margin
    (1000.0, [990.0], 60.0, 60.0 + 10.002),         # since the start, rounded to the ms, + 2 ms
    (1000.0, [995.5, 990.0], 60.0, 60.0 + 10.002),  # the oldest in flight counts
    (1000.0, [990.0004], 0.0, 10.002),              # attempt names hold whole ms, rounded down
])
def test_gc_after_retention_spares_every_save_still_writing(now, started, margin, age):
    assert gc_min_age_s(now, started, margin) == pytest.approx(age, abs=1e-9)


# ------------------------------------------------------------------ the memory tier's nodes


def test_replicas_go_round_a_ring_of_nodes_at_the_same_place():
    from dckpt.replicas import Nodes

    nodes = Nodes((0, 0, 1, 1, 2, 2))
    assert [nodes.peer(r, 1) for r in range(6)] == [2, 3, 4, 5, 0, 1]
    assert [nodes.peer(r, 2) for r in range(6)] == [4, 5, 0, 1, 2, 3]
    assert [nodes.leader(n) for n in nodes.names] == [0, 2, 4]
    uneven = Nodes((5, 5, 5, 9))  # node names as torchrun gives them; one node smaller
    assert [uneven.peer(r, 1) for r in range(4)] == [3, 3, 3, 0]


def test_the_memory_step_chosen_is_the_newest_whole_somewhere_and_not_older_than_storage():
    from dckpt.replicas import Inventory, choose

    need = {"data/a/r0.seg": 100, "data/a/r1.seg": 50}
    older = {"data/o/r0.seg": 10}
    node0 = Inventory(0, {"data/a/r0.seg": 100, "data/o/r0.seg": 10}, {9: need, 6: older})
    node1 = Inventory(1, {"data/a/r1.seg": 50, "data/a/r0.seg": 99}, {9: need})
    c = choose([node0, node1], storage_newest=8)
    assert (c.step, c.manifest_node) == (9, 0)
    assert c.holders == {"data/a/r0.seg": (0,), "data/a/r1.seg": (1,)}  # 99 bytes: cut short
    assert choose([node0, node1], storage_newest=10) is None  # storage is newer
    lost = Inventory(1, {}, {})  # node 1 replaced: step 9 is not whole; step 6 is
    assert choose([node0, lost], storage_newest=None).step == 6
    assert choose([node0, lost], storage_newest=7) is None


# ---------------------------------------------------------------- values: the memo

_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=4) | st.booleans(), inner, max_size=3),
    max_leaves=12)


def _same(a: object, b: object) -> bool:
    """Equal with the same types all the way down, floats by their bits (-0.0, nan)."""
    import struct

    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # type: ignore[arg-type]
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return (list(map(type, a)) == list(map(type, b)) and list(a) == list(b)  # type: ignore[arg-type]
                and all(_same(a[k], b[k]) for k in a))  # type: ignore[index]
    return a == b


@settings(max_examples=300, deadline=None)
@given(st.lists(_plain, min_size=1, max_size=6))
def test_a_value_serialized_from_the_memo_loads_back_as_itself(values):
    """The memo gives the bytes of a value seen before: every value, through it or not,
    loads back with its own types and bits (0, 0.0, -0.0, False and 1.0, True, 1 differ)."""
    from dckpt.values import safe_load, serialize

    for value in values + values + [v for v in values[::-1]]:
        assert _same(safe_load(serialize("k", value).getvalue(), "k"), value), value


class Level(IntEnum):
    LOW = 1


def test_the_memo_keeps_types_apart_and_refuses_what_it_refused():
    from dckpt.values import _MEMO, safe_load, serialize

    _MEMO.clear()
    series = [0, 0.0, -0.0, False, 1, 1.0, True, (1,), [1], {1: 1}, {True: 1}, {1.0: 1}, "1",
              b"1", None, (0.0, -0.0), [(-0.0,)]]
    for value in series * 2:
        assert _same(safe_load(serialize("k", value).getvalue(), "k"), value), value
    assert len(_MEMO) == len(series)  # each its own entry: none taken for another

    for _ in range(2):  # a subclass is not a plain value: refused both times, never memoized
        with pytest.raises(dckpt.StateDictError, match="would be refused by the load"):
            serialize("level", Level.LOW)


def test_a_loaded_value_is_shared_only_when_no_caller_can_change_it():
    """A restore loads the same stored bytes again and again (hyper-parameters): a number,
    a string or a tuple of them comes from the memo; a list or a dict is made anew each
    time, so that a caller that changes one does not change the next restore's."""
    import pickle

    from dckpt.values import safe_load, serialize

    for value in [0.1, (0.9, 0.999), "adam", None, (1, ("a", b"b"))]:
        raw = serialize("k", value).getvalue()
        assert _same(safe_load(raw, "k"), value) and _same(safe_load(raw, "k"), value)
    for value in [[1, 2], {"betas": (0.9, 0.999)}, ([1],)]:
        raw = serialize("k", value).getvalue()
        first = safe_load(raw, "k")
        assert _same(first, value)
        (first[0] if isinstance(first, tuple) else first).clear()  # the caller's to change
        assert _same(safe_load(raw, "k"), value)
    evil = pickle.dumps(print)  # code: refused every time, never remembered
    for _ in range(2):
        with pytest.raises(dckpt.UnsafeValueError):
            safe_load(evil, "k")


def test_reads_are_16_mib_by_default_from_a_local_disk_and_an_object_store(tmp_path):
    # 64 MiB from a local disk read 1-2 GiB cold 1.2-1.7x slower (docs/benchmarks.md)
    assert dckpt.Reader(str(tmp_path)).request_bytes == 16 << 20
    assert dckpt.Reader("memory://repo").request_bytes == 16 << 20  # not a local path
    asked = dckpt.LoadConfig(read_request_bytes=1 << 20)
    assert dckpt.Reader(str(tmp_path), config=asked).request_bytes == 1 << 20
    with pytest.raises(dckpt.ArgumentError):
        dckpt.LoadConfig(read_request_bytes=0)

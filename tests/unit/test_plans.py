"""What crosses to the coordinator. A save's plan digest (dckpt.global_plan) is the
structure, never the values, and saves that alternate between structures each load their own
state; a load sends its plan without its reads, unless another planner or the replicated
reads' plan needs them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

import dckpt
from dckpt import saver
from dckpt.global_plan import plan_digest


def _digest(state: dict) -> str:
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    return plan_digest(planner.create_local_plan())


@pytest.mark.parametrize("spelled", [True, False])
def test_the_digest_is_the_structure_not_the_values(monkeypatch, spelled):
    """Both ways of taking it: the items' fields spelled out (DCP's write items as this
    torch has them), and the items pickled whole (a torch whose items hold other fields)."""
    from dckpt import global_plan

    assert global_plan._KNOWN_ITEMS  # the fields of this torch's write items are known
    monkeypatch.setattr(global_plan, "_KNOWN_ITEMS", spelled)
    base = {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5}
    same = _digest(base)
    assert _digest({"a": torch.ones(4, 2), "b": [torch.randn(3)], "n": 6}) == same
    assert _digest({"a": torch.zeros(2, 4).t(), "b": [torch.zeros(3)], "n": 5}) == same
    for changed in ({"a": torch.zeros(2, 4), "b": [torch.zeros(3)], "n": 5},      # shape
                    {"a": torch.zeros(4, 2).double(), "b": [torch.zeros(3)], "n": 5},  # dtype
                    {"a": torch.zeros(4, 2), "b": {"0": torch.zeros(3)}, "n": 5},  # mapping
                    {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5, "c": 1},  # a key
                    {"A": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5},      # its name
                    {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": torch.tensor(5)},
                    {"a": torch.nn.Parameter(torch.zeros(4, 2)), "b": [torch.zeros(3)],
                     "n": 5}):                                                   # requires_grad
        assert _digest(changed) != same, changed


def _states(i: int) -> tuple[dict, dict]:
    """Three structures in turn; the same flattened keys for two of them ("b.0")."""
    v = float(i)
    kind = i % 3
    if kind == 0:
        return ({"a": torch.full((4,), v), "b": [torch.full((3,), v)], "n": i},
                {"a": torch.zeros(4), "b": [torch.zeros(3)], "n": -1})
    if kind == 1:
        return ({"a": torch.full((4,), v), "b": {"0": torch.full((3,), v)}, "n": i},
                {"a": torch.zeros(4), "b": {"0": torch.zeros(3)}, "n": -1})
    return ({"a": torch.full((2, 2), v, dtype=torch.float64), "n": i},
            {"a": torch.zeros(2, 2, dtype=torch.float64), "n": -1})


def test_saves_alternating_structures_each_load_their_own_state(tmp_path):
    url = str(tmp_path / "repo")
    before = saver.default_saver()._plans.hits
    for i in range(1, 10):
        dckpt.save(_states(i)[0], url, step=i)
        if i % 2:
            dckpt.async_save(_states(i)[0], url, step=100 + i).wait()
    # each odd step's async save repeats that step's structure
    assert saver.default_saver()._plans.hits - before == 5
    for step in [*range(1, 10), *range(101, 110, 2)]:
        saved, out = _states(step % 100)
        dckpt.load(out, url, step=step)
        assert str(out) == str(saved), step


def test_a_sync_save_takes_its_lines_last_local_plan_again_only_for_the_same_shape(
        tmp_path, monkeypatch):
    """DCP's local plan is made once per shape of the state dict: a save of the same shape
    takes the last one again; any change of a key, a nesting, a shape, a dtype, a
    requires_grad or a tensor into a value makes it anew, and every save loads back as it
    was saved."""
    from torch.distributed.checkpoint import default_planner

    made = []
    real = default_planner.create_default_local_save_plan
    monkeypatch.setattr(default_planner, "create_default_local_save_plan",
                        lambda *a: made.append(1) or real(*a))
    base = {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5}
    states = [
        (base, True),
        ({"a": torch.ones(4, 2), "b": [torch.randn(3)], "n": 6}, False),  # values only
        ({"a": torch.zeros(2, 4), "b": [torch.zeros(3)], "n": 5}, True),  # a shape
        ({"a": torch.zeros(2, 4), "b": [torch.zeros(3)], "n": 5}, False),
        ({"a": torch.zeros(2, 4).double(), "b": [torch.zeros(3)], "n": 5}, True),  # a dtype
        ({"a": torch.zeros(2, 4).double(), "b": {"0": torch.zeros(3)}, "n": 5}, True),  # nesting
        ({"a": torch.zeros(2, 4).double(), "b": {"0": torch.zeros(3)}, "n": 7}, False),
        ({"a": torch.zeros(2, 4).double(), "b": {"0": torch.zeros(3)}, "n": torch.tensor(7)},
         True),  # a value into a tensor
        ({"a": torch.nn.Parameter(torch.zeros(2, 4).double()), "b": {"0": torch.zeros(3)},
          "n": torch.tensor(7)}, True),  # requires_grad
        ({"a": torch.zeros(2, 4).double(), "b": {"0": torch.zeros(3)}, "m": torch.tensor(7)},
         True),  # a key's name
    ]
    url = str(tmp_path / "repo")
    for step, (state, new) in enumerate(states, 1):
        before = len(made)
        dckpt.save(state, url, step=step)
        assert len(made) - before == int(new), step
    for step, (state, _) in enumerate(states, 1):
        out = {k: (torch.zeros_like(v).detach() if isinstance(v, torch.Tensor) else
                   [torch.zeros(3)] if isinstance(v, list) else
                   {"0": torch.zeros(3)} if isinstance(v, dict) else 0)
               for k, v in state.items()}
        dckpt.load(out, url, step=step)
        assert str(out) == str({k: v.detach() if isinstance(v, torch.Tensor) else v
                                for k, v in state.items()}), step
        entry = dckpt.inspect(url, step=step).items["a"]
        assert (entry.size, entry.dtype, entry.requires_grad) == (
            tuple(state["a"].shape), str(state["a"].dtype).removeprefix("torch."),
            state["a"].requires_grad), step


class _Seen(DefaultLoadPlanner):
    """Counts the reads the coordinator's global plan is given."""

    seen: list[int] = []

    def create_global_plan(self, global_plan):
        _Seen.seen.append(sum(len(p.items) for p in global_plan))
        return super().create_global_plan(global_plan)


@pytest.mark.parametrize("replicated", ["read", "broadcast"])
def test_a_load_plans_globally_without_its_reads_and_reads_them_all(tmp_path, replicated,
                                                                     monkeypatch):
    from dckpt import planner as planner_module

    url = str(tmp_path / "repo")
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(50)} | {"n": 7}
    dckpt.save(state, url, step=1)
    seen: list[int] = []
    create = planner_module.SafeLoadPlanner.create_global_plan
    monkeypatch.setattr(planner_module.SafeLoadPlanner, "create_global_plan",
                        lambda self, plans: seen.append(sum(len(p.items) for p in plans))
                        or create(self, plans))
    out = {f"t{i}": torch.zeros(3) for i in range(50)} | {"n": -1}
    dckpt.load(out, url, config=dckpt.LoadConfig(replicated=replicated))
    assert str(out) == str(state)
    assert seen == [0 if replicated == "read" else 51]


def test_dcp_load_through_the_reader_gives_another_planner_every_read(tmp_path):
    url = str(tmp_path / "repo")
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    dckpt.save(state, url, step=1)
    out = {f"t{i}": torch.zeros(3) for i in range(5)}
    _Seen.seen = []
    dcp.load(out, storage_reader=dckpt.Reader(url), planner=_Seen())
    assert _Seen.seen == [5] and str(out) == str(state)



@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_collector_runs_again_after_saves_of_many_items_failed_or_not(tmp_path, mode):
    """The exchanges, the commit and the writes of many items pause Python's cyclic garbage
    collector, in the persist thread too; it must run again after, whatever happened."""
    import gc

    from dckpt_testing import arm, disarm

    url = f"faultyfile://{tmp_path}"
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(2000)}

    def save(step: int) -> None:
        if mode == "sync":
            dckpt.save(state, url, step=step)
        else:
            dckpt.async_save(state, url, step=step).wait(timeout=60)

    assert gc.isenabled()
    save(1)
    assert gc.isenabled()
    arm("enospc", after_bytes=1000)
    try:
        with pytest.raises(dckpt.CommitError, match="No space left"):
            save(2)
    finally:
        disarm()
    assert gc.isenabled()
    save(3)
    out = {k: torch.zeros(16) for k in state}
    dckpt.load(out, url, step=3)
    assert gc.isenabled() and all(torch.equal(out[k], v) for k, v in state.items())


_SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_SHAPES, st.integers(1, 3), st.booleans(), st.booleans()),
                min_size=1, max_size=6))
def test_the_local_load_plan_is_dcps_read_for_read(items):
    """A plain tensor stored whole takes a path of its own; every read item, its order and
    its chunk indices are DCP's: tensors of 0 to 3 dimensions (empty ones too) stored in 1
    to 3 chunks along the first, Parameters and values."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from dckpt.planner import local_load_plan

    state: dict = {}
    md: dict = {}
    for k, (shape, pieces, parameter, value) in enumerate(items):
        fqn = f"t{k}"
        if value:
            state[fqn], md[fqn] = 5, BytesStorageMetadata()
            continue
        t = torch.zeros(shape)
        state[fqn] = torch.nn.Parameter(t) if parameter else t
        rows = shape[0] if shape else 1
        cuts = sorted({0, *(rows * i // pieces for i in range(1, pieces))}) if shape else [0]
        chunks = [ChunkStorageMetadata(
            offsets=torch.Size([start] + [0] * (len(shape) - 1)) if shape else torch.Size([]),
            sizes=torch.Size([end - start, *shape[1:]]) if shape else torch.Size([]))
            for start, end in zip(cuts, [*cuts[1:], rows])]
        md[fqn] = TensorStorageMetadata(TensorProperties.create_from_tensor(t),
                                        torch.Size(shape), chunks)
    metadata = Metadata(md)
    ours = local_load_plan(state, metadata, True).items
    dcps = create_default_local_load_plan(state, metadata, True).items
    assert ours == dcps
    assert [(r.dest_index.index, r.storage_index.index) for r in ours] == [
        (r.dest_index.index, r.storage_index.index) for r in dcps]

"""What crosses to the coordinator. A save's plan digest (dckpt.global_plan) is the
structure, never the values, and saves that alternate between structures each load their own
state."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import dckpt
from dckpt import saver
from dckpt.global_plan import plan_digest


def _digest(state: dict) -> bytes:
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    return plan_digest(planner.create_local_plan())


def test_the_digest_is_the_structure_not_the_values():
    base = {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5}
    same = _digest(base)
    assert _digest({"a": torch.ones(4, 2), "b": [torch.randn(3)], "n": 6}) == same
    for changed in ({"a": torch.zeros(2, 4), "b": [torch.zeros(3)], "n": 5},      # shape
                    {"a": torch.zeros(4, 2).double(), "b": [torch.zeros(3)], "n": 5},  # dtype
                    {"a": torch.zeros(4, 2), "b": {"0": torch.zeros(3)}, "n": 5},  # mapping
                    {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": 5, "c": 1},  # a key
                    {"a": torch.zeros(4, 2), "b": [torch.zeros(3)], "n": torch.tensor(5)}):
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


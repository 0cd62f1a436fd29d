"""The global plan made once per structure (dckpt.global_plan): saves of one structure reuse
it, a change on any rank plans again, and every checkpoint loads its own values, bit for bit,
whatever the state of each rank's cache."""

from __future__ import annotations

import logging

import pytest
import torch

import dckpt
from dckpt import saver
from dckpt_testing import leftovers, run_ranks


def _sharded(full: torch.Tensor) -> torch.Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return distribute_tensor(full, mesh, [Shard(0)])


def _state(rank: int, step: int, extra: bool = False) -> dict:
    g = torch.Generator().manual_seed(step)
    shared = {f"w{i}": torch.randn(5, 3, generator=g) for i in range(6)}  # replicated
    shared["emb"] = _sharded(torch.randn(6, 2, generator=g))  # a shard per rank
    state = {"model": shared, "step": step, "sched": {"lr": 0.1 * step},
             f"rank{rank}.x": torch.full((4,), float(rank * 1000 + step)),
             f"rank{rank}.loader": {"pos": rank * 100 + step}}
    if extra:
        state[f"rank{rank}.extra"] = torch.arange(3.0) + step
    return state


def _empty(rank: int, extra: bool = False) -> dict:
    state = {"model": {f"w{i}": torch.zeros(5, 3) for i in range(6)}
             | {"emb": _sharded(torch.zeros(6, 2))}, "step": -1,
             "sched": {"lr": -1.0}, f"rank{rank}.x": torch.zeros(4),
             f"rank{rank}.loader": {"pos": -1}}
    if extra:
        state[f"rank{rank}.extra"] = torch.zeros(3)
    return state


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        local = getattr(a, "to_local", lambda: a)  # a DTensor: this rank's shard
        return isinstance(b, torch.Tensor) and torch.equal(local(), getattr(b, "to_local",
                                                                            lambda: b)())
    return a == b


def _loads_each_step(rank: int, url: str, steps: dict[int, bool]) -> list[int]:
    """The steps whose load did not give back their own values."""
    wrong = []
    for step, extra in steps.items():
        out = _empty(rank, extra)
        dckpt.load(out, url, step=step)
        if not _same(out, _state(rank, step, extra)):
            wrong.append(step)
    return wrong


def _saves(rank, world, url):
    plans = saver.default_saver()._plans
    hits = []
    steps = {1: False, 2: False, 3: False, 4: rank == 1, 5: rank == 1, 6: rank == 1,
             7: False}
    for step, extra in steps.items():
        if step == 6:
            dckpt.async_save(_state(rank, step, extra), url, step=step).wait()
        else:
            dckpt.save(_state(rank, step, extra), url, step=step)
        hits.append(plans.hits)
    info = dckpt.load(_empty(rank), url, step=7)
    return hits, _loads_each_step(rank, url, steps), info.step


@pytest.mark.parametrize("world", [1, 3])
def test_saves_of_one_structure_plan_once_and_each_loads_its_own_values(tmp_path, world):
    for o in run_ranks(_saves, world, str(tmp_path / "repo")):
        hits, wrong, step = o.value
        # 1 plans; 2, 3 reuse; 4 changes rank 1's keys (every rank plans again); 5 reuses;
        # 6, an async save, reuses the sync saves' plan; 7 changes back
        increments = [b - a for a, b in zip([0] + hits, hits)]
        assert increments == [0, 1, 1, 0, 1, 1, 0] if world > 1 else [0, 1, 1, 1, 1, 1, 1], (
            o.rank, hits)
        assert wrong == [] and step == 7


def _stale_caches(rank, world, url):
    plans = saver.default_saver()._plans
    steps = {}
    for step in range(1, 8):
        if step == 3 and rank == 1:
            plans.clear()  # a rank that lost its cache: it sends its whole plan
        if step == 4 and rank == 0:
            plans.clear()  # the coordinator lost its: it asks every rank again
        if step == 5 and rank == 2:
            plans.generation = "from another planning"
        if step == 6 and rank == 2:  # a rank that kept a plan the coordinator replaced
            plans.plan = None
        dckpt.save(_state(rank, step), url, step=step)
        steps[step] = False
    return plans.hits, _loads_each_step(rank, url, steps)


def test_ranks_whose_caches_are_gone_or_stale_plan_again_and_save_right(tmp_path):
    outcomes = run_ranks(_stale_caches, 3, str(tmp_path / "repo"))
    for o in outcomes:
        hits, wrong = o.value
        assert wrong == [], (o.rank, wrong)
    # reused: 2 (then 3, 4, 5, 6 each plan again for one rank's cache) and 7
    assert [o.value[0] for o in outcomes] == [2, 2, 2]


def _differing_values_and_refusals(rank, world, url):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dckpt.planner").addHandler(handler)
    warned = []
    for step in (1, 2):  # the loader position differs per rank under one key
        state = {"w": torch.ones(3) * step, "loader": {"pos": rank + step}}
        dckpt.save(state, url, step=step)
        warned.append(sum("differ between the ranks" in m for m in records))
    refused = None
    try:  # a key that is a tensor on one rank and a value on another
        bad = {"w": torch.ones(3), "loader": torch.zeros(2) if rank == 0 else 7}
        dckpt.save(bad, url, step=3)
    except dckpt.DckptError as e:
        refused = type(e).__name__
    dckpt.save({"w": torch.ones(3) * 4, "loader": {"pos": rank + 4}}, url, step=4)
    try:  # the same structure (the plan is reused) under steps that differ
        dckpt.save({"w": torch.ones(3) * 5, "loader": {"pos": rank + 5}}, url, step=5 + rank)
        steps_refused = ""
    except dckpt.DckptError as e:
        steps_refused = f"{type(e).__name__}: {e}"
    out = {"w": torch.zeros(3), "loader": {"pos": -1}}
    dckpt.load(out, url, step=4)
    return (warned, refused, saver.default_saver()._plans.hits, out["w"].tolist(),
            [c.step for c in dckpt.list_checkpoints(url)], steps_refused)


def test_a_reused_plan_still_warns_of_differing_values_and_a_refusal_plans_again(tmp_path):
    outcomes = run_ranks(_differing_values_and_refusals, 2, str(tmp_path / "repo"))
    warned, refused, hits, w, steps, steps_refused = outcomes[0].value
    assert warned == [1, 2]  # the coordinator warns at the reused save too
    assert {o.value[1] for o in outcomes} == {"UnsavableStateError"}
    assert hits == 1 and w == [4.0] * 3 and steps == [1, 2, 4]  # step 5 refused: not counted
    for o in outcomes:  # the same error on both ranks
        assert o.value[5].startswith("ArgumentError") and (
            "the ranks asked to save different steps (5 on rank 0; 6 on rank 1)" in o.value[5])
    assert leftovers(str(tmp_path / "repo")) == []


def _per_rank_tensors_under_one_key(rank, world, url, async_save):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dckpt.planner").addHandler(handler)
    torch.manual_seed(rank)
    state = {"rng": torch.get_rng_state(), "pos": torch.tensor(10 * rank),
             "seen": torch.tensor([True, rank == 1]), "same": torch.arange(6),
             "w": torch.full((4,), float(rank)),  # floats: weights, never hashed
             "big": torch.full((1 << 15,), rank, dtype=torch.int32)}  # 128 KiB: not hashed
    for step in (1, 2):  # the second reuses the plan
        if async_save:
            dckpt.async_save(state, url, step=step).wait()
        else:
            dckpt.save(state, url, step=step)
    return [m for m in records if "differ between the ranks" in m]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_small_integer_tensors_that_differ_per_rank_under_one_key_are_warned_of(tmp_path,
                                                                                  async_save):
    """A generator's state or a loader's position saved on every rank under one key: DCP
    keeps one rank's, and every rank restores that one, silently (non-tensor values were
    warned of; tensors were not)."""
    warned = [o.value for o in run_ranks(_per_rank_tensors_under_one_key, 2,
                                         str(tmp_path / "repo"), async_save)]
    assert warned[1] == [] and len(warned[0]) == 2, warned  # the coordinator's, per save
    for message in warned[0]:
        assert message.startswith("3 value(s) differ between the ranks")
        for key in ("rng", "pos", "seen"):
            assert f"{key} (rank 0 holds another value than rank 1)" in message
        assert "same (" not in message and "w (" not in message and "big (" not in message

"""Rank-local keys (a per-rank data loader's position, ``rank{r}.x``): saved by each rank,
loaded back by each rank; unasked keys are judged over every rank's state dict."""

from __future__ import annotations

import time

import pytest
import torch

import dckpt
from dckpt_testing import run_ranks


def _state(rank: int) -> dict:
    return {"w": torch.arange(6.0), f"rank{rank}.x": torch.full((3,), float(rank)),
            f"rank{rank}.loader": {"pos": 100 + rank}}


def _empty(rank: int) -> dict:
    return {"w": torch.zeros(6), f"rank{rank}.x": torch.zeros(3),
            f"rank{rank}.loader": {"pos": -1}}


def _save_and_load(rank, world, url, mode, options):
    if mode == "async":
        dckpt.async_save(_state(rank), url, step=1, storage_options=options).wait()
    else:
        dckpt.save(_state(rank), url, step=1, storage_options=options)
    out = _empty(rank)
    info = dckpt.load(out, url, storage_options=options)
    import torch.distributed.checkpoint as dcp

    again = _empty(rank)
    dcp.load(again, storage_reader=dckpt.Reader(url, step=1, storage_options=options))
    return (info.step, out[f"rank{rank}.x"].tolist(), out[f"rank{rank}.loader"],
            again[f"rank{rank}.x"].tolist(), again[f"rank{rank}.loader"])


@pytest.mark.parametrize("world, mode", [(2, "sync"), (2, "async"), (4, "sync")])
def test_rank_local_keys_round_trip(tmp_path, world, mode):
    outcomes = run_ranks(_save_and_load, world, str(tmp_path / "repo"), mode, None)
    for o in outcomes:
        r = o.rank
        assert o.value == (1, [float(r)] * 3, {"pos": 100 + r}, [float(r)] * 3, {"pos": 100 + r})


@pytest.mark.s3
def test_rank_local_keys_round_trip_on_s3(s3_repo):
    url, options = s3_repo
    outcomes = run_ranks(_save_and_load, 2, url, "sync", options)
    assert [o.value[1] for o in outcomes] == [[0.0] * 3, [1.0] * 3]


def _save4(rank, world, url):
    dckpt.save(_state(rank), url, step=1)


def _load2(rank, world, url, partial):
    out = _empty(rank)
    try:
        dckpt.load(out, url, partial=partial)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    return out[f"rank{rank}.x"].tolist(), out[f"rank{rank}.loader"]


def test_resharded_4_to_2_needs_partial_and_says_so(tmp_path):
    url = str(tmp_path / "repo")
    run_ranks(_save4, 4, url)
    refused = run_ranks(_load2, 2, url, False)
    assert refused[0].value == refused[1].value  # the same error on every rank
    kind, text = refused[0].value
    assert kind == "StateDictError" and "partial=True" in text
    assert "rank2.x" in text and "rank3.loader.pos" in text and "rank0.x" not in text
    loaded = run_ranks(_load2, 2, url, True)
    assert [o.value for o in loaded] == [([0.0] * 3, {"pos": 100}), ([1.0] * 3, {"pos": 101})]


def _save_unloadable_on_one_rank(rank, world, url, mode):
    import datetime
    import os

    state = _state(rank)
    if rank == 1:
        state["rank1.when"] = datetime.datetime(2026, 1, 1)  # a load would refuse it
    try:
        if mode == "async":
            dckpt.async_save(state, url, step=1).wait()
        else:
            dckpt.save(state, url, step=1)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e).splitlines()[0], os.path.exists(url) and sorted(
            os.listdir(url))
    return "saved", "", None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_value_one_rank_cannot_load_back_refuses_the_save_on_every_rank(tmp_path, mode):
    url = str(tmp_path / "repo")
    outcomes = run_ranks(_save_unloadable_on_one_rank, 2, url, mode)
    kinds = {o.value[0] for o in outcomes}
    assert kinds == {"UnsavableStateError"}
    assert outcomes[0].value[1] == outcomes[1].value[1] and "rank 1" in outcomes[0].value[1]
    assert all(o.value[2] in (False, []) for o in outcomes)  # nothing written


def _save_values_that_differ(rank, world, url, mode):
    import io
    import logging

    caught = io.StringIO()
    handler = logging.StreamHandler(caught)
    logging.getLogger("dckpt").addHandler(handler)
    state = {"loader": {"pos": 100 + rank // 2}, "epoch": 3, "w": torch.ones(2),
             f"rank{rank}.pos": 100 + rank}
    for step in (1, 2):  # the second async save reuses the first one's plan: fresh digests
        if mode == "async":
            dckpt.async_save(state, url, step=step).wait()
        else:
            dckpt.save(state, url, step=step)
        state["loader"]["pos"] += 10
    logging.getLogger("dckpt").removeHandler(handler)
    out = {"loader": {"pos": -1}, "epoch": 0, "w": torch.zeros(2), f"rank{rank}.pos": -1}
    dckpt.load(out, url)
    out["w"] = out["w"].tolist()  # plain values back to the test (a tensor's memory may not
    return [ln for ln in caught.getvalue().splitlines() if "differ" in ln], out  # outlive us)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_value_that_differs_under_a_shared_key_is_named_at_every_save(tmp_path, mode):
    """DCP keeps one rank's copy of a key every rank saves: a per-rank position saved under a
    shared key comes back the same on every rank. It was silent; the coordinator now names
    the key and the ranks at each save (a value that is equal everywhere, or rank-local, is
    not named)."""
    outcomes = run_ranks(_save_values_that_differ, 4, str(tmp_path), mode)
    warned, _ = outcomes[0].value
    assert len(warned) == 2, warned  # both saves, on the coordinator
    assert all("loader.pos (rank 0 holds another value than ranks 2, 3)" in w for w in warned)
    assert not any("epoch" in w or ".pos (" in w.replace("loader.pos (", "") for w in warned)
    assert all(o.value[0] == [] for o in outcomes[1:])
    loaded = [o.value[1] for o in outcomes]
    assert [o["loader"]["pos"] for o in loaded] == [loaded[0]["loader"]["pos"]] * 4  # one kept
    assert [o[f"rank{r}.pos"] for r, o in enumerate(loaded)] == [100, 101, 102, 103]


MISMATCHES = ["none", "missing shared", "missing own", "extra key", "dtype", "shape",
              "tensor for value", "value for tensor", "another rank's key", "nested deeper",
              "a step that is no int", "a partial that is no bool"]
ARGUMENT_MISTAKES = {"a step that is no int": {"step": "1"}, "a partial that is no bool":
                     {"partial": "yes"}}


def _mismatch(state: dict, kind: str, rank: int, world: int) -> None:
    """One rank's load-side state dict, changed as a caller's mistake would change it."""
    if kind == "missing shared":
        del state["w"]
    elif kind == "missing own":
        del state[f"rank{rank}.x"]
    elif kind == "extra key":
        state["never.saved"] = torch.zeros(2)
    elif kind == "dtype":
        state["w"] = torch.zeros(6, dtype=torch.float64)
    elif kind == "shape":
        state[f"rank{rank}.x"] = torch.zeros(4)
    elif kind == "tensor for value":
        state[f"rank{rank}.loader"] = torch.zeros(1)
    elif kind == "value for tensor":
        state[f"rank{rank}.x"] = [0.0, 0.0, 0.0]
    elif kind == "another rank's key":
        state[f"rank{(rank + 1) % world}.x"] = state.pop(f"rank{rank}.x")
    elif kind == "nested deeper":
        state["w"] = {"inner": state["w"]}


def _mismatched_loads(rank, world, url, seed, scenarios):
    """Every rank draws the same scenarios; in each, one rank (or none) loads a state dict
    changed by one mistake. The outcome per scenario: the values, or the error."""
    import random

    rng = random.Random(seed)
    dckpt.save(_state(rank), url, step=1)
    out = []
    for _ in range(scenarios):
        kind, culprit = rng.choice(MISMATCHES), rng.randrange(world)
        state, kwargs = _empty(rank), {}
        if rank == culprit:
            _mismatch(state, kind, rank, world)
            kwargs = ARGUMENT_MISTAKES.get(kind, {})
        t0 = time.monotonic()
        try:
            dckpt.load(state, url, **kwargs)
            got = ("ok", state["w"].tolist() if "w" in state else None,
                   state[f"rank{rank}.x"].tolist(), state[f"rank{rank}.loader"])
        except dckpt.DckptError as e:
            got = (type(e).__name__, str(e))
        except Exception as e:  # anything else is a bug; the assertion names it
            got = ("NOT A DckptError", f"{type(e).__name__}: {e}")
        out.append((kind, culprit, got, time.monotonic() - t0))
    return out


@pytest.mark.parametrize("world, seed", [(2, 1), (3, 2)])
def test_one_ranks_mistaken_state_dict_is_the_same_error_on_every_rank(tmp_path, world, seed):
    """A load where one rank's state dict differs from what the checkpoint holds (its own
    key missing, another rank's key, a dtype, a shape, a value where a tensor was): the
    same StateDictError on every rank, word for word, naming the key; an argument of the
    wrong type on one rank: the same ArgumentError on every rank, at once; without the
    mistake, or with a shared key that another rank asks for left out, every rank's own
    values."""
    outcomes = run_ranks(_mismatched_loads, world, str(tmp_path / "repo"), seed, 16,
                         timeout_s=240)
    per_rank = [o.value for o in outcomes]
    seen = set()
    for i, (kind, culprit, _, _) in enumerate(per_rank[0]):
        got = [r[i][2] for r in per_rank]
        seen.add(kind)
        assert max(r[i][3] for r in per_rank) < 60, (kind, [r[i][3] for r in per_rank])
        assert all(g[0] != "NOT A DckptError" for g in got), (kind, got)
        if kind in ("none", "missing shared"):  # another rank asks for the shared key
            assert [g[0] for g in got] == ["ok"] * world, (kind, got)
            assert [g[2] for g in got] == [[float(r)] * 3 for r in range(world)]
            assert [g[1] for g in got] == [None if kind != "none" and r == culprit
                                           else list(range(6)) for r in range(world)]
            continue
        kinds = {g[0] for g in got}
        expected = "ArgumentError" if kind in ARGUMENT_MISTAKES else "StateDictError"
        assert kinds == {expected}, (kind, culprit, got)
        assert len({g[1] for g in got}) == 1, (kind, got)  # word for word
        if kind in ARGUMENT_MISTAKES:
            assert f"dckpt.load refused on rank {culprit}: " in got[0][1], got[0][1]
            continue
        key = {"dtype": "w", "nested deeper": "w",
               "extra key": "never.saved"}.get(kind, f"rank{culprit}.")
        assert key in got[0][1], (kind, got[0][1])
    assert len(seen) >= 6, seen  # the draws covered most mistakes


SAVE_MISTAKES = ["none", "shape", "dtype", "tensor for value", "unloadable value",
                 "another step", "a step that is no int", "metrics that are no mapping",
                 "a state dict that is no dict", "a config that is no SaveConfig"]


def _mistaken_saves(rank, world, url, seed, scenarios, mode):
    """Every rank draws the same scenarios; in each, one rank saves with one mistake. The
    outcome per scenario: the step committed, or the error, and what the repository holds."""
    import os
    import random

    rng = random.Random(seed)
    out = []
    for i in range(scenarios):
        kind, culprit = rng.choice(SAVE_MISTAKES), rng.randrange(world)
        state, step, metrics, config = _state(rank), 10 + i, {"loss": 1.0}, None
        if rank == culprit:
            if kind == "shape":
                state["w"] = torch.arange(7.0)
            elif kind == "dtype":
                state["w"] = torch.arange(6, dtype=torch.float16)
            elif kind == "tensor for value":
                state[f"rank{rank}.loader"] = {"pos": torch.ones(1)}
                state["w"] = [1.0] * 6
            elif kind == "unloadable value":
                state[f"rank{rank}.loader"] = {"pos": os.stat_result((0,) * 10)}
            elif kind == "another step":
                step = 1000 + i
            elif kind == "a step that is no int":
                step = str(step)
            elif kind == "metrics that are no mapping":
                metrics = [1.0]
            elif kind == "a state dict that is no dict":
                state = list(state.values())
            elif kind == "a config that is no SaveConfig":
                config = {"block_size_bytes": 4096}
        t0 = time.monotonic()
        try:
            save = dckpt.async_save if mode == "async" else dckpt.save
            done = save(state, url, step=step, metrics=metrics, config=config)
            got = ("ok", (done.wait() if mode == "async" else done).step)
        except dckpt.DckptError as e:
            got = (type(e).__name__, str(e))
        except Exception as e:
            got = ("NOT A DckptError", f"{type(e).__name__}: {e}")
        seconds = time.monotonic() - t0
        torch.distributed.barrier()
        out.append((kind, culprit, got, [c.step for c in dckpt.list_checkpoints(url)], seconds))
    return out


@pytest.mark.parametrize("world, seed, mode", [(2, 1, "sync"), (3, 2, "async")])
def test_one_ranks_mistaken_save_is_the_same_error_on_every_rank_and_commits_nothing(
        tmp_path, world, seed, mode):
    """A save where one rank's state or arguments differ (a shared tensor's shape or dtype,
    a value for a tensor, a value a load could not restore, another step, an argument of
    the wrong type): the same error on every rank, word for word, at once, and no
    checkpoint; without the mistake, the step commits. (An argument refused on one rank
    alone left the others in the save's first collective until its timeout, 300 s.)"""
    url = str(tmp_path / "repo")
    outcomes = run_ranks(_mistaken_saves, world, url, seed, 12, mode, timeout_s=240)
    per_rank = [o.value for o in outcomes]
    committed: list[int] = []
    for i, (kind, culprit, _, _, _) in enumerate(per_rank[0]):
        got = [r[i][2] for r in per_rank]
        assert all(g[0] != "NOT A DckptError" for g in got), (kind, got)
        # word for word on every rank (each names the step it asked for, where they differ)
        said = {(g[0], g[1].partition(" failed on ")[2] if kind == "another step" else g[1])
                for g in got}
        assert len(said) == 1, (kind, culprit, got)
        if kind == "none":
            assert got[0] == ("ok", 10 + i)
            committed.append(10 + i)
        else:
            assert got[0][0] in ("ArgumentError", "StateDictError", "UnsavableStateError"), got
        assert all(r[i][3] == committed for r in per_rank), (kind, [r[i][3] for r in per_rank])
        assert max(r[i][4] for r in per_rank) < 60, (kind, [r[i][4] for r in per_rank])
    assert {k for k, *_ in per_rank[0]} - {"none"}, "the draws made no mistake"
    data = tmp_path / "repo" / "data"
    attempts = {p.name.split("-")[0] for p in data.iterdir()} if data.exists() else set()
    assert attempts <= {f"s{s}" for s in committed}, attempts  # refused saves wrote nothing


def _storage_fails_in_the_check_on_rank_1(rank, world, url):
    import dckpt.saver

    saver = dckpt.saver.default_saver()
    writer = saver.writer

    def unreachable(*args, **kwargs):  # as a node whose mount refuses this user
        raise PermissionError(13, "Permission denied", url)

    if rank == 1:
        saver.writer = unreachable
    config = dckpt.SaveConfig(collective_timeout_s=30)
    t0 = time.monotonic()
    try:
        dckpt.save({"w": torch.ones(4)}, url, step=1, config=config)
        got = ("ok", "")
    except dckpt.DckptError as e:
        got = (type(e).__name__, str(e))
    finally:
        saver.writer = writer
    return got, time.monotonic() - t0


def test_a_storage_failure_in_one_ranks_checks_is_the_same_error_on_every_rank(tmp_path):
    """Not a refusal but an OSError where a rank's checks open the storage: it left that
    rank alone (an unexpected error there), and the others in the save's first collective
    until its timeout."""
    url = str(tmp_path / "repo")
    out = [o.value for o in run_ranks(_storage_fails_in_the_check_on_rank_1, 2, url,
                                      timeout_s=120)]
    (kind, said), _ = out[0]
    assert kind == "StorageError" and "refused on rank 1: PermissionError" in said, out
    assert [o[0] for o in out] == [out[0][0]] * 2 and max(s for _, s in out) < 20, out
    assert dckpt.list_checkpoints(url) == []


def _load_with_a_wrong_url_on_rank_1(rank, world, url):
    dckpt.save({"w": torch.ones(4)}, url, step=1)
    out = []
    for wrong in (None, 5, "a\0b", ""):
        t0 = time.monotonic()
        try:
            dckpt.load({"w": torch.zeros(4)}, wrong if rank == 1 else url,
                       config=dckpt.LoadConfig(collective_timeout_s=30))
            got = ("ok", "")
        except dckpt.DckptError as e:
            got = (type(e).__name__, str(e))
        out.append((got, time.monotonic() - t0))
    return out


def test_a_wrong_url_on_one_rank_of_a_load_is_the_same_error_on_every_rank(tmp_path):
    """The URL was checked outside the load's shared checks: the rank that passed None
    raised at once, the others waited in the load's first collective until its timeout."""
    url = str(tmp_path / "repo")
    per_rank = [o.value for o in run_ranks(_load_with_a_wrong_url_on_rank_1, 2, url,
                                           timeout_s=120)]
    for (a, sa), (b, sb) in zip(*per_rank):
        assert a == b and a[0] == "ArgumentError" and "refused on rank 1" in a[1], (a, b)
        assert max(sa, sb) < 20, (sa, sb)


_ODD = {"None": None, "5": 5, "''": "", "NUL": "a\0b", "[]": [], "object": object(),
        "-1": -1, "nan": float("nan")}


def _odd_value_on_rank_1(rank, world, url):
    """Each argument of load, save, async_save and the manager's construction, restore and
    save in turn given an odd value on rank 1 alone."""
    def state() -> dict:
        return {"w": torch.arange(8.0), "n": 3}

    dckpt.save(state(), url, step=1)
    mgr = dckpt.CheckpointManager(url, handle_signals=False, async_save=False)
    calls = {
        "load": (dckpt.load, dict(state_dict=state(), url=url, step=None, partial=False,
                                  storage_options=None, config=None)),
        "save": (dckpt.save, dict(state_dict=state(), url=url, step=None, metrics=None,
                                  storage_options=None, config=None)),
        "async_save": (lambda **k: dckpt.async_save(**k).wait(timeout=60),
                       dict(state_dict=state(), url=url, step=None, metrics=None, config=None)),
        "manager": (lambda **k: dckpt.CheckpointManager(**k).close(),
                    dict(url=url, save_every_steps=None, save_at_epoch_end=False,
                         handle_signals=False, save_config=None, memory_replicas=0)),
        "mgr.restore": (mgr.restore, dict(state_dict=state(), step=None, best_metric=None,
                                          partial=False)),
        "mgr.save": (mgr.save, dict(step=None, state_dict=state(), metrics=None)),
    }
    out, step = [], 10
    for name, (call, valid) in calls.items():
        for param in valid:
            for label, value in _ODD.items():
                kwargs = dict(valid)
                if "step" in kwargs and "save" in name:
                    step += 1
                    kwargs["step"] = step
                if rank == 1:
                    kwargs[param] = value
                t0 = time.monotonic()
                try:
                    call(**kwargs)
                    got = "ok"
                except dckpt.DckptError as e:
                    got = type(e).__name__
                except Exception as e:  # noqa: BLE001 - what the test looks for
                    got = f"NOT A DckptError: {type(e).__name__}: {e}"
                out.append((f"{name}({param}={label})", got, time.monotonic() - t0))
    mgr.close()
    return out


def test_an_odd_value_of_any_argument_on_one_rank_is_the_same_outcome_on_every_rank(tmp_path):
    """Ranks alike: both succeed, or both raise the same DckptError type, at once (a wrong
    URL of a load on one rank left the other in its first collective until the timeout)."""
    url = str(tmp_path / "repo")
    per_rank = [o.value for o in run_ranks(_odd_value_on_rank_1, 2, url, timeout_s=240)]
    apart = [(a[0], a[1], b[1]) for a, b in zip(*per_rank) if a[1] != b[1]]
    slow = [(a[0], a[2], b[2]) for a, b in zip(*per_rank) if max(a[2], b[2]) > 20]
    assert apart == [] and slow == []
    assert all(not got.startswith("NOT") for r in per_rank for _, got, _ in r)

"""Async save on real gloo ranks: background commit, a failing rank, a killed rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import dckpt
from dckpt_testing import arm, disarm, leftovers, open_gate, run_ranks

ROWS, COLS = 4, 1 << 16


def _sharded(full):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return distribute_tensor(full, mesh, [Shard(0)])


def _state(value: float) -> dict:
    return {"w": _sharded(torch.full((ROWS, COLS), value)), "bias": torch.full((8,), value),
            "step": int(value)}


def _save_mutate_load(rank, world, url):
    state = _state(1.0)
    handle = dckpt.async_save(state, url, step=1)
    state["w"].to_local().fill_(9.0)  # changed before the background write
    state["bias"].fill_(9.0)
    info = handle.wait(timeout=60)
    second = dckpt.async_save(state, url, step=2).wait(timeout=60)
    out = _state(0.0)
    dckpt.load(out, url, step=1)
    first_ok = (torch.equal(out["w"].full_tensor(), torch.full((ROWS, COLS), 1.0))
                and torch.equal(out["bias"], torch.full((8,), 1.0)) and out["step"] == 1)
    dckpt.load(out, url, step=2)
    second_ok = torch.equal(out["w"].full_tensor(), torch.full((ROWS, COLS), 9.0))
    return info.step, info.world_size, second.step, first_ok, second_ok


def test_async_save_on_two_ranks_holds_the_values_at_the_call(tmp_path):
    outcomes = run_ranks(_save_mutate_load, 2, str(tmp_path))
    assert [o.value for o in outcomes] == [(1, 2, 2, True, True)] * 2


def _background_failure(rank, world, cases):
    out = []
    for url, fail_rank, where in cases:
        config = dckpt.SaveConfig()
        if where == "pause":  # 512 KiB of w per rank, 128 KiB of staging: written in the pause
            config = dckpt.SaveConfig(block_size_bytes=64 << 10, staging_bytes=128 << 10)
        dckpt.async_save(_state(1.0), url, step=1, config=config).wait(timeout=60)
        if rank == fail_rank:
            arm("enospc", after_bytes=1000)
        try:
            handle = dckpt.async_save(_state(2.0), url, step=2,  # returns: training goes on
                                      config=config)
            try:
                handle.wait(timeout=60)
                outcome = "committed"
            except dckpt.CommitError as e:
                outcome = (type(e).__name__, str(e), sorted(e.failures))
        finally:
            disarm()
        info = dckpt.async_save(_state(3.0), url, step=3, config=config).wait(timeout=60)
        assert (info.overflow_bytes > 0) == (where == "pause")
        out.append((outcome, [s for s, _ in info.previous_failures]))
    return out


def test_a_background_failure_on_one_rank_fails_the_step_on_every_rank(tmp_path):
    """The write fails on one rank in the background (rank 0), or already in the pause
    (rank 1; what the staging budget does not hold): the same CommitError on every rank, at
    wait(), and the ranks stay in step for the next save."""
    cases = [(f"faultyfile://{tmp_path}/background", 0, "background"),
             (f"faultyfile://{tmp_path}/pause", 1, "pause")]
    values = [o.value for o in run_ranks(_background_failure, 2, cases)]
    assert values[0] == values[1]
    for (url, fail_rank, where), ((kind, message, failing), previous) in zip(cases, values[0]):
        assert kind == "CommitError" and failing == [fail_rank] and previous == [2], where
        assert f"failed on rank {fail_rank}" in message and "No space left" in message
        assert [i.step for i in dckpt.list_checkpoints(url.replace("faultyfile://", ""))
                ] == [1, 3]
        assert leftovers(url.replace("faultyfile://", "")) == [], where


TIMEOUT_S = 8.0


def _killed_during_background_write(rank, world, url, victim, fault="kill"):
    pids = [None] * world
    torch.distributed.all_gather_object(pids, os.getpid())
    config = dckpt.SaveConfig(collective_timeout_s=TIMEOUT_S)
    dckpt.async_save(_state(1.0), url, step=1, config=config).wait(timeout=60)
    if rank == victim:
        arm(fault, after_bytes=100_000)  # SIGKILL / SIGSTOP this rank in its background write
    handle = dckpt.async_save(_state(2.0), url, step=2, config=config)
    t0 = time.monotonic()
    for _ in range(20):  # the training loop goes on meanwhile
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    try:
        handle.wait(timeout=TIMEOUT_S * 4)
        outcome = ("committed", time.monotonic() - t0)
    except dckpt.CommitError as e:
        outcome = ("CommitError", time.monotonic() - t0, str(e))
    if fault == "stop" and rank != victim:  # the frozen rank goes on once the others gave up
        os.kill(pids[victim], signal.SIGCONT)
    return outcome


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_during_the_background_write_fails_the_survivor_within_the_timeout(tmp_path,
                                                                                   victim):
    url = f"faultyfile://{tmp_path}"
    outcomes = run_ranks(_killed_during_background_write, 2, url, victim, allow_failures=True,
                         timeout_s=90)
    assert outcomes[victim].killed
    survivor = outcomes[1 - victim]
    assert survivor.exitcode == 0 and survivor.value[0] == "CommitError", survivor
    assert survivor.value[1] < TIMEOUT_S + 5, survivor.value
    assert not os.path.exists(tmp_path / "manifests" / "000000000002.json")
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]
    state = {"w": torch.zeros(ROWS, COLS), "bias": torch.zeros(8), "step": 0}
    dckpt.load(state, str(tmp_path))  # one process reads the two ranks' checkpoint
    assert torch.equal(state["w"], torch.full((ROWS, COLS), 1.0)) and state["step"] == 1


@pytest.mark.parametrize("victim", [0])  # another rank frozen: the sync test
def test_a_rank_frozen_in_the_background_write_fails_every_rank_and_commits_nothing(
        tmp_path, victim):
    """SIGSTOP instead of SIGKILL: the frozen rank's sockets stay open and answer nothing;
    the survivor's wait fails within the collective timeout, and the frozen rank, resumed
    after that, fails too."""
    url = f"faultyfile://{tmp_path}"
    outcomes = run_ranks(_killed_during_background_write, 2, url, victim, "stop",
                         allow_failures=True, timeout_s=120)
    survivor, frozen = outcomes[1 - victim], outcomes[victim]
    assert survivor.exitcode == 0 and survivor.value[0] == "CommitError", survivor
    assert survivor.value[1] < TIMEOUT_S + 5, survivor.value
    assert frozen.exitcode == 0 and frozen.value[0] == "CommitError", frozen
    assert not os.path.exists(tmp_path / "manifests" / "000000000002.json")
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]


def _skip_agreement(rank, world, url):
    from dckpt.saver import AsyncSaver

    if rank == 0:  # rank 0's background thread lingers after the commit; rank 1's is done
        persist = AsyncSaver._persist_one

        def lingering(self, *args):
            info = persist(self, *args)
            time.sleep(1.5)
            return info

        AsyncSaver._persist_one = lingering
    first = dckpt.async_save(_state(1.0), url, step=1)
    if rank == 1:
        first.wait()  # done here, whatever the load on the machine
    else:
        time.sleep(0.5)  # within its 1.5 s linger after the commit
    busy = not dckpt.saver.default_saver()._in_flight.done()
    second = dckpt.async_save(_state(2.0), url, step=2,
                              config=dckpt.SaveConfig(if_busy="skip", collective_timeout_s=10))
    third = dckpt.async_save(_state(3.0), url, step=3)
    return busy, second.skipped, third.wait(timeout=60).step


def test_ranks_agree_to_skip_when_one_rank_is_still_busy(tmp_path):
    values = [o.value for o in run_ranks(_skip_agreement, 2, str(tmp_path))]
    assert values == [(True, True, 3), (False, True, 3)]
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1, 3]


def _busy_policies_apart(rank, world, url):
    first = dckpt.async_save(_state(1.0), url, step=1)
    t0 = time.monotonic()
    try:
        dckpt.async_save(_state(2.0), url, step=2, config=dckpt.SaveConfig(
            if_busy="skip" if rank else "wait", collective_timeout_s=30))
        return "staged", time.monotonic() - t0
    except dckpt.DckptError as e:
        return f"{type(e).__name__}: {e}", time.monotonic() - t0
    finally:
        first.wait(timeout=60)


def test_ranks_with_different_busy_policies_are_refused_alike_at_once(tmp_path):
    """One rank skips when busy, the other waits: they met the wrong collectives, and
    failed after the timeout; now the same ArgumentError on both, at once."""
    said = [o.value for o in run_ranks(_busy_policies_apart, 2, str(tmp_path))]
    assert said[0][0] == said[1][0] == (
        "ArgumentError: the ranks made different dckpt calls at once (dckpt.async_save("
        "if_busy='wait') on rank 0; dckpt.async_save(if_busy='skip') on rank 1); every rank "
        "calls the same collective function at the same point, with the same arguments "
        "where they must be alike"), said
    assert max(s for _, s in said) < 15, said  # not after the 30 s timeout
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]


def _destroyed_in_flight(rank, world, url):
    state = {"w": torch.arange(1 << 18, dtype=torch.float32)}
    dckpt.save(state, url, step=1)
    state["w"] += 1  # new blocks to write: the save is writing (held) when the group goes
    arm("gate")
    handle = dckpt.async_save(state, url, step=2)
    torch.distributed.destroy_process_group()  # the usual last line of a training script
    open_gate()
    try:
        handle.wait(timeout=60)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e).split(" failed on rank")[1].split("; wait")[0]
    finally:
        disarm()
    return "committed"


def test_a_process_group_destroyed_under_a_save_in_flight_says_so(tmp_path):
    """The save cannot commit without its collectives; it said "a collective with the other
    ranks broke (ValueError: Group ... is not registered)", as for a dead peer."""
    url = "faultyfile://" + str(tmp_path / "r")
    out = [o.value for o in run_ranks(_destroyed_in_flight, 2, url)]
    for rank, (kind, says) in enumerate(out):
        assert kind == "CommitError", out
        assert says == f" {rank}: the process group was destroyed (dist.destroy_process_group()) " \
                       "while it ran", out
    assert [c.step for c in dckpt.list_checkpoints(str(tmp_path / "r"))] == [1]


def _destroyed_before_the_persist_thread_ran(rank, world, url):
    import threading

    import dckpt.saver

    state = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    dckpt.save(state, url, step=1)
    go, run_save = threading.Event(), dckpt.saver.run_save

    def late(*args, **kwargs):  # the persist thread starts only after the destroy
        go.wait()
        return run_save(*args, **kwargs)

    dckpt.saver.run_save = late
    try:
        handle = dckpt.async_save(state, url, step=2)
        torch.distributed.destroy_process_group()
        go.set()
        handle.wait(timeout=60)
    except dckpt.DckptError as e:
        return type(e).__name__, "process group was destroyed" in str(e)
    finally:
        dckpt.saver.run_save = run_save
    return "committed"


def test_a_persist_thread_that_starts_after_the_destroy_fails_on_every_rank(tmp_path):
    """It took "no process group" for a save of one process: rank 1 committed step 2 alone
    and its handle said so, while rank 0's failed (seen under load in CI)."""
    url = "faultyfile://" + str(tmp_path / "r")
    out = [o.value for o in run_ranks(_destroyed_before_the_persist_thread_ran, 2, url)]
    assert out == [("CommitError", True)] * 2, out
    assert [c.step for c in dckpt.list_checkpoints(str(tmp_path / "r"))] == [1]

"""The memory tier on real gloo ranks: every rank restores from the same tier; a damaged
shard of one rank sends all of them to storage; a refusal is the same on every rank."""

from __future__ import annotations

import os

import torch

import dckpt
from dckpt import memory
from dckpt_testing import flip_stored_byte, run_ranks


def _state(rank: int, step: int) -> dict:
    return {"w": torch.full((256,), float(step)), f"rank{rank}.x": torch.full((8,), float(rank))}


def _save(rank, world, url, shm, steps):
    mgr = dckpt.CheckpointManager(url, save_every_steps=4, memory_every_steps=3,
                                  handle_signals=False, memory_dir=shm)
    for step in range(steps):
        mgr.maybe_save(step, _state(rank, step))
    mgr._poll(wait=True)
    mgr._close(remove_memory=False)  # as a crash would leave it
    return mgr.memory.step


def _restore(rank, world, url, shm):
    mgr = dckpt.CheckpointManager(url, memory_every_steps=3, handle_signals=False,
                                  memory_dir=shm)
    out = {"w": torch.zeros(256), f"rank{rank}.x": torch.zeros(8)}
    info = mgr.restore(out)
    mgr.close()
    return info.step, info.tier, out["w"][0].item(), out[f"rank{rank}.x"][0].item()


def test_ranks_restore_from_memory_and_all_fall_back_past_one_damaged_shard(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    assert [o.value for o in run_ranks(_save, 2, url, shm, 10)] == [9, 9]
    assert [o.value for o in run_ranks(_restore, 2, url, shm)] == [
        (9, "memory", 9.0, 0.0), (9, "memory", 9.0, 1.0)]
    assert not os.listdir(shm)  # the clean end removed it
    run_ranks(_save, 2, url, shm, 10)
    folder = memory.memory_folder(url, shm)
    flip_stored_byte(folder, 9, "rank1.x", mask=0x40)  # only rank 1 reads it
    assert [o.value for o in run_ranks(_restore, 2, url, shm)] == [
        (8, "storage", 8.0, 0.0), (8, "storage", 8.0, 1.0)]


def _too_small(rank, world, url, shm):
    if rank == 1:  # only one rank finds too little room: both refuse alike
        memory.MemoryTier.free_bytes = lambda self: 10  # type: ignore[method-assign]
    mgr = dckpt.CheckpointManager(url, memory_every_steps=1, handle_signals=False,
                                  memory_dir=shm)
    try:
        mgr.maybe_save(0, _state(rank, 0))
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    finally:
        mgr.close()
    return None


def test_a_refusal_for_room_is_the_same_on_every_rank(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    out = [o.value for o in run_ranks(_too_small, 2, url, shm)]
    assert out[0] == out[1] and out[0][0] == "StorageError" and "has 10;" in out[0][1]
    assert dckpt.list_checkpoints(url) == [] and not os.listdir(shm)


def _listing_fails_on_rank0(rank, world, url, shm):
    from dckpt import tiers

    if rank == 0:  # the storage stops answering where rank 0 lists it
        def broken(store):
            raise OSError("connection reset")
        tiers.committed_steps = broken
    mgr = dckpt.CheckpointManager(url, memory_every_steps=1, handle_signals=False,
                                  memory_dir=shm)
    try:
        mgr.restore(_state(rank, 0))
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    finally:
        mgr.close()
    return None


def test_a_storage_that_fails_at_restore_is_the_same_error_on_every_rank(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    out = [o.value for o in run_ranks(_listing_fails_on_rank0, 2, url, shm, timeout_s=60)]
    assert out[0] == out[1] and out[0][0] == "StorageError"
    assert "connection reset" in out[0][1] and "cannot list" in out[0][1]


def _second_job(rank, world, url, shm):
    try:
        mgr = dckpt.CheckpointManager(url, memory_every_steps=1, handle_signals=False,
                                      memory_dir=shm)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    mgr.maybe_save(0, _state(rank, 0))
    mgr.close()
    return mgr.memory.step


def test_a_tier_another_job_holds_is_refused_alike_on_every_rank(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    first = memory.MemoryTier(url, shm)  # this process: the first job's node leader
    first.lock()
    out = [o.value for o in run_ranks(_second_job, 2, url, shm)]
    assert out[0] == out[1] and out[0][0] == "StorageError", out
    assert f"in use by another job (process {os.getpid()} on" in out[0][1]
    assert os.listdir(first.folder) == [".lock"] and dckpt.list_checkpoints(url) == []
    first.unlock()  # the first job ends
    assert [o.value for o in run_ranks(_second_job, 2, url, shm)] == [0, 0]
    assert not os.listdir(shm)

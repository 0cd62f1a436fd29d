"""dckpt's DCP plug-ins used through DCP's own entry points, on real gloo ranks: the
Stager staging DTensors for dcp.async_save, and dcp.save with a dckpt.Writer deduplicating
its next save as dckpt.save does (nothing to call after a commit); and the dedup base that
restarted ranks take from the step they loaded."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dckpt
from dckpt_testing import run_ranks


def _stager_dtensor(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(64.0).reshape(8, 8), mesh, [Shard(0)])
    stager = dckpt.Stager()
    wants = {}
    for step in (1, 2):
        wants[step] = w.full_tensor().clone()
        future = dcp.async_save({"w": w}, storage_writer=dckpt.Writer(url, step=step),
                                async_stager=stager)
        w.to_local().add_(100.0)  # changes after staging are not in the checkpoint
        future.result(timeout=60)
    stager.close()
    got = {}
    for step in (1, 2):
        out = {"w": distribute_tensor(torch.zeros(8, 8), mesh, [Shard(0)])}
        dckpt.load(out, url, step=step)
        got[step] = torch.equal(out["w"].full_tensor(), wants[step])
    return got


def test_stager_stages_dtensors_for_dcp_async_save(tmp_path):
    url = str(tmp_path / "ckpt")
    assert [o.value for o in run_ranks(_stager_dtensor, 2, url)] == [{1: True, 2: True}] * 2


def _dcp_async_save_in_a_process(rank, world, url):
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    state = {f"w{rank}": torch.randn(256, 1024), "shared": torch.ones(1024)}
    wants = {}
    for step in (1, 2):
        wants[step] = {k: v.clone() for k, v in state.items()}
        future = dcp.async_save(state, storage_writer=dckpt.Writer(url, step=step),
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        state[f"w{rank}"][0] += 1  # after staging: not in this checkpoint
        future.result(timeout=120)
    got = {}
    for step in (1, 2):
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        dckpt.load(out, url, step=step)
        got[step] = all(torch.equal(out[k], v) for k, v in wants[step].items())
    return got


def test_dcp_async_save_in_its_checkpoint_process_takes_the_writer(tmp_path):
    """AsyncCheckpointerType.PROCESS pickles the writer to its checkpoint process: "cannot
    pickle '_thread.lock' object" before. The second save there is differential."""
    url = str(tmp_path / "ckpt")
    outcomes = run_ranks(_dcp_async_save_in_a_process, 2, url, timeout_s=240, daemon=False)
    assert [o.value for o in outcomes] == [{1: True, 2: True}] * 2
    first, second = dckpt.list_checkpoints(url)
    assert first.bytes_written >= 2 * 256 * 1024 * 4
    assert second.bytes_written < first.bytes_written / 4


def _dcp_save_twice(rank, world, url):
    state = {f"w{rank}": torch.randn(256, 1024), "shared": torch.ones(1024)}
    dcp.save(state, storage_writer=dckpt.Writer(url, step=1))
    state[f"w{rank}"][0] += 1  # one row of one block changes on each rank
    dcp.save(state, storage_writer=dckpt.Writer(url, step=2))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=dckpt.Reader(url, step=2))
    return all(torch.equal(out[k], v) for k, v in state.items())


def test_dcp_save_with_the_writer_deduplicates_the_next_save(tmp_path):
    url = str(tmp_path / "ckpt")
    assert [o.value for o in run_ranks(_dcp_save_twice, 2, url)] == [True, True]
    first, second = dckpt.list_checkpoints(url)
    assert first.bytes_written >= 2 * 256 * 1024 * 4
    assert second.bytes_written <= 2 * 256 * 1024  # one 256 KiB block per rank
    assert dckpt.verify(url, all_steps=True).ok


def _save(rank, world, url):
    torch.manual_seed(rank)
    dckpt.save({f"w{rank}": torch.randn(256, 1024), "shared": torch.ones(1024)}, url, step=1)


def _restart_load_save(rank, world, url, partial):
    torch.manual_seed(rank)
    want = torch.randn(256, 1024)
    state = {f"w{rank}": torch.zeros(256, 1024), "shared": torch.zeros(1024)}
    info = dckpt.load(state, url, partial=partial)
    loaded = torch.equal(state[f"w{rank}"], want)
    state[f"w{rank}"][0] += 1  # one block changes on each rank
    return loaded, info.step, dckpt.save(state, url, step=2).bytes_written


def test_restarted_ranks_deduplicate_their_first_save_against_the_step_they_loaded(tmp_path):
    """New processes know nothing of the last save: a load that read every byte makes that
    step the next save's base (the coordinator checks it), so the first save after a restart
    writes one block per rank; after a partial load it writes everything again."""
    url = str(tmp_path / "ckpt")
    run_ranks(_save, 2, url)
    got = [o.value for o in run_ranks(_restart_load_save, 2, url, False)]
    assert [g[:2] for g in got] == [(True, 1), (True, 1)]
    assert 0 < got[0][2] <= 2 * 256 * 1024  # one 256 KiB block per rank
    url2 = str(tmp_path / "ckpt2")
    run_ranks(_save, 2, url2)
    got = [o.value for o in run_ranks(_restart_load_save, 2, url2, True)]
    assert got[0][2] >= 2 * 256 * 1024 * 4 + 4096  # every block: nothing was verified whole
    assert dckpt.verify(url, all_steps=True).ok and dckpt.verify(url2, all_steps=True).ok


def test_a_checkpoint_id_other_than_the_plug_ins_repository_is_refused(tmp_path):
    """``dcp.save(..., checkpoint_id=X)`` with a dckpt Writer saved to the Writer's repository,
    not X, without a word."""
    import torch.distributed.checkpoint as dcp

    url, other = str(tmp_path / "repo"), str(tmp_path / "other")
    state = {"w": torch.ones(4)}
    with pytest.raises(dckpt.ArgumentError, match="is not dckpt.Writer's repository"):
        dcp.save(state, storage_writer=dckpt.Writer(url, step=1), checkpoint_id=other)
    assert not os.path.exists(url) and not os.path.exists(other)
    dcp.save(state, storage_writer=dckpt.Writer(url, step=1), checkpoint_id=f"file://{url}/")
    with pytest.raises(dckpt.ArgumentError, match="is not dckpt.Reader's repository"):
        dcp.load(state, storage_reader=dckpt.Reader(url, step=1), checkpoint_id=other)
    dcp.load(state, storage_reader=dckpt.Reader(url, step=1), checkpoint_id=url)
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1]


def test_a_checkpoint_id_spelled_with_a_tilde_is_the_same_repository(tmp_path, monkeypatch):
    """fsspec expands "~" in a local path: "~/repo" and its expansion are one repository."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.setenv("HOME", str(tmp_path))
    dcp.save({"w": torch.ones(4)}, storage_writer=dckpt.Writer("~/repo", step=1),
             checkpoint_id=str(tmp_path / "repo"))
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path / "repo"))] == [1]

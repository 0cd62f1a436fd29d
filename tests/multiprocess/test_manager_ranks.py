"""CheckpointManager on real gloo ranks: ranks agree on time triggers and on a signal that
reached one rank; TrainState's per-rank random states across a change of world size."""

from __future__ import annotations

import os
import signal
import time

import torch

import dckpt
from dckpt_testing import run_ranks


def _model_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, {"app": dckpt.TrainState(model, opt)}


def _time_trigger(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.05
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_every_seconds=0.3, async_save=False)
    saved = []
    t0 = time.monotonic()
    for step in range(60):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        if mgr.maybe_save(step, state) is not None:
            saved.append(step)
        time.sleep(0.01 + 0.01 * rank)  # the ranks' clocks run apart between saves
        torch.distributed.barrier()  # ... and the training keeps them in step
    elapsed = time.monotonic() - t0
    mgr.close()
    return saved, elapsed


def test_ranks_agree_on_the_time_trigger(tmp_path):
    url = str(tmp_path / "ckpt")
    (saved, elapsed), (other, _) = [o.value for o in run_ranks(_time_trigger, 2, url)]
    # at least 0.3 s apart (and the first save early): as many as the loop's time allows
    assert saved == other and 2 <= len(saved) <= elapsed / 0.3 + 1, (saved, elapsed)
    assert [c.step for c in dckpt.list_checkpoints(url)] == saved


def _signal_on_one_rank(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.02
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_every_steps=100, exit_on_preemption=False)
    step = -1
    for step in range(200):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        if rank == world - 1 and step == 10:
            os.kill(os.getpid(), signal.SIGUSR1)
        mgr.maybe_save(step, state)
        if mgr.preempted:
            break
        time.sleep(0.005)
    mgr.close()
    return step


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    url = str(tmp_path / "ckpt")
    steps = [o.value for o in run_ranks(_signal_on_one_rank, 3, url)]
    assert len(set(steps)) == 1 and 10 < steps[0] < 100, steps
    infos = dckpt.list_checkpoints(url)
    assert [c.step for c in infos] == [0, steps[0]] and infos[-1].world_size == 3


def _rng_save(rank, world, url):
    _, _, state = _model_state()
    torch.manual_seed(100 + rank)
    dckpt.save(state, url, step=1)
    return torch.rand(3).tolist()


def _rng_load(rank, world, url):
    _, _, state = _model_state()
    torch.manual_seed(7)
    dckpt.load(state, url)
    return torch.rand(3).tolist()


def test_random_states_per_rank_across_world_sizes(tmp_path):
    url = str(tmp_path / "ckpt")
    after_save = [o.value for o in run_ranks(_rng_save, 3, url)]
    assert after_save[0] != after_save[1]
    shrunk = [o.value for o in run_ranks(_rng_load, 2, url)]
    assert shrunk == after_save[:2]  # each rank continues its own stream
    grown = [o.value for o in run_ranks(_rng_load, 4, url)]
    assert grown[:3] == after_save
    torch.manual_seed(7)
    assert grown[3] == torch.rand(3).tolist()  # no state saved for rank 3: its own kept


def _improve(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.0  # an exchange in flight at every call, beside the broadcasts
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_on_improve=("val", "min"), async_save=False)
    saved = []
    vals = {3: 5.0, 6: 4.0, 9: 4.5, 12: 1.0}
    for step in range(15):
        opt.step()
        metrics = {"val": vals[step] + rank} if step in vals else None  # rank 0's decides
        if mgr.maybe_save(step, state, metrics) is not None:
            saved.append(step)
    mgr.close()
    return saved


def test_ranks_agree_on_the_metric_trigger(tmp_path):
    url = str(tmp_path / "ckpt")
    saved = [o.value for o in run_ranks(_improve, 2, url)]
    assert saved == [[3, 6, 12]] * 2
    assert [c.metrics["val"] for c in dckpt.list_checkpoints(url)] == [5.0, 4.0, 1.0]

"""dckpt's process groups follow the default group: a destroyed and re-created default group
(a second init in one process) gets new groups, never the old, dead ones."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as tdist

import dckpt
from dckpt import dist
from dckpt_testing import run_ranks


def _recreate(rank, world, url, init2):
    first = dist.checkpoint_group(30.0)
    dckpt.save({"x": torch.full((4,), float(rank))}, url, step=1)
    tdist.destroy_process_group()
    tdist.init_process_group("gloo", init_method=f"file://{init2}", rank=rank,
                             world_size=world)
    second = dist.checkpoint_group(30.0)
    t = torch.ones(1)
    tdist.all_reduce(t, group=second)
    info = dckpt.save({"x": torch.full((4,), float(rank) + 1)}, url, step=2)
    return second is not first, t.item(), info.step


def test_a_recreated_default_group_gets_new_checkpoint_groups(tmp_path):
    url = str(tmp_path / "ckpt")
    init2 = tempfile.mktemp(prefix="dckpt-pg2-")
    out = [o.value for o in run_ranks(_recreate, 2, url, init2)]
    assert out == [(True, 2.0, 2)] * 2
    assert [c.step for c in dckpt.list_checkpoints(url)] == [1, 2]


def _timeouts_apart(rank, world, root):
    state = {"w": torch.arange(8.0), "x": torch.ones(4)}
    out = []
    # per call, (rank 0's timeout, rank 1's): apart, then alike, then alike at another value
    for call, timeouts in enumerate([(10, 20), (20, 20), (10, 10), (30, 40)]):
        url = f"{root}/c{call}"
        dckpt.save(state, url, step=call + 1,
                   config=dckpt.SaveConfig(collective_timeout_s=timeouts[rank]))
        back = {"w": torch.zeros(8), "x": torch.zeros(4)}
        info = dckpt.load(back, url,
                          config=dckpt.LoadConfig(collective_timeout_s=timeouts[1 - rank]))
        out.append((info.step, all(torch.equal(back[k], state[k]) for k in state)))
    return out


def test_ranks_that_pass_different_timeouts_still_meet(tmp_path):
    """A group per purpose, its timeout set per call: with groups keyed by timeout, the ranks
    made different ones and every save and load after the first failed after the timeout."""
    out = [o.value for o in run_ranks(_timeouts_apart, 2, str(tmp_path), timeout_s=120)]
    assert out == [[(1, True), (2, True), (3, True), (4, True)]] * 2


def _shortened(rank, world, url):
    import time

    dckpt.save({"x": torch.ones(4)}, url, step=1,
               config=dckpt.SaveConfig(collective_timeout_s=120.0))  # the group is made
    if rank == 1:
        time.sleep(8)  # never comes to the second save
        return None
    t0 = time.monotonic()
    try:
        dckpt.save({"x": torch.ones(4)}, url, step=2,
                   config=dckpt.SaveConfig(collective_timeout_s=2.0))
    except dckpt.CommitError:
        return time.monotonic() - t0
    return "saved"


def test_a_later_shorter_timeout_applies_to_the_group_made_with_a_longer_one(tmp_path):
    seconds = run_ranks(_shortened, 2, str(tmp_path / "ckpt"), timeout_s=60)[0].value
    assert isinstance(seconds, float) and seconds < 6, seconds  # 2 s, not the 120 s made with

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

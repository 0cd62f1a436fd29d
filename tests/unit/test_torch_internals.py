"""The private torch parts dckpt relies on (dckpt/torch_internals.py) still exist and behave
as dckpt uses them, on the torch this suite runs against."""

from __future__ import annotations

import pytest
import torch

from dckpt import torch_internals as ti
from dckpt_testing import run_ranks


def test_narrow_tensor_by_index_takes_a_box():
    t = torch.arange(24).reshape(4, 6)
    box = ti.narrow_tensor_by_index(t, [1, 2], [2, 3])
    assert torch.equal(box, t[1:3, 2:5])
    box.fill_(-1)  # a view: the reader copies into it
    assert int((t == -1).sum()) == 6


def test_foreach_copy_copies_each_source_by_value():
    srcs = [torch.arange(6.0).reshape(2, 3).t(), torch.ones(3, dtype=torch.int16) * 7,
            torch.randn(4, dtype=torch.complex64).conj()]
    dsts = [torch.empty(s.shape, dtype=s.dtype) for s in srcs]
    ti.foreach_copy(dsts, srcs)
    assert all(torch.equal(d, s.resolve_conj()) for d, s in zip(dsts, srcs))


def test_set_element_puts_a_value_at_its_path():
    root = {"a": {"b": [0, 1]}}
    ti.set_element(root, ("a", "b", 1), "x")
    ti.set_element(root, ("a", "c"), 3)
    assert root == {"a": {"b": [0, "x"], "c": 3}}


def _dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(8.0).reshape(4, 2)
    d = distribute_tensor(full, mesh, [Shard(0)])
    local = ti.local_shard(d)
    again = ti.with_local_shard(d, local * 10)
    return (ti.is_dtensor(d), ti.is_dtensor(full), local.tolist(),
            ti.is_dtensor(again), list(again.shape), again.placements == d.placements,
            again.full_tensor().tolist())


def test_dtensors_are_recognised_and_rebuilt_over_a_new_shard():
    out = [o.value for o in run_ranks(_dtensor, 2)]
    full = torch.arange(8.0).reshape(4, 2)
    for rank, (is_d, is_plain, local, again, shape, same, gathered) in enumerate(out):
        assert is_d and not is_plain and again and same
        assert local == full[2 * rank: 2 * rank + 2].tolist()
        assert shape == [4, 2] and gathered == (full * 10).tolist()


def _sharded_tensor(rank, world):
    import warnings

    import torch.distributed._shard.sharded_tensor as st
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    t = st.zeros(spec, 3, 2)
    held = ti.held_tensors(t)
    plain = torch.ones(2)
    return (ti.is_sharded_tensor(t), ti.is_sharded_tensor(plain), [list(h.shape) for h in held],
            ti.held_tensors(plain)[0] is plain)


def test_sharded_tensors_are_recognised_and_hold_their_local_shards():
    out = [o.value for o in run_ranks(_sharded_tensor, 2)]
    assert out == [(True, False, [[2, 2]], True), (True, False, [[1, 2]], True)]


def test_load_state_dict_takes_the_arguments_dckpt_passes():
    import inspect

    params = inspect.signature(ti.load_state_dict).parameters
    assert {"state_dict", "storage_reader", "planner", "process_group", "no_dist"} <= set(params)


def test_dist_wrapper_runs_the_steps_and_carries_a_failure_as_a_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException

    dw = ti.DistWrapper(None, False, 0)
    assert dw.is_coordinator
    assert dw.reduce_scatter("plan", lambda: 3, lambda xs: [x * 10 for x in xs]) == 30
    assert dw.all_reduce("write", lambda: 4, lambda xs: sum(xs) + 1) == 5

    def fails():
        raise ValueError("no room")

    for call in (lambda: dw.reduce_scatter("plan", fails, lambda xs: xs),
                 lambda: dw.all_reduce("write", lambda: 1, lambda xs: fails())):
        with pytest.raises(CheckpointException) as caught:
            call()
        assert "no room" in str(caught.value.failures[0])

"""ShardedTensors (FSDP1's sharded state dicts) on real gloo ranks: DCP saves and reshards
them, and so must dckpt, in every path that takes a state dict. Their own strides, sizes
in bytes and flags raise; a save once failed on them with a RuntimeError from the checks."""

from __future__ import annotations

import os
import warnings

import torch

import dckpt
from dckpt_testing import run_ranks

ROWS = 3  # over 4 ranks: the last holds an empty shard
FULL = torch.arange(ROWS * 4, dtype=torch.float32).reshape(ROWS, 4)


def _sharded(world: int, fill: float | None = None):
    import torch.distributed._shard.sharded_tensor as st
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    t = st.empty(spec, ROWS, 4)
    for shard in t.local_shards():
        rows = slice(shard.metadata.shard_offsets[0],
                     shard.metadata.shard_offsets[0] + shard.metadata.shard_sizes[0])
        shard.tensor.copy_(FULL[rows] if fill is None else torch.full_like(FULL[rows], fill))
    return t


def _held(t) -> dict[int, list]:
    return {shard.metadata.shard_offsets[0]: shard.tensor.tolist() for shard in t.local_shards()}


def _save(rank, world, url, shm):
    t = _sharded(world)
    handle = dckpt.async_save({"st": t, "epoch": 3}, url, step=1)
    for shard in t.local_shards():  # after the pause: the checkpoint keeps what was staged
        shard.tensor.add_(1000)
    handle.wait()
    again = dckpt.save({"st": _sharded(world), "epoch": 3}, url, step=2)
    mgr = dckpt.CheckpointManager(url + "/managed", save_every_steps=5, memory_every_steps=1,
                                  handle_signals=False, memory_dir=shm)
    mgr.maybe_save(5, {"st": _sharded(world)})
    mgr._poll(wait=True)
    mgr._close(remove_memory=False)  # as a crash would leave it
    return again.bytes_written


def _load(rank, world, url, shm):
    out = {"st": _sharded(world, fill=-1.0), "epoch": 0}
    info = dckpt.load(out, url, step=1)
    mgr = dckpt.CheckpointManager(url + "/managed", memory_every_steps=1,
                                  handle_signals=False, memory_dir=shm)
    restored = {"st": _sharded(world, fill=-1.0)}
    tier = mgr.restore(restored)
    mgr.close()
    return info.step, out["epoch"], _held(out["st"]), tier.step, tier.tier, _held(restored["st"])


def _expected(world: int) -> list[dict[int, list]]:
    per = -(-ROWS // world)  # ChunkShardingSpec's rows per rank
    return [{r * per: FULL[r * per: (r + 1) * per].tolist()} for r in range(world)]


def test_sharded_tensors_save_async_and_differential_and_reshard_on_load(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    assert [o.value for o in run_ranks(_save, 4, url, shm)] == [0] * 4  # nothing changed
    for world in (4, 2):
        got = [o.value for o in run_ranks(_load, world, url, shm)]
        assert [(step, epoch) for step, epoch, *_ in got] == [(1, 3)] * world
        assert [held for _, _, held, *_ in got] == _expected(world)
        # the memory tier holds 4 ranks' shards, and the clean end of the first restore
        # removed them: the second restores from storage
        tier = "memory" if world == 4 else "storage"
        assert [(s, t, held) for *_, s, t, held in got] == [
            (5, tier, h) for h in _expected(world)]
    whole = {"st": torch.zeros(ROWS, 4)}  # one process, a plain tensor: the whole of it
    dckpt.load(whole, url, step=2, partial=True)
    assert torch.equal(whole["st"], FULL)
    assert dckpt.verify(url, step=1).ok


def _stage_for_dcp(rank, world):
    try:
        dckpt.Stager().stage({"st": _sharded(world)})
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    return None


def test_dcp_stager_refuses_a_sharded_tensor_by_name():
    out = [o.value for o in run_ranks(_stage_for_dcp, 2)]
    assert out[0] == out[1] and out[0][0] == "StateDictError"
    assert "ShardedTensor" in out[0][1] and "dckpt.async_save" in out[0][1]


def _fsdp1(rank, world, url):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore", category=FutureWarning)

    def build(seed: int):
        torch.manual_seed(seed)
        # the last layer lies whole in one rank's part of the flat parameter: the other
        # rank's ShardedTensors of it hold no shard
        layers = (torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                  torch.nn.ReLU(), torch.nn.Linear(32, 1))
        model = FSDP(torch.nn.Sequential(*layers), device_id=torch.device("cpu"),
                     use_orig_params=True)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(model, optimizer, x):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        return model(x)

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(rank))
    model, optimizer = build(0)
    step(model, optimizer, x)
    kinds = {type(v).__name__ for v in get_state_dict(model, optimizer)[0].values()}
    dckpt.save({"app": dckpt.TrainState(model, optimizer)}, url, step=1)
    again, again_optimizer = build(1)  # other weights, no optimizer state
    dckpt.load({"app": dckpt.TrainState(again, again_optimizer)}, url)
    # the move off FSDP1, deprecated: the same checkpoint into FSDP2 (DTensors)
    torch.manual_seed(2)
    fsdp2 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    fully_shard(fsdp2, mesh=init_device_mesh("cpu", (world,)))
    fsdp2_optimizer = torch.optim.AdamW(fsdp2.parameters(), lr=0.1)
    dckpt.load({"app": dckpt.TrainState(fsdp2, fsdp2_optimizer)}, url)
    out = step(model, optimizer, x)
    return (kinds, torch.equal(out, step(again, again_optimizer, x)),
            torch.equal(out, step(fsdp2, fsdp2_optimizer, x)))


def test_an_fsdp1_model_and_optimizer_come_back_and_train_on_bit_equal(tmp_path):
    """Into FSDP1 again and into FSDP2: the next step's output is bit-equal to the saved
    model's own."""
    assert [o.value for o in run_ranks(_fsdp1, 2, str(tmp_path))] == [
        ({"ShardedTensor"}, True, True)] * 2

"""An FSDP2 (``fully_shard``) training run on dckpt's CheckpointManager: parameters and
AdamW state are saved sharded, each rank writing its own shards, and load on another world
size (DCP reshards). CPU with gloo here, CUDA with NCCL where there is a GPU per rank:

    torchrun --standalone --nproc-per-node=4 launch/train_fsdp2.py --ckpt runs/fsdp --steps 20
    torchrun --standalone --nproc-per-node=2 launch/train_fsdp2.py --ckpt runs/fsdp --steps 30

The second command resumes the first's checkpoint on 2 ranks. ``--out`` writes the full
(unsharded) model and optimizer state, gathered on rank 0, for comparison.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

import dckpt


def build(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank, as FSDP expects
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--out", help="rank 0 writes the full model and optimizer state here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,))
    model = build(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress = {"step": -1}
    state = {"app": dckpt.TrainState(model, opt, extra=progress)}
    mgr = dckpt.CheckpointManager(args.ckpt, save_every_steps=args.save_every,
                                  retention=dckpt.KeepLast(2))
    info = mgr.restore(state)
    start = progress["step"] + 1 if info else 0
    if rank == 0:
        print(f"[fsdp2] {world} ranks on {device.type}: "
              + (f"resumed step {info.step} (saved by {info.world_size} ranks)" if info
                 else "fresh start"), flush=True)
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x = torch.randn(16, 32, generator=g).to(device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress["step"] = step
        if step == args.steps - 1:
            mgr.save(step, state, {"loss": loss.item()})
        else:
            mgr.maybe_save(step, state, {"loss": loss.item()})
    mgr.close()
    if args.out:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        if rank == 0:
            torch.save({"model": msd, "optim": osd["state"]}, args.out)
            print(f"[fsdp2] full state in {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

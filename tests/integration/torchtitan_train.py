"""torchtitan's training loop in small, on CPU with gloo under torchrun: a model sharded with
FSDP2, torchtitan's own OptimizersContainer, LRSchedulersContainer,
ParallelAwareDataloader and checkpoint manager contract, driven as ``Trainer.train`` drives
them (torchtitan's Trainer itself needs a GPU).

    torchrun --nproc-per-node 2 torchtitan_train.py --dir D --manager dckpt|own \
        [--kill-at-step N] [--steps 20] [--hf-assets A [--initial-hf] [--final-hf]] \
        [--seed-checkpoint] --out final.pt

``--manager own``: torchtitan's DCP CheckpointManager. ``--kill-at-step N``: rank 1
SIGKILLs itself when step N begins. ``--hf-assets``: a state dict adapter (Hugging Face
names for the model's keys) whose assets folder ``--initial-hf`` loads from and whose index
file, if any, ``--final-hf`` writes by. ``--seed-checkpoint`` (one rank, as torchtitan
requires): save step 0 of other initial weights, as torchtitan's ``create_seed_checkpoint``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from frameworks import leave
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import IterableDataset
from torchtitan.components.checkpointer.dcp import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from dckpt.integrations.torchtitan import DckptCheckpointManager


class Samples(IterableDataset):
    """An endless stream of (x, y), the same for a given data-parallel rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        while True:
            x = torch.randn(16, generator=g)
            yield x, x[:4].sum(0, keepdim=True)


class Progress(Stateful):
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])


class Adapter(StateDictAdapter):
    """The test model's keys under Hugging Face names, as a model's state dict adapter
    gives them (torchtitan's base class: its index file, its DCP reader)."""

    def to_hf(self, state_dict: dict) -> dict:
        return {f"model.layers.{k}": v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict) -> dict:
        return {k.removeprefix("model.layers."): v for k, v in hf_state_dict.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--manager", choices=["dckpt", "own"], default="dckpt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--hf-assets", default=None, help="the adapter's hf_assets_path")
    p.add_argument("--initial-hf", action="store_true", help="initial_load_in_hf")
    p.add_argument("--final-hf", action="store_true", help="last_save_in_hf, in bfloat16")
    p.add_argument("--seed-checkpoint", action="store_true",
                   help="as torchtitan's create_seed_checkpoint: save step 0 and stop")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1 if args.seed_checkpoint else 0)  # a seed's weights differ from a start's
    # IMPORTANT: no dropout. Trainer.train makes the data iterator after the load, and
    # making one draws from the global random stream: a resumed run's stream is one draw
    # off an uninterrupted run's, with any manager
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 1e-2})],
        implementation="for-loop").build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
        optimizers=optimizers, training_steps=args.steps)
    loader = ParallelAwareDataloader(Samples(rank), dp_rank=rank, dp_world_size=world,
                                     batch_size=4)
    progress = Progress()
    manager = DckptCheckpointManager if args.manager == "dckpt" else CheckpointManager
    hf = dict(initial_load_in_hf=args.initial_hf, last_save_in_hf=args.final_hf,
              export_dtype="bfloat16" if args.final_hf else "float32")
    checkpointer = manager.Config(enable=True, folder="checkpoint", interval=4,
                                  keep_latest_k=2,
                                  create_seed_checkpoint=args.seed_checkpoint, **hf).build(
        dataloader=loader, model_parts=[model], optimizers=optimizers,
        lr_schedulers=schedulers, states={"train_state": progress},
        sd_adapter=Adapter(None, args.hf_assets) if args.hf_assets else None,
        base_folder=args.dir)
    if args.seed_checkpoint:  # as torchtitan's train.py does
        checkpointer.save(curr_step=0, last_step=True)
        checkpointer.close()
        return
    loaded = checkpointer.load(step=-1)  # as Trainer.train does
    print(f"rank {rank}: starting at step {progress.step + 1}, loaded: {loaded}", flush=True)
    batches = iter(loader)
    while progress.step < args.steps:
        progress.step += 1
        if args.kill_at_step == progress.step and rank == 1:
            print(f"rank 1: SIGKILL at step {progress.step}", flush=True)
            time.sleep(0.5)  # rank 0 past the last save's staging
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = next(batches)
        nn.functional.mse_loss(model(x), y).backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        checkpointer.save(progress.step, last_step=progress.step == args.steps)
    checkpointer.close()
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if rank == 0 and args.out:
        torch.save(weights, args.out)
        print("DONE", flush=True)


if __name__ == "__main__":
    main()
    leave()

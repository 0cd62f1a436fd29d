"""A DDP training run (gloo, CPU) on dckpt's CheckpointManager: periodic async checkpoints,
retention, a preemption checkpoint on SIGTERM / SIGUSR1, and automatic resume. Launch with
torchrun, e.g.:

    torchrun --standalone --nproc-per-node=2 launch/train_ddp.py --ckpt runs/ckpt --steps 60

Under ``torchrun --max-restarts=N`` a killed worker makes torchrun restart the group, and the
restarted workers resume from the newest checkpoint with no manual step (set
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: see launch/restarts.sh).

Data is a pure function of (seed, step, rank) and the random states (dropout) are
checkpointed, so a resumed run computes exactly what an uninterrupted run computes, and its
final weights match bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dckpt


def batch(seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    x = torch.randn(32, 64, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True, help="checkpoint repository (path or URL)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=3, help="retention: newest checkpoints kept")
    p.add_argument("--step-seconds", type=float, default=0.05, help="pause per step")
    p.add_argument("--out", help="rank 0 writes the final weights here (torch.save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync", action="store_true", help="synchronous saves")
    p.add_argument("--memory-every", type=int, default=None,
                   help="memory tier: checkpoint into node memory (/dev/shm) every N steps")
    p.add_argument("--memory-dir", default=None, help="the memory tier's parent folder")
    p.add_argument("--memory-replicas", type=int, default=0,
                   help="memory tier: copies of each rank's memory checkpoint on other nodes")
    p.add_argument("--stop-at", type=int, default=None,
                   help="fault drill: at this step every rank waits for its saves, says so "
                        "and stops answering (for a test to kill a node)")
    p.add_argument("--crash-at", type=int, default=None,
                   help="fault drill: in the first attempt, rank 1 SIGKILLs itself at this step")
    args = p.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.1), torch.nn.Linear(128, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    progress = {"step": -1}
    state = {"app": dckpt.TrainState(model, opt, scheduler=sched, extra=progress)}

    def on_save(info: dckpt.CheckpointInfo) -> None:
        if rank == 0:
            print(f"[train] checkpoint of step {info.step} committed ({info.bytes_written} "
                  f"bytes written, {info.phase_s.get('total', 0) * 1000:.0f} ms)", flush=True)

    mgr = dckpt.CheckpointManager(args.ckpt, save_every_steps=args.save_every,
                                  retention=dckpt.KeepLast(args.keep_last),
                                  async_save=not args.sync, on_save=on_save,
                                  memory_every_steps=args.memory_every,
                                  memory_dir=args.memory_dir,
                                  memory_replicas=args.memory_replicas)
    info = mgr.restore(state)
    start = progress["step"] + 1 if info else 0
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    tiers: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(tiers, info.tier if info else None)
    if rank == 0:
        if info:
            skipped = f", skipped {[s for s, _ in info.skipped]}" if info.skipped else ""
            print(f"[train] resumed from step {info.step} (torchrun restart {restarts}) in "
                  f"{info.phase_s['total']:.2f} s from {info.tier}{skipped}; ranks read from "
                  f"{','.join(map(str, tiers))}", flush=True)
        else:
            print("[train] no checkpoint: starting from step 0", flush=True)

    for step in range(start, args.steps):
        if args.crash_at == step and rank == 1 and restarts == 0:
            print(f"[train] rank 1: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        model.train()
        x, y = batch(args.seed, step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress["step"] = step
        last = step == args.steps - 1
        if last:
            mgr.save(step, state, metrics={"loss": loss.item()})
        else:
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
        time.sleep(args.step_seconds)
        if step == args.stop_at:
            mgr.wait()
            print(f"[train] rank {rank}: stopped at step {step}", flush=True)
            agent = os.getppid()
            while os.getppid() == agent:  # until the agent is killed: then leave with it
                time.sleep(0.5)
            os._exit(1)
    mgr.close()
    if rank == 0 and args.out:
        torch.save(model.module.state_dict(), args.out)
        print(f"[train] done: final weights in {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A multi-stage pipeline on dckpt: three stages trained in turn (each its own model), the
progress saved with every checkpoint, and a restart that skips the finished stages and
resumes the cut one. Launch with torchrun, e.g.:

    torchrun --standalone --nproc-per-node=2 launch/pipeline.py --ckpt runs/pipe
    dckpt status runs/pipe            # stages done, with their results; the current one

Checkpoint steps are global: stage i's step s is saved as step i * 10_000 + s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dckpt

STAGES = {"pretrain": (64, 30), "finetune": (32, 20), "distill": (16, 25)}
"""stage: (hidden width, steps)"""


def run_stage(name: str, pipe: dckpt.Pipeline, mgr: dckpt.CheckpointManager, index: int,
              crash_at: tuple[str, int] | None) -> float:
    width, steps = STAGES[name]
    rank = dist.get_rank()
    torch.manual_seed(index)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(),
                                    torch.nn.Linear(width, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = {"pipeline": pipe, "app": dckpt.TrainState(model, opt)}
    if pipe.resuming:
        info = mgr.restore(state, step=mgr.restored.step)
        if rank == 0:
            print(f"[pipeline] {name}: resumed at step {pipe.step} (checkpoint {info.step})",
                  flush=True)
    elif rank == 0:
        print(f"[pipeline] {name}: starting", flush=True)
    loss = torch.zeros(())
    for step in range(pipe.step + 1, steps):
        if (crash_at == (name, step) and rank == 0
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"[pipeline] rank {rank}: SIGKILL in {name} at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(1000 * index + 10 * step + rank)
        x = torch.randn(32, 16, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.mean(dim=1, keepdim=True).cos())
        opt.zero_grad()
        loss.backward()
        opt.step()
        pipe.step = step
        mgr.maybe_save(index * 10_000 + step, state, metrics={"loss": loss.item()})
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--crash-at", help="fault drill, STAGE:STEP: rank 0 SIGKILLs itself there "
                                      "(first attempt only)")
    p.add_argument("--out", help="rank 0 writes the stages' results here (JSON)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    dist.init_process_group("gloo")
    crash_at = None
    if args.crash_at:
        stage, step = args.crash_at.split(":")
        crash_at = (stage, int(step))
    pipe = dckpt.Pipeline(list(STAGES))
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun restarts (see launch/restarts.sh)
    mgr = dckpt.CheckpointManager(args.ckpt, save_every_steps=args.save_every,
                                  retention=dckpt.KeepLast(2))
    # where the run stood: only the pipeline's progress (the stage's model is built below)
    mgr.restore({"pipeline": pipe}, partial=True)
    if dist.get_rank() == 0:
        for name in pipe.done:
            print(f"[pipeline] {name}: done before, skipped ({pipe.results[name]})", flush=True)
    for name in pipe:  # the stages not finished, in order
        index = pipe.stages.index(name)
        loss = run_stage(name, pipe, mgr, index, crash_at)
        mean = torch.tensor(loss, dtype=torch.float64)  # every rank's loss differs: the
        dist.all_reduce(mean)  # results are saved once, so every rank records their mean
        loss = mean.item() / dist.get_world_size()
        pipe.finish(name, final_loss=loss)
        if dist.get_rank() == 0:
            print(f"[pipeline] {name}: finished, final loss {loss:.6f}", flush=True)
    if not mgr.restored or mgr.restored.step < len(STAGES) * 10_000:
        mgr.save(len(STAGES) * 10_000, {"pipeline": pipe})  # the progress: all stages done
    mgr.close()
    if dist.get_rank() == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(pipe.results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

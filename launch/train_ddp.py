"""A DDP training run (gloo, CPU) that checkpoints with dckpt and resumes from the newest
committed checkpoint. Launch with torchrun, e.g.:

    torchrun --standalone --nproc-per-node=2 launch/train_ddp.py --ckpt runs/ckpt --steps 60

Data is a pure function of (seed, step, rank), so a resumed run sees exactly the batches an
uninterrupted run sees, and its final weights match bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
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
    p.add_argument("--step-seconds", type=float, default=0.05, help="pause per step")
    p.add_argument("--out", help="rank 0 writes the final weights here (torch.save)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                    torch.nn.Linear(128, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def state() -> dict:
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd, "step": -1}

    start = 0
    if dckpt.list_checkpoints(args.ckpt) if os.path.exists(args.ckpt) else []:
        st = state()
        t0 = time.perf_counter()
        info = dckpt.load(st, args.ckpt)
        set_state_dict(model, opt, model_state_dict=st["model"], optim_state_dict=st["optim"])
        start = st["step"] + 1
        if rank == 0:
            skipped = f", skipped {[s for s, _ in info.skipped]}" if info.skipped else ""
            print(f"[train] resumed from step {info.step} in {time.perf_counter() - t0:.2f} s"
                  f"{skipped}", flush=True)
    elif rank == 0:
        print("[train] no checkpoint: starting from step 0", flush=True)

    for step in range(start, args.steps):
        x, y = batch(args.seed, step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.save_every == 0 or step == args.steps - 1:
            st = state()
            st["step"] = step
            info = dckpt.save(st, args.ckpt, step=step, metrics={"loss": loss.item()})
            if rank == 0:
                print(f"[train] step {step}: loss {loss.item():.5f}, checkpoint committed "
                      f"({info.bytes_written} bytes, {info.phase_s['total'] * 1000:.0f} ms)",
                      flush=True)
        time.sleep(args.step_seconds)

    if rank == 0 and args.out:
        torch.save(model.module.state_dict(), args.out)
        print(f"[train] done: final weights in {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

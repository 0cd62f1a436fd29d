"""A small GPT-2 (2 layers, dropout on) trained on random tokens, under torchrun on CPU with
gloo: through the transformers Trainer or a plain Accelerate loop, checkpointing every 4
steps, keeping 2.

    torchrun --nproc-per-node 2 hf_train.py --dir D --mode trainer|accelerate \
        [--own] [--resume] [--kill-at-step N] --out final.pt

``--own``: the framework's own checkpointing (Trainer's files, accelerator.save_state)
instead of dckpt's. ``--kill-at-step N``: rank 1 SIGKILLs itself at global step N.
``--fail-pointer read|write``: rank 0's reads (or writes) of the checkpoint folders' pointer
files fail with ENOSPC; each rank prints what it raised.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from frameworks import leave
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

STEPS, EVERY, KEEP = 24, 4, 2


def model_and_data() -> tuple[GPT2LMHeadModel, list[dict]]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2))
    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": t, "labels": t} for t in tokens]


def kill_now(step: int, at: int | None, rank: int) -> None:
    if at is not None and step == at and rank == 1:
        print(f"rank 1: SIGKILL at step {at}", flush=True)
        time.sleep(0.5)  # rank 0 past the last save's staging
        os.kill(os.getpid(), signal.SIGKILL)


class Kill(TrainerCallback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        kill_now(state.global_step, self.at, args.process_index)


def trainer(args) -> dict:
    import transformers

    from dckpt.integrations import hf

    model, data = model_and_data()
    targs = TrainingArguments(
        output_dir=args.dir, per_device_train_batch_size=4, max_steps=STEPS,
        save_strategy="steps", save_steps=EVERY, save_total_limit=KEEP, learning_rate=1e-3,
        warmup_steps=2, logging_steps=1000, report_to=[], seed=0, data_seed=0, use_cpu=True,
        ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True)
    cls = transformers.Trainer if args.own else hf.Trainer
    t = cls(model=model, args=targs, train_dataset=data, callbacks=[Kill(args.kill_at_step)])
    t.train(resume_from_checkpoint=True if args.resume else None)
    return model.state_dict()


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])


def accelerate(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from dckpt.integrations.hf import AcceleratorCheckpoints

    a = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=args.dir, automatic_checkpoint_naming=True, total_limit=KEEP),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(0)
    model, data = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model, opt, loader, sched = a.prepare(model, opt, loader, sched)
    progress = Progress()
    a.register_for_checkpointing(progress)
    ckpt = None if args.own else AcceleratorCheckpoints(a)
    if args.resume:
        if ckpt is None:
            a.load_state()  # Accelerate leaves the folder counter at 0: set it as users must
            a.project_configuration.iteration = 1 + max(
                int(n.rsplit("_", 1)[1]) for n in os.listdir(os.path.join(args.dir, "checkpoints")))
        else:
            ckpt.load_state()
    per_epoch = len(loader)
    while progress.step < STEPS:
        epoch, done = divmod(progress.step, per_epoch)
        loader.set_epoch(epoch)
        batches = a.skip_first_batches(loader, done) if done else loader
        for batch in batches:
            kill_now(progress.step, args.kill_at_step, a.process_index)
            model.train()
            loss = model(**batch).loss
            a.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step += 1
            if progress.step % EVERY == 0:
                if ckpt is None:
                    a.save_state()
                else:
                    ckpt.save_state()
            if progress.step == STEPS:
                break
    if ckpt is not None:
        ckpt.close()
    return a.unwrap_model(model).state_dict()


def fail_pointer(kind: str) -> None:
    import errno

    from dckpt.integrations import hf

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    setattr(hf, f"{kind}_pointer", full)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", choices=["trainer", "accelerate"], default="trainer")
    p.add_argument("--own", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--fail-pointer", choices=["read", "write"], default=None)
    args = p.parse_args()
    if args.fail_pointer and os.environ.get("RANK") == "0":
        fail_pointer(args.fail_pointer)
    try:
        weights = (trainer if args.mode == "trainer" else accelerate)(args)
    except Exception as e:
        if not args.fail_pointer:
            raise
        sys.stdout.flush()  # then one write, a line of its own: the ranks share the pipe
        os.write(1, f"\nrank {os.environ.get('RANK')} raised {type(e).__name__}: {e}\n".encode())
        os._exit(0)  # not 1: torchrun would stop the other rank before it printed
    if int(os.environ.get("RANK", "0")) == 0 and args.out:
        torch.save({k: v.detach().clone() for k, v in weights.items()}, args.out)
        print("DONE", flush=True)


if __name__ == "__main__":
    main()
    leave()

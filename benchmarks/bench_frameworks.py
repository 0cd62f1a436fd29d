"""Save pause and restore time inside Lightning, the transformers Trainer, Accelerate and
torchtitan (its checkpoint manager, FSDP2, own: DCP with async_mode="async"):
each framework's own checkpointing against dckpt's integration, same model, same run.

    torchrun --nproc-per-node 2 benchmarks/bench_frameworks.py --framework lightning \
        [--mparams 32] [--repeat 3] [--saves N] [--data-dir bench-data] [--out bench-out/frameworks.jsonl]

A DDP MLP of ``--mparams`` million float32 parameters with Adam (state: 3x the weights) on
2 gloo ranks. ``pause``: the framework's save call, from entry to return (dckpt: async,
staged); ``commit``: dckpt's save until committed; ``restore``: the framework's load calls
into the live model and optimizer from a cold page cache (both evicted: dckpt writes with
O_DIRECT, so its files are not cached, while the frameworks' are), and a read of every byte
after (a framework that maps its files reads them only then). ``memcpy``: one copy of the
state in memory, the hardware reference. One JSON line per (framework, saver), medians.
Before each save every float value of the model and of the optimizer states changes (a
training step's worth), so a differential save has every block to write.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist
from common import evict
from torch import nn


def mlp(mparams: int) -> nn.Module:
    width = 2048
    layers = max(1, mparams * 1_000_000 // (width * width))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def state_bytes(model: nn.Module) -> int:
    """The model and Adam's two moments, on this rank (its shards under FSDP2)."""
    return 3 * sum(getattr(p, "_local_tensor", p).numel() * p.element_size()
                   for p in model.parameters())


def memcpy_s(nbytes: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)  # both faulted in: the copy alone is timed
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def touch(model: nn.Module, optimizers: list) -> float:
    """Read every byte of the model and the optimizer states."""
    total = sum(float(getattr(p, "_local_tensor", p).detach().sum()) for p in model.parameters())
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(float(getattr(v, "_local_tensor", v).sum()) for v in state.values()
                         if torch.is_tensor(v))
    return total


def train_step(model: nn.Module, optimizers: list) -> None:
    """Change every float value of the model and the optimizer states, as a training step
    does: a save after it has every block to write (a differential save skips nothing)."""
    with torch.no_grad():
        tensors = [getattr(p, "_local_tensor", p) for p in model.parameters()]
        for opt in optimizers:
            for state in opt.state.values():
                tensors += [getattr(v, "_local_tensor", v) for v in state.values()
                            if torch.is_tensor(v) and v.is_floating_point() and v.dim()]
        for t in tensors:
            t.add_(1e-3)


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def lightning_runs(args, folder: str):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from dckpt.integrations import lightning as dl

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(args.mparams)

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    data = torch.utils.data.TensorDataset(torch.randn(8, 2048))
    for name, strategy in (("own", DDPStrategy()), ("dckpt", dl.DDPStrategy())):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        model = Net()
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
        path = os.path.join(folder, name, f"{args.rep}.ckpt")

        def restore():
            ckpt = trainer.strategy.load_checkpoint(path)
            trainer.strategy.load_model_state_dict(ckpt)
            trainer.strategy.load_optimizer_state_dict(ckpt)

        yield name, (model, trainer.strategy.optimizers), (lambda: trainer.save_checkpoint(path)), \
            (lambda: getattr(trainer.strategy, "_saves", None) and trainer.strategy._saves.settle()), \
            restore


def trainer_runs(args, folder: str):
    import transformers

    from dckpt.integrations import hf

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(args.mparams)

        def forward(self, x):
            return {"loss": self.net(x).pow(2).mean()}

    data = [{"x": torch.randn(2048)} for _ in range(8)]
    for name, cls in (("own", transformers.Trainer), ("dckpt", hf.Trainer)):
        out = os.path.join(folder, name)
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, max_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
        model = Wrapped()
        trainer = cls(model=model, args=targs, train_dataset=data)
        trainer.train()
        trainer.state.global_step = args.rep * args.saves  # each save a step of its own

        def save(trainer=trainer):
            trainer.state.global_step += 1
            trainer._save_checkpoint(trainer.model, None)

        def restore(trainer=trainer, out=out):
            ckpt = os.path.join(out, f"checkpoint-{trainer.state.global_step}")
            trainer._load_from_checkpoint(ckpt)
            trainer._load_optimizer_and_scheduler(ckpt)
            trainer._load_rng_state(ckpt)

        yield name, (model, [trainer.optimizer]), save, \
            (lambda trainer=trainer: getattr(trainer, "_saves", None) and trainer._saves.settle()), \
            restore


def accelerate_runs(args, folder: str):
    from accelerate import Accelerator

    from dckpt.integrations.hf import AcceleratorCheckpoints

    a = Accelerator(cpu=True)
    model = mlp(args.mparams)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, opt = a.prepare(model, opt)
    model(torch.randn(4, 2048)).pow(2).mean().backward()
    opt.step()
    ckpt = AcceleratorCheckpoints(a)
    for name in ("own", "dckpt"):
        path = os.path.join(folder, name, f"r{args.rep}")
        if name == "own":
            yield name, (model, [opt]), (lambda: a.save_state(path)), (lambda: None), \
                (lambda: a.load_state(path))
        else:
            yield name, (model, [opt]), (lambda: ckpt.save_state(path)), ckpt._saves.settle, \
                (lambda: ckpt.load_state(path))


def torchtitan_runs(args, folder: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    from dckpt.integrations.torchtitan import DckptCheckpointManager

    class Progress:
        step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name, manager, extra in (("own", CheckpointManager, {"async_mode": "async"}),
                                 ("dckpt", DckptCheckpointManager, {})):
        model = mlp(args.mparams)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="Adam",
                                           optimizer_kwargs={"lr": 1e-4})],
            implementation="foreach").build(model_parts=[model])
        sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt,
                                                                    training_steps=100)
        model(torch.randn(4, 2048)).pow(2).mean().backward()
        opt.step()
        ckpt = manager.Config(enable=True, folder=f"{name}-{args.rep}", interval=1,
                              keep_latest_k=0, **extra).build(
            dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched,
            states={"train_state": Progress()}, sd_adapter=None, base_folder=folder)
        steps = itertools.count(1)
        yield name, (model, opt.optimizers), (lambda ckpt=ckpt, steps=steps: ckpt.save(next(steps))), \
            (lambda ckpt=ckpt: ckpt.maybe_wait_for_saving()), (lambda ckpt=ckpt: ckpt.load(-1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=["lightning", "trainer", "accelerate", "torchtitan"],
                   required=True)
    p.add_argument("--mparams", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--saves", type=int, default=1,
                   help="saves of one manager per repeat, the last one timed (torchtitan and "
                        "trainer): a training job's saves after its first")
    p.add_argument("--data-dir", default="bench-data/frameworks")
    p.add_argument("--out", default="bench-out/frameworks.jsonl")
    args = p.parse_args()
    if args.saves > 1 and args.framework not in ("torchtitan", "trainer"):
        p.error("--saves: torchtitan and trainer only")
    runs = {"lightning": lightning_runs, "trainer": trainer_runs,
            "accelerate": accelerate_runs, "torchtitan": torchtitan_runs}[args.framework]
    if not dist.is_initialized() and args.framework != "lightning":
        dist.init_process_group("gloo")
    folder = os.path.abspath(args.data_dir)
    results: dict[str, dict[str, list[float]]] = {}
    nbytes = 0
    for rep in range(args.repeat):
        args.rep = rep
        for name, (model, optimizers), save, settle, restore in runs(args, folder):
            nbytes = state_bytes(model)
            for _ in range(args.saves):  # the last one timed
                train_step(model, optimizers)
                pause = timed(save)
                commit = pause + timed(settle)
            # until every byte is in memory: a framework that maps its files reads them at
            # first use (safetensors, torch.load(mmap=True)); dckpt has read and verified them
            evict(folder)  # cold, both: dckpt writes with O_DIRECT, past the page cache
            restore_s = timed(restore) + timed(lambda: touch(model, optimizers))
            got = results.setdefault(name, {"pause_s": [], "commit_s": [], "restore_s": []})
            got["pause_s"].append(pause)
            got["commit_s"].append(commit)
            got["restore_s"].append(restore_s)
    copy = statistics.median(memcpy_s(nbytes) for _ in range(3))
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        own = {k: statistics.median(v) for k, v in results["own"].items()}
        with open(args.out, "a") as f:
            for name, got in results.items():
                med = {k: statistics.median(v) for k, v in got.items()}
                line = {"bench": "frameworks", "framework": args.framework, "saver": name, "ranks": 2,
                        "state_bytes_per_rank": nbytes, "memcpy_s": copy, **med,
                        "pause_vs_own": med["pause_s"] / own["pause_s"],
                        "restore_vs_own": med["restore_s"] / own["restore_s"],
                        "pause_vs_memcpy": med["pause_s"] / copy}
                f.write(json.dumps(line) + "\n")
                print(json.dumps(line), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()

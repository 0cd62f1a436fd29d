"""A small Lightning run under torchrun (CPU, gloo): an MLP with dropout, Adam and a step
scheduler, checkpoints at each epoch end (top 2 by loss, and last.ckpt).

    torchrun --nproc-per-node 2 lightning_train.py --dir D --strategy dckpt-ddp \
        [--resume last] [--kill-at-step N] --out final.pt

``--strategy``: dckpt-ddp, dckpt-fsdp2 (dckpt's strategies) or ddp, fsdp2 (Lightning's own).
``--kill-at-step N``: rank 1 SIGKILLs itself when the global step reaches N.
``--fail-pointer read|write``: rank 0's reads (or writes) of Lightning's checkpoint files
fail with ENOSPC (the folder Lightning names is full; the repository is elsewhere, --url);
each rank prints what it raised.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import lightning as L
import torch
from frameworks import leave
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader, TensorDataset


class Net(L.LightningModule):
    def __init__(self, width: int = 32, fsdp: bool = False, fsdp1: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def configure_model(self) -> None:
        if self.hparams.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh)
            fully_shard(self.net, mesh=self.device_mesh)
        if self.hparams.fsdp1 and not isinstance(self.net, FSDP):
            # wrapped here, on the CPU: Lightning would wrap for a GPU (device_id=None)
            self.net = FSDP(self.net, device_id=torch.device("cpu"), use_orig_params=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


class Kill(Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at is not None and trainer.global_step == self.at and trainer.global_rank == 1:
            print(f"rank 1: SIGKILL at step {self.at}", flush=True)
            time.sleep(0.5)  # rank 0 past the last save's staging
            os.kill(os.getpid(), signal.SIGKILL)


def strategy(name: str, url: str | None):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from dckpt.integrations import lightning as dl

    return {"ddp": lambda: DDPStrategy(),
            "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            "fsdp1": lambda: type("CpuFSDP", (FSDPStrategy,), {})(state_dict_type="sharded"),
            "dckpt-ddp": lambda: dl.DDPStrategy(url=url),
            "dckpt-fsdp1": lambda: dl.FSDPStrategy(url=url),
            "dckpt-fsdp2": lambda: dl.ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, url=url),
            }[name]()


def fail_pointer(kind: str) -> None:
    import errno

    from dckpt.integrations import lightning as dl

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    setattr(dl, f"{kind}_pointer", full)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--strategy", default="dckpt-ddp")
    p.add_argument("--url", default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--resume", default=None)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--fail-pointer", choices=["read", "write"], default=None)
    args = p.parse_args()
    if args.fail_pointer and os.environ.get("RANK") == "0":
        fail_pointer(args.fail_pointer)
    L.seed_everything(0, workers=True)
    data = TensorDataset(torch.randn(64, 16), torch.randn(64, 1))
    fsdp = args.strategy.endswith("fsdp2")
    model = Net(fsdp=fsdp, fsdp1=args.strategy.endswith("fsdp1"))
    ckpt = ModelCheckpoint(dirpath=args.dir, monitor="loss", save_top_k=2, save_last=True,
                           every_n_epochs=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(args.strategy, args.url),
                        max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        deterministic=True, callbacks=[ckpt, Kill(args.kill_at_step)])
    try:
        trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True), ckpt_path=args.resume)
    except Exception as e:
        if not args.fail_pointer:
            raise
        sys.stdout.flush()  # then one write, a line of its own: the ranks share the pipe
        os.write(1, f"\nrank {trainer.global_rank} raised {type(e).__name__}: {e}\n".encode())
        os._exit(0)  # not 1: torchrun would stop the other rank before it printed
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    elif isinstance(model.net, FSDP):  # FSDP1's full state dict crashes on the CPU
        with FSDP.summon_full_params(model.net, writeback=False):
            weights = {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone()
                       for k, v in model.net.named_parameters()}
    else:
        weights = model.state_dict()
    if trainer.global_rank == 0:
        if args.out:
            torch.save(weights, args.out)
        kept = sorted(os.path.basename(p) for p in os.listdir(args.dir) if p.endswith(".ckpt"))
        print("KEPT " + json.dumps(kept), flush=True)
        print(f"GLOBAL_STEP {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
    leave()

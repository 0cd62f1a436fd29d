"""The synthetic state ``dckpt bench`` checkpoints, and how it changes between saves.

A state is ``--gib-per-rank`` GiB of 2-D tensors of ``--tensor-mib`` MiB each, float32 or
bfloat16, on the CPU or this rank's GPU, and a step counter:

- ``sharded``: DTensor shards, ``Shard(0)`` over all ranks (FSDP2's layout): every rank holds
  its own ``gib_per_rank`` GiB, and a checkpoint holds ``world_size`` times that;
- ``dense``: plain tensors, the same on every rank (DDP's layout): a checkpoint holds one
  copy, ``gib_per_rank`` GiB, and the engines spread its writes over the ranks.

Workloads (what changes before each timed save):

- ``full``: every value (dense training);
- ``unchanged90``: one tensor in ten, every value of it (fine-tuning with most layers frozen);
  the timed saves of a differential engine follow a first, untimed one;
- ``sparse-rows``: 1% of the rows of every tensor, drawn at random (an embedding table's
  updates; rows of 512 bytes in this workload): every block may hold a changed row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from dckpt.bench.options import LAYOUTS, WORKLOADS

__all__ = ["Workload"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPARSE_ROW_BYTES = 512
SPARSE_FRACTION = 0.01


@dataclasses.dataclass
class Workload:
    """One rank's state, an empty twin to restore into, and the bytes a checkpoint holds."""

    state: dict
    target: dict
    kind: str
    layout: str
    checkpoint_bytes: int
    """Bytes of tensor data in one checkpoint, all ranks together."""
    share: list[str]
    """The keys whose bytes this rank writes where an engine does not decide it (the raw
    storage limit, torch-checkpointing): its shards, or a round-robin part of dense keys."""

    @classmethod
    def build(cls, *, gib_per_rank: float, tensor_mib: float, layout: str, dtype: str,
              kind: str, device: str, mesh: Any) -> Workload:
        if layout not in LAYOUTS or kind not in WORKLOADS or dtype not in DTYPES:
            raise ValueError(f"layout {layout!r}, workload {kind!r}, dtype {dtype!r}: expected "
                             f"one of {LAYOUTS}, {WORKLOADS}, {tuple(DTYPES)}")
        if not (gib_per_rank > 0 and tensor_mib > 0):
            raise ValueError("--gib-per-rank and --tensor-mib must be positive")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        torch_dtype = DTYPES[dtype]
        item = torch.tensor([], dtype=torch_dtype).element_size()
        cols = SPARSE_ROW_BYTES // item if kind == "sparse-rows" else 1024
        total = int(gib_per_rank * (1 << 30))
        per_tensor = min(int(tensor_mib * (1 << 20)), total)
        rows = max(1, per_tensor // (cols * item))
        count = max(1, total // (rows * cols * item))
        # the same values on every rank for dense tensors, different shards for sharded ones
        g = torch.Generator().manual_seed(rank if layout == "sharded" else 0)
        state: dict = {"step": 0}
        target: dict = {"step": -1}
        for i in range(count):
            local = torch.randn(rows, cols, generator=g).to(torch_dtype).to(device)
            state[f"layer{i}.weight"] = _wrap(local, layout, mesh, world)
            target[f"layer{i}.weight"] = _wrap(torch.empty_like(local), layout, mesh, world)
        local_bytes = count * rows * cols * item
        keys = [k for k in state if k != "step"]
        share = keys if layout == "sharded" else keys[rank::world]
        return cls(state=state, target=target, kind=kind, layout=layout, share=share,
                   checkpoint_bytes=local_bytes * (world if layout == "sharded" else 1))

    def local(self, tensors: dict, keys: list[str] | None = None) -> list[torch.Tensor]:
        """The local tensors (a DTensor's shard) of ``keys`` (default: all), in key order."""
        names = keys if keys is not None else [k for k in tensors if k != "step"]
        return [_local(tensors[k]) for k in names]

    @property
    def on_gpu(self) -> bool:
        return any(t.is_cuda for t in self.local(self.state))

    def change(self, step: int) -> None:
        """Change the state as the workload does before a save of ``step``."""
        self.state["step"] = step
        g = torch.Generator().manual_seed(1000 + step)
        with torch.no_grad():
            for i, t in enumerate(self.local(self.state)):
                if self.kind == "full" or (self.kind == "unchanged90" and i % 10 == step % 10):
                    t.add_(1.0)
                elif self.kind == "sparse-rows":
                    n = max(1, int(t.shape[0] * SPARSE_FRACTION))
                    rows = torch.randint(0, t.shape[0], (n,), generator=g).to(t.device)
                    t[rows] += 1.0

    def equal(self, keys: list[str] | None = None, *, step: bool = True) -> bool:
        """Whether the restored target holds exactly the state's values (bit for bit) in
        ``keys`` (default: all), and its step (unless ``step`` is False)."""
        pairs = zip(self.local(self.state, keys), self.local(self.target, keys))
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in pairs)
        return same and (not step or self.target["step"] == self.state["step"])

    def scramble(self) -> None:
        """Overwrite the target, so that a restore that writes nothing cannot pass."""
        self.target["step"] = -1
        for t in self.local(self.target):
            t.fill_(float("nan"))


def _wrap(local: torch.Tensor, layout: str, mesh: Any, world: int) -> object:
    if layout == "dense":
        return local
    from torch.distributed.tensor import DTensor, Shard

    rows, cols = local.shape
    return DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size([rows * world, cols]),
                              stride=(cols, 1))


def _local(value: object) -> torch.Tensor:
    to_local = getattr(value, "to_local", None)
    return to_local() if to_local is not None else value  # type: ignore[return-value]

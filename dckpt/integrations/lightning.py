"""PyTorch Lightning: every rank saves its shard through dckpt, from Lightning's own
checkpoint calls (``ModelCheckpoint``, ``Trainer.save_checkpoint``, ``fit(ckpt_path=...)``).

    from dckpt.integrations.lightning import DDPStrategy   # FSDPStrategy, ModelParallel...
    trainer = L.Trainer(strategy=DDPStrategy(), callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path="last")

Why a strategy: Lightning hands a checkpoint to its ``CheckpointIO`` plugin on global rank 0
alone (``Strategy.save_checkpoint``), holding the state rank 0 has; a plugin cannot make
every rank write its own shard, and a callback cannot replace the write. The strategy is
what Lightning calls on every rank to save, load and remove a checkpoint, so the mixin
``DckptCheckpointing`` overrides those three calls and nothing else of the training.

At the path Lightning names (``epoch=3-step=96.ckpt``, ``last.ckpt``) it writes a pointer
(dckpt.integrations.common); the model, optimizers and per-rank random states go to a dckpt
repository (``url``; by default a folder ``dckpt`` beside the checkpoints), and the rest of
Lightning's checkpoint (loops, callbacks, schedulers, hyper-parameters) is one verified
value of it. A checkpoint Lightning wrote itself still loads, through Lightning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies import FSDPStrategy as _FSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy
from lightning.pytorch.strategies import SingleDeviceStrategy as _SingleDeviceStrategy

import dckpt
from dckpt.errors import (
    ArgumentError,
    CheckpointNotFoundError,
    DckptError,
    FormatError,
    StateDictError,
)
from dckpt.integrations.common import (
    Pointer,
    Saves,
    load_pointed,
    on_rank0,
    pack,
    read_pointer,
    remove_pointer,
    repository_beside,
    unpack,
    write_pointer,
)

__all__ = ["DckptCheckpointing", "DDPStrategy", "FSDPStrategy", "ModelParallelStrategy",
           "SingleDeviceStrategy", "load_weights"]

log = logging.getLogger(__name__)

_TENSOR_KEYS = ("state_dict", "optimizer_states")
"""What dckpt stores as tensors (read from the live modules); the rest is one value."""


class DckptCheckpointing:
    """Mixin for a Lightning ``Strategy``: its checkpoints go through dckpt.

    ``url``: the repository (a path or an fsspec URL, ``s3://`` included); None puts it in
    a folder ``dckpt`` beside each checkpoint path. ``async_save``: training resumes once
    the state is staged, and the write and the commit run in the background (the next
    save, a removal and the end of ``fit`` wait for it). ``fallback``: a checkpoint that
    never committed (a save killed in flight) or fails verification is passed over for the
    newest older one that loads, with a warning. ``save_config``: dckpt's SaveConfig.
    ``metrics``: a ``dckpt.Metrics`` that records pauses, saves, failures and restores.
    """

    def __init__(self, *args: Any, url: str | None = None,
                 storage_options: dict | None = None, async_save: bool = True,
                 fallback: bool = True, save_config: dckpt.SaveConfig | None = None,
                 metrics: dckpt.Metrics | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dckpt_metrics = metrics
        self.dckpt_url = url
        self.dckpt_fallback = fallback
        self._storage_options = storage_options
        self._saves = Saves(storage_options=storage_options, async_save=async_save,
                            config=save_config, metrics=metrics, url=url,
                            fallback=fallback)
        self._dckpt_loaded = False
        self._swept: set[str] = set()

    # what Lightning gathers for its own file: dckpt reads the live modules instead
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the optimizers exist then, and load in place

    def _state(self, with_optimizers: bool) -> dict[str, Any]:
        optimizers = list(self.optimizers) if with_optimizers else None  # type: ignore[attr-defined]
        return {"app": dckpt.TrainState(self.lightning_module, optimizers),  # type: ignore[attr-defined]
                "lightning": b""}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        """(all ranks) Save through dckpt and write the pointer at ``filepath``."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options: "
                            "give them to the strategy (storage_options=...)")
        me = self.global_rank  # type: ignore[attr-defined]
        path = str(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        url = str(self.broadcast(self.dckpt_url or repository_beside(path)))  # type: ignore[attr-defined]
        step = self._saves.next_step(url, self.broadcast, me)  # type: ignore[attr-defined]
        with_optimizers = "optimizer_states" in checkpoint
        state = self._state(with_optimizers)
        rest = {k: v for k, v in checkpoint.items() if k not in _TENSOR_KEYS}
        state["lightning"] = pack(rest, "the Lightning checkpoint")
        facts = {"optimizers": len(self.optimizers) if with_optimizers else 0,  # type: ignore[attr-defined]
                 "global_step": int(checkpoint.get("global_step", 0)),
                 "epoch": int(checkpoint.get("epoch", 0))}
        replaced = on_rank0(lambda: self._before_save(path, url), broadcast=self.broadcast,  # type: ignore[attr-defined]
                            rank=me, what=f"reading the checkpoint file {path}")
        self._saves.save(state, url, step=step, replaces=replaced or [],
                         metrics={k: float(facts[k]) for k in ("global_step", "epoch")})
        on_rank0(lambda: write_pointer(path, Pointer(url, step, facts)),
                 broadcast=self.broadcast, rank=me,  # type: ignore[attr-defined]
                 what=f"writing the checkpoint file {path}")

    def _before_save(self, path: str, url: str) -> list[tuple[str, int]]:
        """(rank 0) Sweep the folder's own repository, once per run (what a crash left
        unnamed goes); the checkpoint whose pointer ``path`` the save replaces."""
        if self.dckpt_url is None and url not in self._swept:
            self._saves.settle()
            folder = os.path.dirname(path)
            names = os.listdir(folder) if os.path.isdir(folder) else []
            self._saves.sweep(url, [os.path.join(folder, n) for n in names
                                    if os.path.isfile(os.path.join(folder, n))])
            self._swept.add(url)
        try:
            old = read_pointer(path)
        except (FileNotFoundError, FormatError):
            old = None
        return [(old.url, old.step)] if old is not None else []

    def remove_checkpoint(self, filepath: Any) -> None:
        """(all ranks) Remove the pointer and, once no save needs it, its checkpoint."""
        if self.global_rank != 0:  # type: ignore[attr-defined]
            return
        try:
            pointer = remove_pointer(str(filepath))
        except (OSError, DckptError) as e:  # rank 0's alone: raising would leave the others
            log.warning("could not remove %s (its checkpoint stays): %s", filepath, str(e))
            return  # waiting in the next collective; what stays is housekeeping
        if pointer is None:  # a checkpoint Lightning wrote itself
            super().remove_checkpoint(filepath)  # type: ignore[misc]
            return
        self._saves.release(pointer.url, pointer.step)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """(all ranks) Load the pointed checkpoint into the live modules (with fallback) and
        return the rest of Lightning's checkpoint; Lightning's own files go to Lightning."""
        me = self.global_rank  # type: ignore[attr-defined]
        path = str(self.broadcast(str(checkpoint_path)))  # type: ignore[attr-defined]
        found: Pointer | BaseException | None = None
        if me == 0:
            try:
                found = read_pointer(path)
            except (OSError, FormatError) as e:
                found = e
        found = self.broadcast(found)  # type: ignore[attr-defined]
        if isinstance(found, BaseException):
            raise found
        if found is None:
            self._dckpt_loaded = False
            return super().load_checkpoint(checkpoint_path, weights_only)  # type: ignore[misc]
        self._saves.settle()
        saved = int(found.facts.get("optimizers", 0))
        here = len(self.optimizers)  # type: ignore[attr-defined]
        if saved and here and saved != here:
            raise StateDictError(f"{path} holds the state of {saved} optimizers; this run "
                                 f"has {here}: configure_optimizers must return as many, or "
                                 "load the weights alone with load_weights(path, module)")
        state = self._state(bool(saved and here))
        info = load_pointed(state, found, broadcast=self.broadcast, rank=me,  # type: ignore[attr-defined]
                            storage_options=self._storage_options,
                            fallback=self.dckpt_fallback, partial=not (saved and here),
                            metrics=self.dckpt_metrics)
        checkpoint: dict[str, Any] = unpack(state["lightning"])
        checkpoint["state_dict"] = self.lightning_module.state_dict()  # type: ignore[attr-defined]
        if saved:
            checkpoint["optimizer_states"] = [o.state_dict() for o in self.optimizers]  # type: ignore[attr-defined]
        self._dckpt_loaded = True
        log.info("rank %d: loaded %s (step %d of %s) in %.2f s", me, path, info.step,
                 found.url, info.phase_s.get("total", 0.0))
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._dckpt_loaded:  # loaded in load_checkpoint otherwise
            super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if not self._dckpt_loaded:
            super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]

    def teardown(self) -> None:
        self._saves.close()  # the save in flight commits before the processes end
        super().teardown()  # type: ignore[misc]


class DDPStrategy(DckptCheckpointing, _DDPStrategy):
    """Lightning's ``DDPStrategy``, checkpointing through dckpt (see DckptCheckpointing)."""


class FSDPStrategy(DckptCheckpointing, _FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1), checkpointing through dckpt: each rank saves
    its shards (FSDP1's sharded state dict, whatever ``state_dict_type`` says), and a load
    reshards to the run's layout."""


class ModelParallelStrategy(DckptCheckpointing, _ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 and tensor parallel through
    ``configure_model``), checkpointing through dckpt: each rank saves its shards, and a
    load reshards to the run's own layout."""


class SingleDeviceStrategy(DckptCheckpointing, _SingleDeviceStrategy):
    """Lightning's ``SingleDeviceStrategy`` (one process, one device), checkpointing through
    dckpt."""


def load_weights(path: str, module: Any, *, storage_options: dict | None = None) -> None:
    """(one process, or all ranks) The model weights of the checkpoint at ``path`` into
    ``module`` (a LightningModule or any ``nn.Module`` of the same structure), for
    evaluation: ``LightningModule.load_from_checkpoint`` reads Lightning's own files only."""
    if not isinstance(module, torch.nn.Module):
        raise ArgumentError(f"load_weights(path, module): module must be a torch.nn.Module "
                            f"(a LightningModule), got {type(module).__name__}")
    try:
        pointer = read_pointer(str(path))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file") from None
    if pointer is None:
        raise FormatError(f"{path} is not a dckpt pointer; Lightning's own checkpoint "
                          "loads with LightningModule.load_from_checkpoint")
    state = {"app": dckpt.TrainState(module, None, rng=False)}
    dckpt.load(state, pointer.url, step=pointer.step, partial=True,
               storage_options=storage_options)

"""Hugging Face: the transformers ``Trainer`` and Accelerate save and resume through dckpt.

    from dckpt.integrations.hf import Trainer          # instead of transformers.Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.train(resume_from_checkpoint=True)

    ckpt = AcceleratorCheckpoints(accelerator)          # instead of accelerator.save_state
    ckpt.save_state(); ...; ckpt.load_state(); ckpt.close()

Each ``checkpoint-<step>`` folder the Trainer makes holds its ``trainer_state.json`` (the
Trainer reads it before anything else) and a pointer ``dckpt.json``; the model, optimizer,
scheduler, grad scaler and each rank's random states are one checkpoint of a dckpt
repository (``url``; by default a folder ``dckpt`` in the output folder).
``save_total_limit`` removes folders as the Trainer would, and their checkpoints with them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any

import transformers
from accelerate.utils import broadcast_object_list
from torch.distributed.checkpoint.stateful import Stateful
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints

import dckpt
from dckpt.errors import (
    ArgumentError,
    CheckpointNotFoundError,
    DckptError,
    FormatError,
    IntegrityError,
    NewerFormatError,
)
from dckpt.integrations.common import (
    Pointer,
    Saves,
    load_pointed,
    on_rank0,
    read_pointer,
    remove_pointer,
    write_pointer,
)
from dckpt.train_state import rng_state, set_rng_state

__all__ = ["DckptTrainerMixin", "Trainer", "AcceleratorCheckpoints", "POINTER_NAME"]

log = logging.getLogger(__name__)

POINTER_NAME = "dckpt.json"
"""The pointer's name inside a checkpoint folder."""


def _broadcast(obj: Any) -> Any:
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _pointer_in(folder: str | None, rank: int) -> Pointer | None:
    """(all ranks) The pointer in checkpoint ``folder``; None where it has none (a folder the
    framework wrote itself)."""
    if folder is None:
        return None
    found: Pointer | BaseException | None = None
    if rank == 0:
        try:
            found = read_pointer(os.path.join(folder, POINTER_NAME))
        except FileNotFoundError:
            found = None
        except (OSError, FormatError) as e:
            found = e
    found = _broadcast(found)
    if isinstance(found, BaseException):
        raise found
    return found


def _write_pointer_in(folder: str, pointer: Pointer) -> None:
    """(rank 0) The checkpoint folder the framework expects, holding ``pointer``."""
    os.makedirs(folder, exist_ok=True)
    write_pointer(os.path.join(folder, POINTER_NAME), pointer)


def _remove_folder(folder: str, saves: Saves) -> None:
    """(rank 0) Remove a checkpoint folder, and its checkpoint once no save needs it. A
    failure is logged: rank 0's alone, raising would leave the other ranks waiting in their
    next collective, and what stays is housekeeping."""
    try:
        pointer = remove_pointer(os.path.join(folder, POINTER_NAME))
    except (OSError, DckptError) as e:
        log.warning("could not remove %s (its checkpoint stays): %s", folder, str(e))
        return
    if pointer is not None:
        saves.release(pointer.url, pointer.step)
    shutil.rmtree(folder, ignore_errors=True)


def _unwrapped(obj: Any, attr: str) -> Any:
    """The torch object inside Accelerate's wrappers (AcceleratedOptimizer.optimizer,
    AcceleratedScheduler.scheduler); a Trainer that trains again wraps its wrapper."""
    while obj is not None and hasattr(obj, attr):
        obj = getattr(obj, attr)
    return obj


class DckptTrainerMixin:
    """Mixin for ``transformers.Trainer`` (and its subclasses: ``class MySFT(DckptTrainerMixin,
    SFTTrainer)``): its checkpoints go through dckpt.

    ``url``, ``storage_options``, ``async_save``, ``fallback``, ``save_config``, ``metrics``:
    as in
    dckpt.integrations.lightning.DckptCheckpointing. ``fallback`` here passes over a
    checkpoint folder whose checkpoint never committed or fails verification for the
    newest older folder whose checkpoint loads, with a warning.
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
        self._dckpt_rng: dict[str, Any] | None = None
        self._dckpt_loading = False
        self._swept = False

    @property
    def _rank(self) -> int:
        return int(self.args.process_index)  # type: ignore[attr-defined]

    def _dckpt_state(self, training: bool) -> dict[str, Any]:
        t: Any = self
        scheduler = _unwrapped(t.lr_scheduler, "scheduler") if training else None
        return {"app": dckpt.TrainState(
            t.model, _unwrapped(t.optimizer, "optimizer") if training else None,
            scheduler=scheduler, scaler=t.accelerator.scaler if training else None,
            rng=training)}

    # ------------------------------------------------------------ save

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """(all ranks) The Trainer's checkpoint at this step, through dckpt."""
        t: Any = self
        if t.hp_search_backend is None and trial is None:
            t.store_flos()
        run_dir = t._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{t.state.global_step}")
        url = self.dckpt_url or os.path.join(run_dir, "dckpt")
        step = self._saves.next_step(url, _broadcast, self._rank)
        training = not t.args.save_only_model
        pointer = os.path.join(folder, POINTER_NAME)
        replaced = on_rank0(lambda: self._before_save(run_dir, pointer, url),
                            broadcast=_broadcast, rank=self._rank, what=f"reading {pointer}")
        self._saves.save(self._dckpt_state(training), url, step=step, replaces=replaced or [],
                         metrics={"global_step": float(t.state.global_step),
                                  "epoch": float(t.state.epoch or 0.0)})
        on_rank0(lambda: _write_pointer_in(folder, Pointer(url, step, {
            "training": training, "global_step": int(t.state.global_step)})),
            broadcast=_broadcast, rank=self._rank, what=f"writing {pointer}")
        t.accelerator.wait_for_everyone()
        if (t.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
                and t.state.best_global_step):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{t.state.best_global_step}")
            if os.path.exists(best):
                t.state.best_model_checkpoint = best
        if self._rank == 0:
            for cb in [c for c in [*t.callback_handler.callbacks, t.control]
                       if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(t.state.stateful_callbacks.get(name), list):
                    t.state.stateful_callbacks[name].append(cb.state())
                else:
                    t.state.stateful_callbacks[name] = cb.state()
            t.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
            self._rotate(run_dir)

    def _rotate(self, run_dir: str) -> None:
        """(rank 0) ``save_total_limit``, as the Trainer applies it: the newest folder and the
        best one are kept."""
        t: Any = self
        limit = t.args.save_total_limit
        if limit is None or limit <= 0:
            return
        folders = sort_checkpoints(run_dir, PREFIX_CHECKPOINT_DIR)
        protected = {folders[-1]} if folders else set()
        if t.state.best_model_checkpoint is not None:
            protected.add(str(t.state.best_model_checkpoint))
        extra = len(folders) - max(limit, len(protected))
        for folder in [f for f in folders if f not in protected][:max(extra, 0)]:
            _remove_folder(folder, self._saves)

    # ------------------------------------------------------------ resume

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """``Trainer.train``. With ``fallback``, a checkpoint folder whose checkpoint never
        committed (its save killed in flight) gives way to the newest older folder whose
        checkpoint did, before the Trainer reads anything. A checkpoint that fails
        verification while it loads raises IntegrityError naming the folder to resume
        from instead: the Trainer has set itself up from that folder by then."""
        t: Any = self
        if resume_from_checkpoint is True:
            resume_from_checkpoint = transformers.trainer_utils.get_last_checkpoint(
                t.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory "
                                 f"({t.args.output_dir})")
        if isinstance(resume_from_checkpoint, str) and self.dckpt_fallback:
            resume_from_checkpoint = self._committed_folder(resume_from_checkpoint)
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        except IntegrityError as e:
            if not self._dckpt_loading:
                raise
            self._dckpt_loading = False
            older = self._older_folders(str(resume_from_checkpoint))
            raise IntegrityError(
                f"{resume_from_checkpoint} does not load: {e}\nResume from "
                + (f"the folder before it: train(resume_from_checkpoint={older[-1]!r})"
                   if older else "the start: no older checkpoint folder is there"),
                failures=e.failures) from None
        self._saves.close()  # the save in flight commits before train returns
        return out

    def _before_save(self, run_dir: str, pointer: str, url: str) -> list[tuple[str, int]]:
        """(rank 0) Sweep the output folder's own repository, once (what a crash left
        unnamed goes); the checkpoint whose ``pointer`` the save replaces."""
        if self.dckpt_url is None and not self._swept:
            self._saves.settle()
            self._saves.sweep(url, [os.path.join(f, POINTER_NAME)
                                    for f in sort_checkpoints(run_dir, PREFIX_CHECKPOINT_DIR)])
            self._swept = True
        try:
            old = read_pointer(pointer)
        except (FileNotFoundError, FormatError):
            old = None
        return [(old.url, old.step)] if old is not None else []

    def _older_folders(self, folder: str) -> list[str]:
        """The checkpoint folders beside ``folder`` and older than it, oldest first."""
        def number(path: str) -> int:
            found = re.search(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$", path.rstrip("/"))
            return int(found[1]) if found else -1

        return [f for f in sort_checkpoints(os.path.dirname(os.path.abspath(folder)),
                                            PREFIX_CHECKPOINT_DIR) if number(f) < number(folder)]

    def _committed_folder(self, folder: str) -> str:
        """(all ranks) ``folder``, or where its checkpoint never committed, the newest older
        folder whose checkpoint did (rank 0 decides). A storage that fails while it looks is
        that error on every rank: the newer checkpoint may be sound, and resuming from an
        older one would silently redo the training since."""
        chosen = on_rank0(lambda: self._first_committed(folder), broadcast=_broadcast,
                          rank=self._rank, what=f"looking for a checkpoint in {folder}")
        return str(_broadcast(chosen))

    def _first_committed(self, folder: str) -> str:
        """(rank 0) See ``_committed_folder``."""
        for candidate in [folder, *reversed(self._older_folders(folder))]:
            try:
                pointer = read_pointer(os.path.join(candidate, POINTER_NAME))
            except (FileNotFoundError, FormatError):
                continue  # no pointer (its save never wrote one), or a damaged one
            if pointer is None:
                chosen = candidate  # a folder of the Trainer's own
                break
            try:  # its manifest alone, not every one of a run that keeps them all
                dckpt.inspect(pointer.url, step=pointer.step,
                              storage_options=self._storage_options)
            except NewerFormatError:
                raise  # sound, for a newer dckpt: never passed over
            except (CheckpointNotFoundError, IntegrityError):
                continue  # never committed, or damaged
            chosen = candidate
            break
        else:
            return folder
        if chosen != folder:
            log.warning("rank 0: the checkpoint of %s never committed; resuming from %s",
                        folder, chosen)
        return chosen

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if _pointer_in(resume_from_checkpoint, self._rank) is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        # else: the model loads with the optimizer, once it exists

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        pointer = _pointer_in(checkpoint, self._rank)
        if pointer is None:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        self._saves.settle()
        training = bool(pointer.facts.get("training", True))
        self._dckpt_loading = True
        # fallback to an older folder happens in train(), with that folder's trainer state
        load_pointed(self._dckpt_state(training), pointer, broadcast=_broadcast,
                     rank=self._rank, storage_options=self._storage_options, fallback=False,
                     partial=not training, metrics=self.dckpt_metrics)
        self._dckpt_loading = False
        self._dckpt_rng = rng_state() if training else None  # set again where the Trainer does

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if _pointer_in(checkpoint, self._rank) is None:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
        elif self._dckpt_rng is not None:
            set_rng_state(self._dckpt_rng)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if _pointer_in(checkpoint, self._rank) is None:
            super()._load_scaler(checkpoint)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        t: Any = self
        pointer = _pointer_in(t.state.best_model_checkpoint, self._rank)
        if pointer is None:
            super()._load_best_model()  # type: ignore[misc]
            return
        self._saves.settle()
        load_pointed({"app": dckpt.TrainState(t.model, None, rng=False)}, pointer,
                     broadcast=_broadcast, rank=self._rank,
                     storage_options=self._storage_options, fallback=False, partial=True)


class Trainer(DckptTrainerMixin, transformers.Trainer):
    """``transformers.Trainer``, checkpointing through dckpt (see DckptTrainerMixin)."""


class _Each(Stateful):
    """A list of objects with ``state_dict()`` as one Stateful, keyed by position."""

    def __init__(self, objects: list[Any]) -> None:
        self.objects = objects

    def state_dict(self) -> dict[str, Any]:
        return {str(i): o.state_dict() for i, o in enumerate(self.objects)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, o in enumerate(self.objects):
            o.load_state_dict(state_dict[str(i)])


class AcceleratorCheckpoints:
    """``accelerator.save_state`` / ``load_state`` through dckpt: the prepared models and
    optimizers, the schedulers, the grad scaler, the objects given to
    ``register_for_checkpointing``, ``accelerator.step`` and each rank's random states.

    Folders and ``total_limit`` follow the accelerator's ``ProjectConfiguration``: with
    ``automatic_checkpoint_naming``, ``<project_dir>/checkpoints/checkpoint_<i>``; each
    folder holds a pointer, the data a dckpt repository (``url``; by default
    ``<project_dir>/dckpt``, or a folder ``dckpt`` beside an explicit output folder).
    """

    def __init__(self, accelerator: Any, *, url: str | None = None,
                 storage_options: dict | None = None, async_save: bool = True,
                 fallback: bool = True, save_config: dckpt.SaveConfig | None = None,
                 metrics: dckpt.Metrics | None = None) -> None:
        if not callable(getattr(accelerator, "register_for_checkpointing", None)):
            raise ArgumentError(f"AcceleratorCheckpoints(accelerator): an accelerate "
                                f"Accelerator, got {type(accelerator).__name__}")
        self.accelerator = accelerator
        self.metrics = metrics
        self.url = url
        self.fallback = fallback
        self._storage_options = storage_options
        self._saves = Saves(storage_options=storage_options, async_save=async_save,
                            config=save_config, metrics=metrics, url=url,
                            fallback=fallback)

    @property
    def _rank(self) -> int:
        return int(self.accelerator.process_index)

    def _state(self) -> dict[str, Any]:
        a = self.accelerator
        models = [a.unwrap_model(m) for m in a._models]
        return {"app": dckpt.TrainState(models[0] if len(models) == 1 else models,
                                        [_unwrapped(o, "optimizer") for o in a._optimizers],
                                        scaler=a.scaler),
                "schedulers": _Each([_unwrapped(s, "scheduler") for s in a._schedulers]),
                "custom": _Each(list(a._custom_objects)),
                "accelerate": {"step": a.step}}

    def _folders(self) -> tuple[str, list[str]]:
        root = os.path.join(self.accelerator.project_dir, "checkpoints")
        names = os.listdir(root) if os.path.isdir(root) else []
        numbered = sorted((int(m[1]), n) for n in names if (m := re.search(r"_(\d+)$", n)))
        return root, [os.path.join(root, n) for _, n in numbered]

    def save_state(self, output_dir: str | None = None) -> str:
        """(all ranks) Save; returns the checkpoint folder. Training resumes once staged."""
        a, config = self.accelerator, self.accelerator.project_configuration
        url = self.url
        if config.automatic_checkpoint_naming:
            root, folders = self._folders()
            if self._rank == 0 and config.total_limit is not None:
                for old in folders[:max(len(folders) + 1 - config.total_limit, 0)]:
                    _remove_folder(old, self._saves)
            output_dir = os.path.join(root, f"checkpoint_{config.iteration}")
            url = url or os.path.join(a.project_dir, "dckpt")
        elif output_dir is None:
            raise dckpt.ArgumentError("save_state needs an output_dir, or a ProjectConfiguration "
                                      "with automatic_checkpoint_naming")
        url = url or os.path.join(os.path.dirname(os.path.abspath(output_dir)), "dckpt")
        step = self._saves.next_step(url, _broadcast, self._rank)
        self._saves.save(self._state(), url, step=step, replaces=[],
                         metrics={"accelerate_step": float(a.step)})
        on_rank0(lambda: _write_pointer_in(output_dir, Pointer(url, step)),
                 broadcast=_broadcast, rank=self._rank,
                 what=f"writing {os.path.join(output_dir, POINTER_NAME)}")
        config.iteration += 1
        a.wait_for_everyone()
        return output_dir

    def load_state(self, input_dir: str | None = None) -> dckpt.CheckpointInfo:
        """(all ranks) Load the checkpoint in ``input_dir`` (None: the newest folder of
        automatic naming), in place. With ``fallback``, one that never committed or is
        damaged gives way to the newest older one that loads."""
        a, config = self.accelerator, self.accelerator.project_configuration
        if input_dir is None:
            _, folders = self._folders()
            if not config.automatic_checkpoint_naming or not folders:
                raise dckpt.CheckpointNotFoundError(
                    "load_state needs an input_dir, or a checkpoint folder of automatic naming")
            input_dir = folders[-1]
        pointer = _pointer_in(input_dir, self._rank)
        if pointer is None:
            raise FormatError(f"{input_dir} holds no {POINTER_NAME}: a folder of "
                              "accelerator.save_state loads with accelerator.load_state")
        self._saves.settle()
        state = self._state()
        info = load_pointed(state, pointer, broadcast=_broadcast, rank=self._rank,
                            storage_options=self._storage_options, fallback=self.fallback,
                            metrics=self.metrics)
        a.step = int(state["accelerate"]["step"])
        if config.automatic_checkpoint_naming:
            found = re.search(r"_(\d+)$", input_dir.rstrip("/"))
            if found:
                config.iteration = int(found[1]) + 1
        return info

    def close(self) -> None:
        """(all ranks) Wait for the save in flight and the garbage collection."""
        self._saves.close()


"""torchtitan: a checkpoint manager that torchtitan builds from its configuration, as it
builds its own DCP and torch_checkpointing managers.

    from dckpt.integrations.torchtitan import DckptCheckpointManager
    config.checkpoint = DckptCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=500, keep_latest_k=3)

The trainer hands it the model parts, optimizers, LR schedulers, data loader and its own
train state, and calls ``load`` / ``save`` / ``maybe_wait_for_staging`` / ``close``
(``BaseCheckpointManager``). The checkpoint folder (under the dump folder, or ``url``) is a
dckpt repository whose steps are torchtitan's steps. dckpt adds: async saves from reused
staging, blocks already stored not written again, every byte verified on load, fallback
past a checkpoint that fails, each rank's random states, S3 through fsspec URLs, and
``keep_latest_k`` as ``KeepLast`` retention with garbage collection. Hugging Face
safetensors in and out (``initial_load_in_hf``, ``last_save_in_hf``) go through the model's
``sd_adapter`` and DCP's Hugging Face reader and writer, as torchtitan's own manager does.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtitan.components.checkpointer.base import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

import dckpt
from dckpt import dist
from dckpt.catalog import committed
from dckpt.decoder import reusing
from dckpt.errors import CheckpointNotFoundError, DckptError, IntegrityError, NewerFormatError
from dckpt.retention import KeepLast
from dckpt.step_metrics import Metrics
from dckpt.train_state import RandomStates
from dckpt.upkeep import DECODED_BYTES, Upkeep

__all__ = ["DckptCheckpointManager"]

log = logging.getLogger(__name__)

RNG = "rng"
"""The key of each rank's random states (torchtitan's own managers save none)."""


class DckptCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint contract through dckpt (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        url: str | None = None
        """The dckpt repository; None: ``folder`` under the trainer's dump folder."""

        storage_options: dict[str, Any] | None = None
        """fsspec options for ``url`` (S3 ``endpoint_url``, ``key``, ``secret``)."""

        async_save: bool = True
        """Training resumes once the state is staged; the write and the commit run in the
        background (the next save and ``close`` wait for them)."""

        fallback: bool = True
        """With ``load_step=-1``, a checkpoint that fails verification is passed over for
        the newest older one that loads (dckpt.load's fallback)."""

        save_rng: bool = True
        """Save and restore each rank's random states."""

        metrics_textfile: str | None = None
        """Write dckpt's Prometheus metrics (pauses, saves, failures, restores; job label
        ``torchtitan``) to this file after each event, for node_exporter's textfile
        collector; None: no metrics."""

        hf_folder: str | None = None
        """Where ``last_save_in_hf`` writes the final model as Hugging Face safetensors,
        in a ``step-N`` folder (as torchtitan's own manager does under ``folder``); None:
        the repository's path with ``-hf`` appended. A local path."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            where = self.hf_folder or self.url  # hf_folder's default: beside the url
            if self.last_save_in_hf and where and filesystem.is_remote(where):
                raise ValueError(
                    f"last_save_in_hf writes local files; {where} is remote: set "
                    "hf_folder to a local path (or `dckpt export URL --step N --to "
                    "model.safetensors --format safetensors` afterwards)")

    def __init__(self, config: Config, *, dataloader: Any, model_parts: list[nn.Module],
                 optimizers: Any, lr_schedulers: Any, states: dict[str, Any],
                 sd_adapter: Any, base_folder: str = "") -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.save_future: Future[dckpt.CheckpointInfo] | None = None
        self.config = config
        self.url = config.url or filesystem.join(base_folder, config.folder)
        self.states = states
        self.states.update({MODEL: ModelWrapper(model_parts), OPTIMIZER: optimizers,
                            DATALOADER: dataloader, LR_SCHEDULER: lr_schedulers})
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        if (config.initial_load_in_hf or config.last_save_in_hf) and sd_adapter is None:
            raise ValueError("checkpoint.initial_load_in_hf and last_save_in_hf need the "
                             "model's state dict adapter (sd_adapter): this model has none")
        self.sd_adapter = sd_adapter
        self.hf_folder = config.hf_folder or self.url.rstrip("/") + "-hf"
        self._handle: dckpt.SaveHandle | None = None
        self._started = 0.0
        self.metrics = (dckpt.Metrics("torchtitan", textfile=config.metrics_textfile)
                        if config.metrics_textfile else None)
        self._upkeep = Upkeep(self.url, config.storage_options,
                              KeepLast(config.keep_latest_k) if config.keep_latest_k else None,
                              True, self._writing)

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------ what is saved

    def _flattened(self, states: dict[str, Any]) -> dict[str, Any]:
        """torchtitan's layout: the model's keys at the top, the other states beside them."""
        sd = {k: v for k, v in states.items() if k != MODEL and v is not None}
        if MODEL in states:
            sd.update(states[MODEL].state_dict())
        if self.config.save_rng:
            sd[RNG] = RandomStates()
        return sd

    def _model_only(self) -> dict[str, Any]:
        return {k: v.to(self.export_dtype)
                if isinstance(v, torch.Tensor) and v.is_floating_point()
                and v.dtype != self.export_dtype else v
                for k, v in self.states[MODEL].state_dict().items()}

    # ------------------------------------------------------------ save

    def _should_save(self, step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        return ((step == 1 and self.config.enable_first_step_checkpoint) or last_step
                or step % self.config.interval == 0)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        self._wait_for_saving()
        begin = time.monotonic()
        so = self.config.storage_options
        metrics: Metrics = {"model_only": float(last_step and self.config.last_save_model_only)}
        self._started = time.time()
        if last_step and self.config.last_save_model_only:
            # the final weights, in the export dtype; nothing to resume from
            model = self._model_only()
            self._committed(dckpt.save(model, self.url, step=curr_step, metrics=metrics,
                                       storage_options=so))
            if self.config.last_save_in_hf:
                self._save_hf(model, curr_step)
        elif self.config.async_save and not last_step:
            self._handle = dckpt.async_save(self._flattened(self.states), self.url,
                                            step=curr_step, metrics=metrics, storage_options=so)
            self.save_future = self._handle.future
        else:
            self._committed(dckpt.save(self._flattened(self.states), self.url, step=curr_step,
                                       metrics=metrics, storage_options=so))
        held = time.monotonic() - begin
        log.info("rank %d: checkpoint of step %d %s in %.2f s", dist.rank(), curr_step,
                 "staged" if self._handle is not None else "committed", held)
        if self.metrics is not None:
            self.metrics.observe_pause(held)
        return True

    def _save_hf(self, model: dict[str, Any], step: int) -> None:
        """(all ranks) The final model as Hugging Face safetensors in ``hf_folder/step-N``,
        through the adapter and DCP's writer, as torchtitan's own manager writes it (one
        file, or the files the adapter's index names, consolidated on every rank)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files_on_every_rank,
        )

        path = filesystem.join(self.hf_folder, f"step-{step}")
        mapping = self.sd_adapter.fqn_to_index_mapping
        dcp.save(self.sd_adapter.to_hf(model), storage_writer=HuggingFaceStorageWriter(
            path=filesystem.join(path, "sharded") if mapping else path, save_distributed=True,
            fqn_to_index_mapping=mapping, enable_consolidation=not mapping))
        if mapping:
            consolidate_safetensors_files_on_every_rank(
                input_dir=filesystem.join(path, "sharded"), output_dir=path,
                fqn_to_index_mapping=mapping, num_threads=5)
        log.info("rank %d: the final model of step %d in Hugging Face safetensors: %s",
                 dist.rank(), step, path)

    def _committed(self, info: dckpt.CheckpointInfo | None) -> None:
        """(after a commit) Metrics; keep_latest_k and garbage collection, in the background
        on rank 0."""
        if self.metrics is not None and info is not None:
            self.metrics.observe_save(info)
        if dist.rank() == 0 and self._upkeep.active:
            self._upkeep.submit()

    def _writing(self) -> tuple[list[int], list[float]]:
        if self._handle is None or self._handle.done():
            return [], []
        return [self._handle.step], [self._started]

    def _wait_for_saving(self) -> None:
        handle, self._handle = self._handle, None
        self.save_future = None
        if handle is None:
            return
        try:
            info = handle.wait()  # a failed save raises here, on every rank, as DCP's would
        except dckpt.DckptError as e:
            if self.metrics is not None:
                self.metrics.observe_failure(type(e).__name__)
            raise
        self._committed(info)

    def _maybe_wait_for_staging(self) -> None:
        pass  # dckpt.async_save returns once staged

    def _close(self) -> None:
        if not hasattr(self, "_upkeep"):
            return  # __init__ did not finish
        try:
            self._wait_for_saving()
        finally:
            self._upkeep.close()

    # ------------------------------------------------------------ load

    def _load(self, step: int = -1) -> bool:
        """The checkpoint of ``step``, or with -1 the newest that loads cleanly; else the
        initial load path (a DCP checkpoint of torchtitan's own, model only by default);
        else a fresh start (False). Steps newer than the one loaded are deleted: the run
        makes them again."""
        with reusing({}, DECODED_BYTES):  # rank 0 reads the manifest it loads beforehand
            return self._load_reusing(step)

    def _load_reusing(self, step: int) -> bool:
        self._wait_for_saving()
        group = dist.checkpoint_group(dckpt.LoadConfig().collective_timeout_s)
        found: Any = self._survey(None if step == -1 else step) if dist.rank() == 0 else None
        survey: tuple[list[int], bool, DckptError | None] = dist.broadcast(  # type: ignore[assignment]
            found, group)
        steps, model_only, error = survey
        if error is not None:
            raise error
        if step != -1 and step not in steps:
            raise FileNotFoundError(f"--checkpoint.load_step={step} not found in {self.url} "
                                    f"(it holds steps {steps})")
        if not steps:
            return self._initial_load()
        wanted = None if step == -1 and self.config.fallback else (
            steps[-1] if step == -1 else step)
        states = (self.states[MODEL].state_dict() if model_only
                  else self._flattened({k: v for k, v in self.states.items()
                                        if k not in self.config.exclude_from_loading}))
        begin = time.monotonic()
        loaded = dckpt.load(states, self.url, step=wanted,
                            partial=bool(model_only or self.config.exclude_from_loading),
                            storage_options=self.config.storage_options)
        if model_only:
            self.states[MODEL].load_state_dict(states)
        if self.metrics is not None:
            self.metrics.observe_restore(loaded, 1)
        if loaded.skipped:
            log.warning("rank %d: loaded step %d; passed over %s", dist.rank(), loaded.step,
                        [s for s, _ in loaded.skipped])
        self._drop_newer(loaded.step, steps, group)
        log.info("rank %d: loaded step %d of %s in %.2f s", dist.rank(), loaded.step,
                 self.url, time.monotonic() - begin)
        return True

    def _survey(self, step: int | None) -> tuple[list[int], bool, DckptError | None]:
        """(rank 0) The committed steps, whether ``step`` (None: the newest) holds the model
        alone (step 0, or a final model-only save), and the error that stops the load."""
        opts = {"storage_options": self.config.storage_options}
        try:
            steps = committed(self.url, **opts)  # a listing: no manifest decoded
            if not steps or (step is not None and step not in steps):
                return steps, False, None
            try:
                manifest = dckpt.inspect(self.url, step=step, **opts)
            except (IntegrityError, CheckpointNotFoundError) as e:
                if isinstance(e, NewerFormatError):
                    raise
                return steps, False, None  # damaged: the load says so, or falls back
            model_only = manifest.step == 0 or manifest.metrics.get("model_only") == 1.0
            return steps, model_only, None
        except DckptError as e:
            return [], False, e

    def _drop_newer(self, loaded: int, steps: list[int], group: Any) -> None:
        """(all ranks; rank 0 deletes) Delete the steps newer than the one loaded (damaged,
        or of a timeline the run left): the run saves them again, and a committed step is
        never overwritten. A delete that fails is the same error on every rank: the run
        would fail to save those steps (before, rank 0 alone raised, and the others went
        on to wait in the first collective of the training)."""
        newer = [s for s in steps if s > loaded]
        if not newer:
            return
        error: DckptError | None = None
        if dist.rank() == 0:
            log.warning("deleting checkpoints %s of %s, newer than step %d the run resumes "
                        "from", newer, self.url, loaded)
            for s in newer:
                try:
                    dckpt.delete(self.url, step=s, storage_options=self.config.storage_options)
                except CheckpointNotFoundError:
                    continue  # gone already
                except DckptError as e:
                    error = e
                    break
        error = dist.broadcast(error, group)  # type: ignore[assignment]
        if error is not None:
            raise error

    def _initial_load(self) -> bool:
        """An empty repository: the initial load path's checkpoint (torchtitan's own DCP
        folder, or with ``initial_load_in_hf`` Hugging Face safetensors, by default from
        the adapter's ``hf_assets_path``), else a fresh start (False)."""
        from_hf = self.config.initial_load_in_hf
        path = self.config.initial_load_path or (self.sd_adapter.hf_assets_path if from_hf
                                                 else None)
        if not path:
            log.info("no checkpoint in %s: a fresh start", self.url)
            return False
        import torch.distributed.checkpoint as dcp

        if not filesystem.isdir(path):
            raise ValueError(f"the initial load path {path} is not a folder"
                             + ("" if self.config.initial_load_path else
                                " (the model's hf_assets_path; or set initial_load_path)"))
        model_only = self.config.initial_load_model_only  # initial_load_in_hf requires it
        states = (self.states[MODEL].state_dict() if model_only
                  else self._flattened(self.states))
        states.pop(RNG, None)
        if from_hf:
            hf = self.sd_adapter.to_hf(states)
            dcp.load(hf, storage_reader=self.sd_adapter.get_hf_storage_reader(
                path, self.config.initial_load_in_hf_quantized))
            states = self.sd_adapter.from_hf(hf)
        else:
            dcp.load(states, checkpoint_id=path)
        if model_only:
            self.states[MODEL].load_state_dict(states)
        log.info("rank %d: loaded the initial checkpoint %s%s", dist.rank(), path,
                 " (Hugging Face safetensors)" if from_hf else "")
        return True


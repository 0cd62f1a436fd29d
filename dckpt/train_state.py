"""TrainState: everything a training run needs to resume, as one DCP ``Stateful``.

Model and optimizer go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), so DDP and FSDP2 (``fully_shard``) models and
their optimizers save sharded and load on another world size. Scheduler, grad scaler and
data-loader (or sampler) positions go through their own ``state_dict()``; ``extra`` is a
dict of the user's values, updated in place on load.

Random number generator states differ per rank, so each rank stores its own under a
rank-local key (``rng.__rank<r>``, see dckpt.state_checks.RANK_LOCAL). On load each rank takes its
own; after a change of world size the ranks the checkpoint did not have keep theirs and say
so (a resharded run does not replay the same random stream anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from dckpt import dist
from dckpt.arguments import check_bool
from dckpt.errors import ArgumentError, DckptError, StateDictError
from dckpt.state_checks import RANK_LOCAL

__all__ = ["TrainState", "RandomStates", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

# The keys of the checkpoint being loaded, while dckpt.load plans it: a rank asks only for
# the random states the checkpoint holds for it (none after the world grew; no CUDA state
# from a CPU run).
_loading_keys: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "dckpt_loading_keys", default=None)


@contextlib.contextmanager
def loading(keys: frozenset[str]) -> Iterator[None]:
    token = _loading_keys.set(keys)
    try:
        yield
    finally:
        _loading_keys.reset(token)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random states (torch, CUDA, numpy, python) as tensors: no pickle."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    assert kind == "MT19937"
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_misc": torch.tensor([pos, has_gauss, 0], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss],
                                     dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` returned (the parts present)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if {"numpy_keys", "numpy_misc", "numpy_gauss"} <= state.keys():
        pos, has_gauss, _ = (int(v) for v in state["numpy_misc"])
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                             has_gauss, float(state["numpy_gauss"][0])))
    if {"python", "python_gauss"} <= state.keys():
        py = [int(v) for v in state["python"]]
        gauss = float(state["python_gauss"][0])
        random.setstate((py[0], tuple(py[1:]), None if gauss != gauss else gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([cuda[i] for i in range(n)])


class TrainState(Stateful):
    """A training run's state for ``dckpt.save`` / ``load`` / ``CheckpointManager``:

        state = {"app": dckpt.TrainState(model, optimizer, scheduler=sched, extra={"epoch": 0})}

    ``model`` (and ``optimizer``) may be one module (optimizer) or a list of them.
    ``dataloader``: anything with ``state_dict()`` / ``load_state_dict()`` (a stateful data
    loader or sampler); its position is the same on every rank or saved by rank 0.
    ``extra``: a dict of tensors or plain values (numbers, strings, lists), updated in place
    on load. ``rng=False`` leaves the random states out.
    """

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module],
                 optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None, *,
                 scheduler: Any = None, scaler: Any = None, dataloader: Any = None,
                 extra: dict[str, Any] | None = None, rng: bool = True) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.dataloader = dataloader
        self.extra = extra if extra is not None else {}
        self.rng = rng
        models = model if isinstance(model, list) else [model]
        if not models or not all(isinstance(m, torch.nn.Module) for m in models):
            raise ArgumentError(f"TrainState model must be a torch.nn.Module or a non-empty "
                                f"list of them, got {type(model).__name__}")
        optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        for name, obj in (*(("optimizer", o) for o in optimizers), ("scheduler", scheduler),
                          ("scaler", scaler), ("dataloader", dataloader)):
            if obj is not None and not (hasattr(obj, "state_dict")
                                        and hasattr(obj, "load_state_dict")):
                raise ArgumentError(f"TrainState {name}: {type(obj).__name__} has no "
                                    "state_dict() / load_state_dict()")
        if not isinstance(self.extra, dict):
            raise ArgumentError(f"TrainState extra must be a dict, got {type(extra).__name__}")
        check_bool(rng, "TrainState rng")

    def _optimizers(self) -> Any:
        return () if self.optimizer is None else self.optimizer

    def _module(self) -> torch.nn.Module:
        """The model as one module: a list of them under a ModuleList (keys ``0.``, ``1.``...),
        as DCP's state-dict functions take one module."""
        if isinstance(self.model, torch.nn.Module):
            return self.model
        return torch.nn.ModuleList(self.model)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._module(), self._optimizers())
        sd: dict[str, Any] = {"model": model_sd}
        if self.optimizer is not None:
            sd["optim"] = optim_sd
        for name in ("scheduler", "scaler", "dataloader"):
            obj = getattr(self, name)
            if obj is not None:
                sd[name] = obj.state_dict()
        if self.extra:
            sd["extra"] = dict(self.extra)
        if self.rng:
            rng = RandomStates().state_dict()
            if rng:
                sd["rng"] = rng
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put what ``state_dict()`` returned back; StateDictError when it does not fit."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not isinstance(state_dict, Mapping) or "model" not in state_dict:
            raise StateDictError("TrainState.load_state_dict takes what a TrainState's "
                                 "state_dict() returned (a dict with 'model'), got "
                                 f"{type(state_dict).__name__}")
        try:
            set_state_dict(self._module(), self._optimizers(),
                           model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict.get("optim", {}))
            for name in ("scheduler", "scaler", "dataloader"):
                obj = getattr(self, name)
                if obj is not None:
                    obj.load_state_dict(state_dict[name])
            self.extra.update(state_dict.get("extra", {}))
            if self.rng:
                RandomStates().load_state_dict(state_dict.get("rng", {}))
        except DckptError:
            raise
        except Exception as e:  # the torch objects' own refusals: a state that does not fit
            raise StateDictError(f"TrainState.load_state_dict: {type(e).__name__}: {e}") from e


class RandomStates(Stateful):
    """This rank's random states as a DCP ``Stateful``, under its rank-local key
    (``__rank<r>``), for any key of a state dict. A load restores the parts the checkpoint
    holds for this rank (none after the world grew; no CUDA state from a CPU run) and keeps
    the others, saying so."""

    def state_dict(self) -> dict[str, Any]:
        mine = f"{RANK_LOCAL}{dist.rank()}"
        rng = rng_state()
        stored = _loading_keys.get()
        if stored is not None:
            held = {k for k in rng if any(f".{s}".endswith(f".{mine}.{k}") for s in stored)}
            if held != set(rng):
                log.warning("rank %d: the checkpoint holds no %s random state for this "
                            "rank (saved by fewer ranks, or without CUDA); keeping the "
                            "current one", dist.rank(), ", ".join(sorted(set(rng) - held)))
            rng = {k: v for k, v in rng.items() if k in held}
        return {mine: rng} if rng else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = state_dict.get(f"{RANK_LOCAL}{dist.rank()}")
        if mine:
            set_rng_state(mine)

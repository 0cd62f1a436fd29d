"""dckpt: a distributed sharded checkpoint engine for PyTorch, built on DCP and fsspec.

The public names are imported on first use (PEP 562): ``import dckpt`` costs nothing until
one is touched, so ``python -m dckpt.prefetch``, which runs while the training processes
start, never waits for torch's import (2-10 s).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "dckpt.api": ("save", "async_save", "load", "export"),
    "dckpt.catalog": ("list_checkpoints", "verify", "inspect", "delete", "gc", "status",
                      "health", "diff"),
    "dckpt.config": ("SaveConfig", "LoadConfig", "ManagerConfig"),
    "dckpt.errors": ("DckptError", "CheckpointNotFoundError", "IntegrityError", "FormatError",
                     "NewerFormatError", "UnsafeValueError", "CommitError", "CheckpointExistsError",
                     "StateDictError", "UnsavableStateError", "ArgumentError", "StorageError",
                     "SaveTimeoutError"),
    "dckpt.info": ("CheckpointInfo",),
    "dckpt.logs": ("configure_logging",),
    "dckpt.manager": ("CheckpointManager",),
    "dckpt.manifest": ("Manifest", "TensorEntry", "ValueEntry"),
    "dckpt.metrics": ("Metrics",),
    "dckpt.pipeline": ("Pipeline",),
    "dckpt.reader": ("Reader",),
    "dckpt.retention": ("KeepLast", "KeepBest", "KeepEvery", "KeepAll"),
    "dckpt.saver": ("SaveHandle", "AsyncSaver"),
    "dckpt.staging": ("Stager",),
    "dckpt.status": ("Status",),
    "dckpt.sweep": ("GcReport",),
    "dckpt.train_state": ("TrainState",),
    "dckpt.triggers": ("Trigger", "EverySteps", "EverySeconds", "AtEpochEnd", "OnImprove",
                       "OnPreemption"),
    "dckpt.upkeep": ("RetentionReport",),
    "dckpt.verify": ("VerifyReport", "Problem"),
    "dckpt.writer": ("Writer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [  # the same names as _EXPORTS (a test checks)
    "save", "async_save", "load", "list_checkpoints", "verify", "inspect", "delete", "gc",
    "export", "status", "health", "diff", "SaveConfig", "LoadConfig", "ManagerConfig",
    "DckptError", "CheckpointNotFoundError", "IntegrityError", "FormatError", "NewerFormatError",
    "UnsafeValueError", "CommitError", "CheckpointExistsError", "StateDictError",
    "UnsavableStateError", "ArgumentError", "StorageError", "SaveTimeoutError",
    "CheckpointInfo", "configure_logging",
    "CheckpointManager", "Manifest", "TensorEntry", "ValueEntry", "Metrics", "Pipeline",
    "Reader", "KeepLast", "KeepBest", "KeepEvery", "KeepAll", "SaveHandle", "AsyncSaver",
    "Stager", "Status", "GcReport", "TrainState", "Trigger", "EverySteps", "EverySeconds",
    "AtEpochEnd", "OnImprove", "OnPreemption", "RetentionReport", "VerifyReport", "Problem",
    "Writer",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'dckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package: ``dckpt.verify`` (and
    ``status``, ``diff``, ``export``, ``health``) must stay the public function, never become
    the module of the same name."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from dckpt.api import async_save, export, load, save
    from dckpt.catalog import delete, diff, gc, health, inspect, list_checkpoints, status, verify
    from dckpt.config import LoadConfig, ManagerConfig, SaveConfig
    from dckpt.errors import (
        ArgumentError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        CommitError,
        DckptError,
        FormatError,
        IntegrityError,
        NewerFormatError,
        SaveTimeoutError,
        StateDictError,
        StorageError,
        UnsafeValueError,
        UnsavableStateError,
    )
    from dckpt.info import CheckpointInfo
    from dckpt.logs import configure_logging
    from dckpt.manager import CheckpointManager
    from dckpt.manifest import Manifest, TensorEntry, ValueEntry
    from dckpt.metrics import Metrics
    from dckpt.pipeline import Pipeline
    from dckpt.reader import Reader
    from dckpt.retention import KeepAll, KeepBest, KeepEvery, KeepLast
    from dckpt.saver import AsyncSaver, SaveHandle
    from dckpt.staging import Stager
    from dckpt.status import Status
    from dckpt.sweep import GcReport
    from dckpt.train_state import TrainState
    from dckpt.triggers import AtEpochEnd, EverySeconds, EverySteps, OnImprove, OnPreemption, Trigger
    from dckpt.upkeep import RetentionReport
    from dckpt.verify import Problem, VerifyReport
    from dckpt.writer import Writer

"""dckpt: a distributed sharded checkpoint engine for PyTorch, built on DCP and fsspec."""

from __future__ import annotations

import sys


def _running_prefetch(argv: list[str]) -> bool:
    """Whether the interpreter was started as ``python [options] -m dckpt.prefetch``."""
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-c":
        if argv[i] == "-m":
            return argv[i + 1: i + 2] == ["dckpt.prefetch"]
        i += 2 if argv[i] in ("-X", "-W") else 1
    return False


# `python -m dckpt.prefetch` runs while the training processes start, to hide their start-up:
# it must not wait for torch's import (2-10 s) itself, so it gets the bare package
if not _running_prefetch(getattr(sys, "orig_argv", [])):
    from dckpt.api import (
        async_save,
        delete,
        diff,
        export,
        gc,
        health,
        inspect,
        list_checkpoints,
        load,
        save,
        status,
        verify,
    )
    from dckpt.config import LoadConfig, SaveConfig
    from dckpt.errors import (
        ArgumentError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        CommitError,
        DckptError,
        FormatError,
        IntegrityError,
        StateDictError,
        StorageError,
        UnsafeValueError,
    )
    from dckpt.info import CheckpointInfo
    from dckpt.logs import configure_logging
    from dckpt.manager import CheckpointManager, RetentionReport
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
    from dckpt.verify import Problem, VerifyReport
    from dckpt.writer import Writer

__version__ = "0.1.0"

__all__ = [
    "save", "async_save", "SaveHandle", "AsyncSaver", "Stager", "load", "list_checkpoints",
    "verify", "inspect", "delete", "gc", "export", "GcReport", "Manifest", "TensorEntry",
    "ValueEntry",
    "Writer", "Reader", "SaveConfig", "LoadConfig", "CheckpointInfo", "VerifyReport", "Problem",
    "DckptError", "CheckpointNotFoundError", "IntegrityError", "FormatError", "UnsafeValueError",
    "CommitError", "CheckpointExistsError", "StateDictError", "ArgumentError", "StorageError",
    "TrainState", "KeepLast",
    "KeepBest", "KeepEvery", "KeepAll", "CheckpointManager", "RetentionReport",
    "Pipeline", "status", "Status", "Metrics", "configure_logging",
    "health", "diff",
]

"""The only module that calls torch.distributed: groups with timeouts, and collectives
whose failures become the same DckptError on every rank."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dckpt.arguments import storage_error
from dckpt.errors import CheckpointExistsError, CommitError, DckptError, IntegrityError

ProcessGroup = dist.ProcessGroup

__all__ = ["active", "rank", "world_size", "checkpoint_group", "broadcast", "broadcast_tensor",
           "any_true",
           "translate", "peer_failure"]

log = logging.getLogger(__name__)

_groups: dict[tuple[int, float, str], dist.ProcessGroup] = {}


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def checkpoint_group(timeout_s: float, purpose: str = "commit") -> dist.ProcessGroup | None:
    """(all ranks) A gloo group over every rank for checkpoint collectives, or None alone.

    Derived from the default group with ``new_group`` (never a private TCPStore: under
    torchrun that can hang, pytorch/pytorch#191989), so checkpoint traffic never queues
    behind the training's own NCCL or gloo collectives, and a dead peer fails within
    ``timeout_s``. Created once per default group, timeout and purpose, collectively:
    ``"commit"`` carries saves and loads (an async save's from its persist thread),
    ``"control"`` the caller-thread agreements made while a save may be in flight.
    """
    if not active():
        return None
    key = (id(dist.group.WORLD), float(timeout_s), purpose)
    group = _groups.get(key)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        _groups[key] = group
    return group


def broadcast(obj: object, group: dist.ProcessGroup | None) -> object:
    """(all ranks) ``obj`` from rank 0 of ``group``; the value itself when alone."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def broadcast_tensor(t: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
    """(all ranks) ``t`` from rank ``src`` of ``group`` (in place); nothing alone."""
    if group is not None:
        dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)


def any_true(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """(all ranks) Whether ``flag`` is true on any rank of ``group``."""
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):  # say which credentials to check
        return str(storage_error(exc, "writing"))
    return str(exc) if isinstance(exc, DckptError) else f"{type(exc).__name__}: {exc}"


def translate(exc: CheckpointException, *, what: str, saving: bool) -> DckptError:
    """One DckptError for a DCP collective failure; identical on every rank.

    DCP hands every rank the same failure map, so the choice below is the same everywhere.
    Saves always raise CommitError (or CheckpointExistsError); loads keep the class the
    failing ranks raised when they agree, IntegrityError when all are integrity problems.
    """
    errors = {r: e for r, (e, _trace) in sorted(exc.failures.items())}
    failures = {r: _describe(e) for r, e in errors.items()}
    kinds = {type(e) for e in errors.values()}
    if saving:
        cls: type[DckptError] = (CheckpointExistsError if kinds == {CheckpointExistsError}
                                 else CommitError)
    elif len(kinds) == 1 and issubclass(next(iter(kinds)), DckptError):
        cls = next(iter(kinds))  # type: ignore[assignment]  # a DckptError subclass, checked above
    elif all(isinstance(e, IntegrityError) for e in errors.values()):
        cls = IntegrityError
    else:
        cls = DckptError
    first_rank = next(iter(failures))
    message = (f"{what} failed on rank {', '.join(map(str, failures))}: "
               f"{failures[first_rank].splitlines()[0]}")
    return cls(message, failures=failures)


def peer_failure(exc: BaseException, *, what: str, saving: bool) -> DckptError:
    """A collective broke (a rank died or timed out): say so in the right error type."""
    cls = CommitError if saving else DckptError
    return cls(f"{what} failed on rank {rank()}: a collective with the other ranks broke "
               f"({type(exc).__name__}: {exc}). A rank died or stopped answering within the "
               "timeout; earlier checkpoints are intact")


def total(value: int, group: dist.ProcessGroup | None) -> int:
    """(all ranks) The sum of ``value`` over the ranks of ``group``."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())

"""The only module that calls torch.distributed: groups with timeouts, and collectives
whose failures become the same DckptError on every rank."""

from __future__ import annotations

import atexit
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dckpt.arguments import storage_error
from dckpt.errors import (
    ArgumentError,
    CheckpointExistsError,
    CommitError,
    DckptError,
    IntegrityError,
    StateDictError,
    StorageError,
    UnsavableStateError,
    headline,
)

ProcessGroup = dist.ProcessGroup
T = TypeVar("T")


__all__ = ["active", "rank", "world_size", "local_rank", "local_world_size", "gather",
           "checkpoint_group", "broadcast", "broadcast_tensor", "broadcast_from", "node",
           "exchange", "any_true", "total", "by_value", "ranks_text", "refuse_differences", "agreed",
           "translate", "raise_interrupt", "peer_failure", "destroyed", "Agreed", "Agreement",
           "calls_between"]

log = logging.getLogger(__name__)

_groups: dict[str, tuple[object, dist.ProcessGroup, float]] = {}
"""purpose -> (the default group it was derived from, the group, the timeout it has now).
The entry holds the default group itself, not its id: a destroyed and re-created default
group (a new id, or the old one reused) never gets a group of the old one back. Cleared at
exit, while the interpreter still runs: a gloo group left for the interpreter's teardown to
free can abort the process."""
_made_as = [0]
"""This process's rank when it made them (``rank()`` says 0 once the group is destroyed)."""
atexit.register(_groups.clear)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This rank's index on its node (torchrun's ``LOCAL_RANK``; the rank without it)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def local_world_size() -> int:
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``; the world without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def gather(obj: object, group: dist.ProcessGroup | None) -> list[object]:
    """(all ranks) Every rank's ``obj``, in rank order; ``[obj]`` alone."""
    if group is None:
        return [obj]
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def checkpoint_group(timeout_s: float, purpose: str = "commit") -> dist.ProcessGroup | None:
    """(all ranks) A gloo group over every rank for checkpoint collectives, or None alone.

    Derived from the default group with ``new_group`` (never a private TCPStore: under
    torchrun that can hang, pytorch/pytorch#191989), so checkpoint traffic never queues
    behind the training's own NCCL or gloo collectives, and a dead peer fails within
    ``timeout_s``. Made once per default group and purpose, collectively, at the first call
    for that purpose; a later call with another timeout sets the group's (so ranks passing
    different timeouts still meet on the same group, each waiting its own). ``"commit"``
    carries saves and loads (an async save's from its persist thread), ``"commit-control"``
    the caller-thread agreements made while a save may be in flight, ``"trigger"`` the
    manager's agreements, ``"memory"`` (and ``"memory-control"``) the memory tier's saves,
    which may run beside a storage save, ``"drain"`` its copies to storage, ``"arguments"``
    the comparison of the managers' arguments, ``"calls"`` each call's argument checks
    (``agreed``).
    """
    if not active():
        return None
    world = dist.group.WORLD
    entry = _groups.get(purpose)
    if entry is None or entry[0] is not world:
        try:
            made = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # the other ranks did not make it with this one
            raise DckptError(
                f"making dckpt's gloo group ({purpose!r}) failed on rank {rank()} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): every rank makes it "
                "at its first save or load (or manager) that needs it, so every rank must "
                "make the same calls; or a rank died") from e
        entry = (world, made, float(timeout_s))
        _groups[purpose] = entry
        _made_as[0] = rank()
    elif entry[2] != float(timeout_s):
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.4
        if set_timeout is not None:
            set_timeout(timedelta(seconds=timeout_s), entry[1])
            entry = (world, entry[1], float(timeout_s))
            _groups[purpose] = entry
        else:  # the group keeps the timeout it was made with
            log.debug("dckpt's %r group keeps its timeout of %g s", purpose, entry[2])
    return entry[1]


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


def broadcast_from(obj: object, src: int, group: dist.ProcessGroup | None) -> object:
    """(all ranks) ``obj`` from global rank ``src``; the value itself when alone."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def node() -> int:
    """This rank's node: torchrun's ``GROUP_RANK`` (the agent's rank), else the rank over
    ``LOCAL_WORLD_SIZE``."""
    group_rank = os.environ.get("GROUP_RANK")
    return int(group_rank) if group_rank is not None else rank() // max(1, local_world_size())


def ranks_text(ranks: list[int]) -> str:
    """``[0, 2, 3, 4, 7]`` -> ``"ranks 0, 2-4, 7"``."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def by_value(values: list[object]) -> str:
    """Each rank's value, ranks that hold the same one together: ``[5, 5, 6]`` -> ``"5 on
    ranks 0-1; 6 on rank 2"`` (a message that stays one line at any world size)."""
    held: dict[str, list[int]] = {}
    for r, value in enumerate(values):
        held.setdefault(str(value), []).append(r)
    return "; ".join(f"{value} on {ranks_text(ranks)}" for value, ranks in held.items())


def refuse_differences(mine: dict[str, str], group: dist.ProcessGroup | None, what: str,
                       fix: str) -> None:
    """(all ranks) The same ArgumentError on every rank where the ranks' ``mine`` differ:
    ``what``, then each differing entry with the ranks that hold each value, then ``fix``."""
    everyone = cast(list[dict[str, str]], gather(mine, group))
    differ = [f"  - {name}: " + by_value([theirs[name] for theirs in everyone])
              for name in mine if len({theirs[name] for theirs in everyone}) > 1]
    if differ:
        raise ArgumentError(f"{what}:\n" + "\n".join(differ) + f"\n{fix}")


def agreed(check: Callable[[], T], what: str, *, timeout_s: float, saving: bool,
           alike: str = "") -> T:
    """(all ranks) ``check()`` (the argument checks of the call ``what``), whose DckptError
    on any rank is raised on every rank, word for word, at once; and ranks that made
    different calls at once are refused alike. A call refused on one rank alone (a wrong
    argument there) left the others in its first collective, and ranks in different calls
    (one loads, another saves) met in collectives that do not pair up: both failed as a
    broken collective after the timeout. The cost: one all-reduce of two integers.
    ``timeout_s``: the call's collective timeout (its default where the config given is
    refused); ``saving``: a peer that fails it is a CommitError; ``alike``: arguments the
    ranks must pass alike, as text (ranks apart made different calls)."""
    raised: Exception | None = None
    try:
        result, error = check(), None
    except DckptError as e:
        result, error, raised = None, e, e
    except Exception as e:  # not a refusal (the storage failed where the check opened it):
        # shared all the same, for no rank to wait on another that left
        result, raised = None, e
        error = (StorageError if isinstance(e, OSError) else DckptError)(
            f"{type(e).__name__}: {str(e)[:300]}")
    group = checkpoint_group(timeout_s, purpose="calls") if active() else None
    if group is None:
        if raised is not None:
            raise raised
        return cast(T, result)
    call = f"{what}({alike})" if alike else what
    code = zlib.crc32(call.encode()) & 0x3FFFFFFF  # the call's number; a failure: above all
    with collectives(what, saving=saving):
        # the largest and (negated) the smallest number: equal where every rank made this
        # call and passed its checks (two int32s: measured cheaper than three, or int64s)
        t = torch.tensor([code if error is None else 0x7FFFFFFF, -code], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        if int(t[0]) == -int(t[1]):
            return cast(T, result)
        mine = (call, None if error is None else (type(error).__name__, str(error)))
        everyone = cast(list[tuple[str, tuple[str, str] | None]], gather(mine, group))
    errors = [(r, e) for r, (_, e) in enumerate(everyone) if e is not None]
    if not errors:
        raise ArgumentError("the ranks made different dckpt calls at once ("
                            + by_value([c for c, _ in everyone]) + "); every rank "
                            "calls the same collective function at the same point, with the "
                            "same arguments where they must be alike")
    r, (name, text) = errors[0]
    cls = next((c for c in (ArgumentError, StateDictError, UnsavableStateError,
                            CheckpointExistsError, StorageError) if c.__name__ == name),
               DckptError)
    others = "" if len(errors) == 1 else f" (and on {ranks_text([e[0] for e in errors[1:]])})"
    raise cls(f"{what} refused on rank {r}{others}: {text}") from raised


CHUNK_BYTES = 256 << 20
"""Point-to-point transfers go in pieces of at most this many bytes."""


def _pieces(t: torch.Tensor) -> list[torch.Tensor]:
    return [t[i: i + CHUNK_BYTES] for i in range(0, t.numel(), CHUNK_BYTES)]


def exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
             group: dist.ProcessGroup | None) -> None:
    """(the ranks named) Send each flat uint8 tensor of ``sends`` to its global rank and
    receive into each of ``recvs`` from its global rank, all at once; pairs of ranks must
    list their tensors in the same order."""
    if group is None:
        return
    works = [dist.isend(p, dst=to, group=group) for to, t in sends for p in _pieces(t)]
    works += [dist.irecv(p, src=frm, group=group) for frm, t in recvs for p in _pieces(t)]
    for w in works:
        if w is not None:
            w.wait()


def any_true(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """(all ranks) Whether ``flag`` is true on any rank of ``group``."""
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _describe(exc: BaseException, doing: str) -> str:
    if isinstance(exc, PermissionError):  # say which credentials to check
        return str(storage_error(exc, doing))
    return str(exc) if isinstance(exc, DckptError) else f"{type(exc).__name__}: {exc}"


def translate(exc: CheckpointException, *, what: str, saving: bool) -> DckptError:
    """One DckptError for a DCP collective failure; identical on every rank.

    DCP hands every rank the same failure map, so the choice below is the same everywhere.
    Saves always raise CommitError (CheckpointExistsError, or UnsavableStateError where every
    failing rank refused its state dict); loads keep the class the
    failing ranks raised when they agree (StorageError for the storage's own errors),
    IntegrityError when all are integrity problems.
    """
    errors = {r: e for r, (e, _trace) in sorted(exc.failures.items())}
    failures = {r: _describe(e, "writing" if saving else "reading") for r, e in errors.items()}
    # the class each failure has where it leaves dckpt alone (a storage library's error is
    # a StorageError: a response cut short, a connection reset)
    kinds = {type(storage_error(e, what)) for e in errors.values()}
    if saving:
        cls: type[DckptError] = (
            CheckpointExistsError if kinds == {CheckpointExistsError}
            else ArgumentError if kinds == {ArgumentError}
            else UnsavableStateError if all(issubclass(k, StateDictError) for k in kinds)
            else CommitError)
    elif len(kinds) == 1 and issubclass(next(iter(kinds)), DckptError):
        cls = next(iter(kinds))  # type: ignore[assignment]  # a DckptError subclass, checked above
    elif all(isinstance(e, IntegrityError) for e in errors.values()):
        cls = IntegrityError
    else:
        cls = DckptError
    first_rank = next(iter(failures))
    message = (f"{what} failed on rank {', '.join(map(str, failures))}: "
               f"{headline(failures[first_rank])}")
    return cls(message, failures=failures)


def raise_interrupt(exc: CheckpointException) -> None:
    """Raise this rank's own KeyboardInterrupt or SystemExit, where DCP caught it as a
    failure (it wraps whatever a step raises): Ctrl-C during a save or a load stops the
    program as it would anywhere else, instead of becoming a failed save that a manager's
    training loop goes on past. The other ranks see this rank's failure as usual."""
    mine = exc.failures.get(rank())
    if mine is not None and isinstance(mine[0], KeyboardInterrupt | SystemExit):
        raise mine[0]


def destroyed() -> bool:
    """Whether the process group dckpt's groups came from was destroyed since
    (``dist.destroy_process_group()``, the usual last line of a training script)."""
    return bool(_groups) and not active()


def peer_failure(exc: BaseException, *, what: str, saving: bool) -> DckptError:
    """A collective broke (a rank died or timed out, or the process group was destroyed):
    say so in the right error type."""
    cls = CommitError if saving else DckptError
    if destroyed():
        return cls(f"{what} failed on rank {_made_as[0]}: the process group was destroyed "
                   "(dist.destroy_process_group()) while it ran; wait for the saves in "
                   "flight first (handle.wait(), or CheckpointManager.close()). Nothing was "
                   f"committed for it; earlier checkpoints are intact ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
    return cls(f"{what} failed on rank {rank()}: a collective with the other ranks broke "
               f"({type(exc).__name__}: {exc}). A rank died, stopped answering within the "
               "timeout, or called another collective (every rank calls the same dckpt "
               "function at once); earlier checkpoints are intact")


@contextmanager
def collectives(what: str, *, saving: bool) -> Iterator[None]:
    """A collective that breaks inside (gloo's RuntimeError: a peer died, timed out, or
    called another collective) is the DckptError that says so, not an unexpected one."""
    try:
        yield
    except DckptError:
        raise
    except (RuntimeError, ValueError) as e:
        if not destroyed() and (isinstance(e, ValueError) or not active()):
            raise  # a ValueError is a group's only once destroyed ("not registered")
        raise peer_failure(e, what=what, saving=saving) from e


def total(value: int, group: dist.ProcessGroup | None) -> int:
    """(all ranks) The sum of ``value`` over the ranks of ``group``."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed at one exchange of ``Agreement``."""

    signalled: bool
    """A preemption signal reached some rank."""
    elapsed_s: float
    """The most seconds since the last save over the ranks, when the exchange started."""
    saves: int
    """Saves started before the exchange (all ranks save at the same calls): a time figure
    from before the latest save is stale."""


MAX_CALLS_BETWEEN = 10_000


def calls_between(interval_s: float, per_call_s: float) -> int:
    """Calls from one exchange to the next, for exchanges about every ``interval_s`` at the
    agreed ``per_call_s`` (every call when calls are slower, or not timed yet)."""
    gap = interval_s / per_call_s if per_call_s > 0 else 1.0
    return max(1, min(MAX_CALLS_BETWEEN, int(gap)))


class Agreement:
    """The ranks' shared view of rank-local facts (signals, clocks), without a collective
    that blocks: an all-reduce (MAX) is started at one call and read at a later one, when it
    has long finished. The calls between exchanges come from the agreed time per call
    (``calls_between``), so every rank computes the same schedule."""

    def __init__(self, timeout_s: float, interval_s: float) -> None:
        self.group = checkpoint_group(timeout_s, purpose="trigger")
        self.interval_s = interval_s
        self.exchanges = 0
        self._work: Any = None
        self._buf = torch.zeros(4, dtype=torch.float64)
        self._calls = 0
        self._next = 0  # the call of the next exchange
        self._launched_at = (0, time.monotonic())  # (call, time) of the last exchange

    def exchange(self, signalled: bool, elapsed_s: float, saves: int) -> Agreed | None:
        """(all ranks, every call) What the ranks agreed at the previous exchange, when this
        call is an exchange point and one came before; None otherwise."""
        if self.group is None:
            return Agreed(signalled, elapsed_s, saves)
        self._calls += 1
        if self._calls < self._next:
            return None
        now = time.monotonic()
        calls, then = self._launched_at
        per_call = (now - then) / max(1, self._calls - calls) if self._work is not None else 0.0
        agreed = None
        if self._work is not None:
            self._work.wait()
            b = self._buf.tolist()
            agreed = Agreed(b[0] > 0, b[1], int(b[2]))
            self._next = self._calls + calls_between(self.interval_s, b[3])
        else:
            self._next = self._calls + 1
        self._buf = torch.tensor([1.0 if signalled else 0.0, elapsed_s, float(saves), per_call],
                                 dtype=torch.float64)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group,
                                     async_op=True)
        self._launched_at = (self._calls, now)
        self.exchanges += 1
        return agreed

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None

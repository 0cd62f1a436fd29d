"""save / async_save / load / export: the public functions over the DCP plug-ins (the
repository's other operations, which need no torch, are ``dckpt.catalog``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from dckpt import dedup, dist
from dckpt.arguments import (
    check_bool,
    check_config,
    check_path,
    check_state_dict,
    check_step,
    public,
    storage_error,
)
from dckpt.config import LoadConfig, SaveConfig
from dckpt.errors import (
    ArgumentError,
    CheckpointNotFoundError,
    DckptError,
    FormatError,
    IntegrityError,
    NewerFormatError,
    StateDictError,
    listing,
)
from dckpt.export import FORMATS, export_checkpoint
from dckpt.gcpause import paused_gc
from dckpt.global_plan import quiet_single_process
from dckpt.info import CheckpointInfo, info_from_manifest
from dckpt.manifest import Manifest
from dckpt.optim_state import params_by_id
from dckpt.overlaps import differing
from dckpt.planner import SafeLoadPlanner
from dckpt.reader import Reader
from dckpt.repository import (
    committed_steps,
    decode_manifest,
    open_repository,
    quarantined,
    read_manifest,
    read_manifest_bytes,
    require_repository,
)
from dckpt.saver import SaveHandle, default_saver, wait_idle
from dckpt.step_metrics import Metrics
from dckpt.storage import Store
from dckpt.torch_internals import load_state_dict
from dckpt.train_state import loading
from dckpt.verify import Progress

__all__ = ["save", "async_save", "load", "export"]

log = logging.getLogger(__name__)

StateDict = dict[str, Any]


@public
def save(state_dict: StateDict, url: str, *, step: int, metrics: Metrics | None = None,
         storage_options: dict | None = None, config: SaveConfig | None = None) -> CheckpointInfo:
    """(collective) Save ``state_dict`` as checkpoint ``step`` and commit it.

    Returns the same CheckpointInfo on every rank. Any failure on any rank raises the same
    CommitError on every rank; nothing is committed and earlier checkpoints stand. Waits
    first for an async save in flight. ``metrics`` are recorded as the coordinator (rank 0)
    passes them: reduce a metric over the ranks first where each rank computes its own.
    """
    # the saver checks the arguments, on every rank at once
    return default_saver().save(state_dict, url, step=step, metrics=metrics,
                                storage_options=storage_options, config=config)


@public
def async_save(state_dict: StateDict, url: str, *, step: int, metrics: Metrics | None = None,
               storage_options: dict | None = None, config: SaveConfig | None = None
               ) -> SaveHandle:
    """(collective) Stage ``state_dict`` into reused host memory and return a SaveHandle;
    the write and the commit run in the background.

    After it returns the caller may change every tensor: the checkpoint holds the values
    at the call (in ``config.overlap`` mode, after ``handle.wait_staged()``). A save still
    in flight is waited for first, or this one is skipped (``config.if_busy``). A failure
    in the background never raises here: ``handle.wait()`` raises it, and the next save's
    info lists it.
    """
    # the saver checks the arguments, on every rank at once
    return default_saver().async_save(state_dict, url, step=step, metrics=metrics,
                                      storage_options=storage_options, config=config)


@dataclass
class _Found:
    """(coordinator -> all ranks) The manifest to try next, as stored (every rank decodes
    it), the steps skipped on the way, the error that ends the search, and the newest
    committed step (for the data lost)."""

    step: int | None = None
    raw: bytes | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    error: DckptError | None = None
    newest: tuple[int, float | None] | None = None


def _find(store: Store, step: int | None, passed: set[int]) -> _Found:
    """(coordinator) The bytes of the asked step's manifest, or of the newest readable one
    not yet tried or skipped, and not quarantined."""
    found = _Found()
    try:
        if step is not None:
            found.step, found.raw = read_manifest_bytes(store, step)
            return found
        require_repository(store)
        steps = committed_steps(store)
        if not steps:
            found.error = CheckpointNotFoundError(f"{store.url} holds no committed checkpoint")
            return found
        marked = quarantined(store)
        for s in reversed(steps):
            if s in passed:
                continue
            if s in marked:
                found.skipped.append((s, f"quarantined by verify: {marked[s]}"))
                continue
            try:
                found.step, found.raw = read_manifest_bytes(store, s)
                break
            except (CheckpointNotFoundError, FormatError) as e:  # gone, or damaged (a
                found.skipped.append((s, str(e)))  # folder, EIO, ELOOP): the older may be
                # fine; the storage failing raises (no fallback past a connection reset)
        newest = steps[-1]
        try:  # the newest's time, unless it is the one found (its decoding tells)
            created = None if found.step == newest else read_manifest(store, newest).created_at
        except Exception:
            created = None
        found.newest = (newest, created)
    except Exception as e:
        found.error = storage_error(e, f"finding a checkpoint in {store.url}")
    return found


def _decode_found(found: _Found, url: str, group: dist.ProcessGroup | None
                  ) -> tuple[Manifest | None, IntegrityError | None]:
    """(all ranks) The found manifest, decoded by every rank at once, or the error that
    makes it unusable: the same on every rank (one rank's decoding may fail where the
    others' did not, for want of memory)."""
    assert found.step is not None and found.raw is not None
    try:
        manifest: Manifest | None = decode_manifest(found.raw, found.step, url)
        problem: IntegrityError | None = None
    except IntegrityError as e:
        manifest, problem = None, e
    except MemoryError as e:
        manifest, problem = None, IntegrityError(
            f"{url}: step {found.step}'s manifest ({len(found.raw)} bytes) does not fit in "
            f"memory on rank {dist.rank()} ({e}); free host memory there, or load an older "
            "step")
    problems = [p for p in dist.gather(problem, group) if p is not None]
    return (manifest, None) if not problems else (None, problems[0])  # type: ignore[return-value]


@public
def load(state_dict: StateDict, url: str, *, step: int | None = None, partial: bool = False,
         storage_options: dict | None = None, config: LoadConfig | None = None) -> CheckpointInfo:
    """(collective) Load a checkpoint into ``state_dict`` in place.

    ``step=None``: the newest committed checkpoint that loads cleanly; ones that fail
    verification, or that ``verify(quarantine=True)`` marked, are skipped (all ranks agree)
    and listed in ``info.skipped``. An explicit ``step`` that fails raises IntegrityError.
    ``partial=True``: load only the keys of ``state_dict`` (for example the model without
    the optimizer); the checkpoint's other keys are not read. The info is a recovery report:
    ``tried``, ``bytes_read``, ``phase_s`` and the data lost against the newest checkpoint.
    """
    return load_with(Reader, state_dict, url, step=step, partial=partial,
                     storage_options=storage_options, config=config)


def load_with(make_reader: Callable[..., Reader], state_dict: StateDict, url: str, *,
              step: int | None = None, partial: bool = False,
              storage_options: dict | None = None,
              config: LoadConfig | None = None) -> CheckpointInfo:
    """``load``, reading through ``make_reader`` (takes Reader's arguments): the memory
    tier's reader fetches what its node lacks from the nodes that hold it."""
    def check() -> tuple[int | None, Store]:
        check_state_dict(state_dict)
        check_bool(partial, "partial")
        check_config(config, LoadConfig)
        # the URL too: a wrong one on one rank left the others in the first collective
        return check_step(step, optional=True), open_repository(url, storage_options,
                                                                required=False)

    timeout_s = (config if isinstance(config, LoadConfig) else LoadConfig()).collective_timeout_s
    # one rank's refusal is every rank's
    step, store = dist.agreed(check, "dckpt.load", timeout_s=timeout_s, saving=False)
    config = config or LoadConfig()
    store.stall_s = config.io_stall_timeout_s  # finding it too
    with dist.collectives(f"load from {store.url}", saving=False):
        return _load_with(make_reader, state_dict, store, step=step, partial=partial,
                          storage_options=storage_options, config=config)


def _load_with(make_reader: Callable[..., Reader], state_dict: StateDict, store: Store, *,
               step: int | None, partial: bool, storage_options: dict | None,
               config: LoadConfig) -> CheckpointInfo:
    url = store.url  # a str where a path object was given
    wait_idle()  # the checkpoint group carries one thing at a time
    group = dist.checkpoint_group(config.collective_timeout_s)
    asked = cast(list[tuple[int | None, bool, str]], dist.gather((step, partial, url), group))
    if len({(s, p) for s, p, _ in asked}) > 1:  # rank 0's step would load on every rank
        raise ArgumentError("the ranks asked to load different things ("
                            + dist.by_value([f"step={s}, partial={p}" for s, p, _ in asked])
                            + "); every rank must pass the same step and partial")
    # not refused: nodes may mount one shared storage at paths of their own
    urls = {u: r for r, (_, _, u) in reversed(list(enumerate(asked)))}
    elsewhere = "" if len(urls) == 1 else (
        "\nThe ranks passed different URLs (" + ", ".join(
            f"rank {r}: {u}" for u, r in sorted(urls.items(), key=lambda x: x[1])[:4])
        + "): every rank reads the coordinator's manifest, so every rank must pass the URL "
        "of the same repository")
    t0 = time.perf_counter()
    skipped: list[tuple[int, str]] = []
    tried: list[int] = []
    newest: tuple[int, float | None] | None = None
    while True:
        t_find = time.perf_counter()
        passed = set(tried) | {s for s, _ in skipped}
        found = _find(store, step, passed) if dist.rank() == 0 else None
        # IMPORTANT: the bytes, decoded by every rank at once: pickling 10^5 block references
        # to every rank took longer than each rank decoding them, and decoding them on the
        # coordinator first put a second decoding on the way to the first read
        found = dist.broadcast(found, group)  # type: ignore[assignment]
        assert isinstance(found, _Found)
        skipped += found.skipped
        newest = newest or found.newest
        if found.error is not None:
            raise found.error
        if found.raw is None:
            raise IntegrityError(
                f"no committed checkpoint in {url} loads cleanly; tried, newest first:\n"
                + "\n".join(f"  step {s}: {r.splitlines()[0]}" for s, r in skipped)
                + "\nRun `dckpt verify --all` to see every problem" + elsewhere)
        assert found.step is not None
        manifest, problem = _decode_found(found, url, group)
        if problem is not None or manifest is None:
            if step is not None or isinstance(problem, NewerFormatError):
                raise problem or IntegrityError(f"{url}: step {found.step} does not decode")
            log.warning("rank %d: skipping step %d: %s", dist.rank(), found.step, str(problem))
            skipped.append((found.step, str(problem)))
            continue
        if newest is not None and newest[0] == manifest.step:
            newest = (newest[0], manifest.created_at)
        tried.append(manifest.step)
        reader = make_reader(url, step=manifest.step, storage_options=storage_options,
                             config=config, manifest=manifest)
        t_read = time.perf_counter()
        what = f"load of step {manifest.step} from {url}"
        try:
            # the plan and the reads build a few objects per block: no collector passes
            with quiet_single_process(), loading(frozenset(manifest.items)), paused_gc():
                _dcp_load(state_dict, reader, SafeLoadPlanner(partial=partial), group)
        except CheckpointException as e:
            dist.raise_interrupt(e)
            err = dist.translate(e, what=what, saving=False)
            if step is not None or not isinstance(err, IntegrityError):
                raise err from None
            log.warning("rank %d: skipping step %d: %s", dist.rank(), manifest.step, str(err))
            skipped.append((manifest.step, str(err)))
            continue
        except DckptError:
            raise
        except Exception as e:
            raise dist.peer_failure(e, what=what, saving=False) from e
        bytes_read = dist.total(reader.bytes_read, group)
        if not partial and dist.rank() == 0:  # all of it read and verified, by some rank:
            # the next save's base, for the coordinator (rank 0) to check (dedup.usable_base)
            dedup.committed(store, (manifest.step, manifest.attempt), manifest.extents())
        now = time.perf_counter()
        phase_s = {"find": t_read - t_find, **reader.phase_s, "total": now - t0}
        lost_steps = lost_s = None
        if newest is not None:
            lost_steps = newest[0] - manifest.step
            lost_s = newest[1] - manifest.created_at if newest[1] is not None else None
        log.info("rank %d loaded step %d: %d bytes read in %.3f s; %s", dist.rank(),
                 manifest.step, reader.bytes_read, phase_s.get("read", 0.0),
                 f"skipped {[s for s, _ in skipped]}" if skipped else "nothing skipped")
        return info_from_manifest(manifest, url, phase_s=phase_s, skipped=tuple(skipped),
                                  tried=tuple(tried), bytes_read=bytes_read,
                                  data_lost_steps=lost_steps, data_lost_s=lost_s)


def _dcp_load(state_dict: StateDict, reader: Reader, planner: SafeLoadPlanner,
              group: object) -> None:
    """``dcp.load``: a top-level Stateful value loads through its ``state_dict()`` and
    ``load_state_dict``, the others are replaced by what was loaded. Tensors are not checked
    against the runtime protocol (9 us a check, which dcp.load makes twice per value: 0.37 s
    of a 2 s load of 20,000 tensors). A ``load_state_dict`` that refuses what it is given
    (a model of another shape) is a StateDictError on every rank, naming the key (it came
    out as a broken collective)."""
    keys = sorted(state_dict)  # as dcp.load: every rank plans its values in the same order
    stateful = {k for k in keys if not isinstance(state_dict[k], torch.Tensor)
                and isinstance(state_dict[k], Stateful)}
    flat = {k: state_dict[k].state_dict() if k in stateful else state_dict[k] for k in keys}
    planner.stateful = {k: state_dict[k] for k in stateful}
    for k in stateful:  # an optimizer itself: its state, none before a step, made as placed
        by_id = params_by_id(state_dict[k], flat[k])
        if by_id is not None:
            planner.optimizer_params[k] = by_id
    reader.keep_items = True
    try:
        load_state_dict(flat, storage_reader=reader, planner=planner,
                        process_group=group,  # type: ignore[arg-type]
                        no_dist=not dist.active())
    except BaseException:
        planner.forget_made()  # a fallback to an older step, or the caller, starts clean
        raise
    # tied and overlapping keys were read apart (dckpt.overlaps)
    problems = differing(planner.state_dict, planner.tied, planner.destinations)
    for key in keys:
        if key not in stateful:
            state_dict[key] = flat[key]
            continue
        try:
            state_dict[key].load_state_dict(flat[key])
        except Exception as e:
            problems.append(f"{key}: {type(state_dict[key]).__name__}.load_state_dict raised "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if dist.any_true(bool(problems), group):  # type: ignore[arg-type]
        every = cast(list[list[str]], dist.gather(problems, group))  # type: ignore[arg-type]
        lines = list(dict.fromkeys(f"rank {r}: {p}" if len(every) > 1 else p
                                   for r, mine in enumerate(every) for p in mine))
        raise StateDictError(listing("the state dict does not fit the checkpoint", lines))


@public
def export(url: str, to: str, *, step: int | None = None, format: str = "dckpt",
           storage_options: dict | None = None, to_storage_options: dict | None = None,
           progress: Progress | None = None) -> int:
    """Write checkpoint ``step`` (default: the newest) to ``to``: ``"dckpt"`` a new repository
    holding only it; ``"torch"`` the full unsharded state dict as one ``torch.save`` file;
    ``"safetensors"`` its tensors as one safetensors file. Returns the bytes written. Every
    byte read is verified. Not collective."""
    step = check_step(step, optional=True)
    to = check_path(to, "the export destination")
    store = open_repository(url, storage_options)
    if format not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    m = read_manifest(store, step)
    n = export_checkpoint(store, m, to, format, storage_options=to_storage_options,
                          progress=progress)
    log.info("exported step %d of %s to %s as %s: %d bytes", m.step, url, to, format, n)
    return n

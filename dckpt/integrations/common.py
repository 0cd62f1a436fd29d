"""What the framework integrations share: the pointer file a framework sees where it expects
its checkpoint, the framework's state outside tensors as one verified value, and the saves
in flight with the deletes that wait for them.

A framework names its checkpoints by path (Lightning's ``epoch=3-step=120.ckpt``, the HF
Trainer's ``checkpoint-500``) and checks, links and removes those paths itself. dckpt keeps
the data in one repository, where unchanged blocks are shared between checkpoints, and
writes at the framework's path a small JSON pointer: the repository and the step. The
framework's own existence checks, ``last`` links and top-k removal work on the pointers;
removing a pointer deletes its checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

import dckpt
from dckpt.arguments import check_bool, check_config, check_options, check_url, storage_error
from dckpt.catalog import committed
from dckpt.errors import CheckpointNotFoundError, DckptError, IntegrityError, UnsafeValueError
from dckpt.layout import same_url
from dckpt.step_metrics import Metrics
from dckpt.storage import Store
from dckpt.upkeep import Upkeep

__all__ = ["Pointer", "write_pointer", "read_pointer", "remove_pointer", "pack", "unpack",
           "Saves", "load_pointed", "on_rank0"]

log = logging.getLogger(__name__)

POINTER_FORMAT = "dckpt-pointer"
POINTER_VERSION = 1
MAX_POINTER_BYTES = 64 * 1024
"""A file larger than this is the framework's own checkpoint, never a pointer."""

Broadcast = Callable[[Any], Any]
"""(all ranks) rank 0's value on every rank: the framework's own broadcast."""
T = TypeVar("T")


@dataclass(frozen=True)
class Pointer:
    """A checkpoint of repository ``url`` at ``step``, with the ``facts`` (JSON values) a
    framework needs before it loads (which optimizers the checkpoint holds, say)."""

    url: str
    step: int
    facts: dict[str, Any] = field(default_factory=dict)


def on_rank0(fn: Callable[[], T], *, broadcast: Broadcast, rank: int, what: str) -> T | None:
    """(all ranks) ``fn()`` on rank 0 alone (the framework's files are rank 0's: its pointers,
    the listing that numbers the next step): its value there, None on the others; where it
    fails, the same DckptError on every rank at once. Before, the other ranks went on into
    the save's collectives and waited there for the collective timeout (or for rank 0's
    process to end), then raised a broken collective, while rank 0 raised a bare OSError."""
    out: T | None = None
    failure: DckptError | None = None
    if rank == 0:
        try:
            out = fn()
        except Exception as e:
            failure = storage_error(e, what)
    failure = broadcast(failure)
    if failure is not None:
        raise failure
    return out


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _split(path: str) -> tuple[Store, str]:
    path = str(path)
    if _is_local(path):
        path = os.path.abspath(path.removeprefix("file://"))
    folder, name = posixpath.split(path)
    return Store(folder or "."), name


def repository_beside(path: str, name: str = "dckpt") -> str:
    """The default repository for pointers written at ``path``: a folder ``name`` beside it."""
    path = str(path)
    if _is_local(path):
        return os.path.join(os.path.dirname(os.path.abspath(path.removeprefix("file://"))),
                            name)
    return posixpath.join(posixpath.dirname(path), name)


def write_pointer(path: str, pointer: Pointer) -> None:
    """(one rank) Write ``pointer`` at ``path``, replacing what is there, whole or not at all.
    A local repository is recorded relative to the pointer's folder, so the two move
    together."""
    store, name = _split(path)
    url = pointer.url
    if _is_local(url) and store.local:
        url = os.path.relpath(os.path.abspath(url.removeprefix("file://")), store.root)
    data = json.dumps({"format": POINTER_FORMAT, "version": POINTER_VERSION, "url": url,
                       "step": pointer.step, "facts": pointer.facts}, indent=1).encode()
    with store.open_replace(name) as f:
        f.write(data)


def read_pointer(path: str) -> Pointer | None:
    """(one rank) The pointer at ``path``; None where ``path`` holds something else (the
    framework's own checkpoint, a folder). Raises FileNotFoundError where nothing is, and
    FormatError for a damaged pointer."""
    store, name = _split(path)
    if store.fs.isdir(store.path(name)):
        return None
    if store.size(name) > MAX_POINTER_BYTES:
        return None
    data = store.read_bytes(name)
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(data)
        if doc.get("format") != POINTER_FORMAT:
            return None
        if doc.get("version") != POINTER_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, this dckpt reads "
                             f"{POINTER_VERSION}")
        url, step, facts = doc["url"], doc["step"], doc.get("facts", {})
        if not isinstance(url, str) or type(step) is not int or not isinstance(facts, dict):
            raise ValueError("url, step or facts of the wrong type")
    except (ValueError, KeyError, AttributeError) as e:
        raise dckpt.FormatError(f"{path}: a damaged dckpt pointer ({e})") from None
    if _is_local(url) and store.local and not os.path.isabs(url):
        url = os.path.normpath(os.path.join(store.root, url))
    return Pointer(url, step, facts)


def remove_pointer(path: str) -> Pointer | None:
    """(one rank) Remove the pointer at ``path`` and return it; None (and nothing removed)
    where ``path`` holds no pointer."""
    try:
        pointer = read_pointer(path)
    except (FileNotFoundError, DckptError):
        pointer = None
    if pointer is not None:
        store, name = _split(path)
        store.delete(name)
    return pointer


def pack(value: Any, what: str) -> bytes:
    """``value`` (a framework's state outside tensors) as bytes that
    ``torch.load(weights_only=True)`` reads back: no code runs on load. Refuses, naming the
    key, a value it would not read."""
    buf = io.BytesIO()
    torch.save(value, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        key, bad = _refused(value, what)
        raise UnsafeValueError(
            f"{key} holds a {type(bad).__name__}, which torch.load(weights_only=True) "
            f"refuses ({type(e).__name__}), so a load could not read it back; keep plain "
            "values there (numbers, strings, lists, dicts, tensors)") from None
    return data


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _refused(value: Any, path: str) -> tuple[str, Any]:
    """The deepest key under ``value`` whose value the safe loader refuses, and that value."""
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, (list, tuple)) else ())
    for k, v in items:
        buf = io.BytesIO()
        try:
            torch.save(v, buf)
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        except Exception:
            return _refused(v, f"{path}[{k!r}]")
    return path, value


class Saves:
    """A framework's saves through dckpt: at most one in flight; a checkpoint whose pointer
    was replaced or removed is deleted once the save that replaced it committed; gc in the
    background after deletes. (all ranks) ``save``, ``settle``; (rank 0) ``drop``."""

    def __init__(self, *, storage_options: dict | None, async_save: bool,
                 config: dckpt.SaveConfig | None, metrics: dckpt.Metrics | None = None,
                 url: str | None = None, fallback: bool = True) -> None:
        """Checks the integration's own arguments (``url``, ``fallback`` too: each class
        keeps those itself), at its construction rather than at its first save."""
        if url is not None:
            check_url(url)
        check_options(storage_options)
        check_bool(async_save, "async_save")
        check_bool(fallback, "fallback")
        check_config(config, dckpt.SaveConfig, "save_config")
        check_config(metrics, dckpt.Metrics, "metrics")
        self.storage_options = storage_options
        self.async_save = async_save
        self.config = config
        self.metrics = metrics
        self._handle: dckpt.SaveHandle | None = None
        self._started = 0.0
        self._after_commit: list[tuple[str, int]] = []  # (url, step) to drop once committed
        self._next: dict[str, int] = {}
        self._upkeep: dict[str, Upkeep] = {}

    def next_step(self, url: str, broadcast: Broadcast, rank: int) -> int:
        """(all ranks) A step no checkpoint of ``url`` has: one past the newest committed
        (listed once per run), then counting up."""
        if url not in self._next:
            newest = on_rank0(lambda: max(committed(url, storage_options=self.storage_options),
                                          default=-1),
                              broadcast=broadcast, rank=rank, what=f"listing {url}")
            self._next[url] = int(broadcast(newest)) + 1
        step = self._next[url]
        self._next[url] += 1
        return step

    def save(self, state: dict[str, Any], url: str, *, step: int,
             metrics: Metrics, replaces: list[tuple[str, int]]) -> None:
        """(all ranks) Wait for the save in flight, then save ``state``; ``replaces``: the
        (url, step) checkpoints to delete once this one committed."""
        self.settle()
        self._started = time.time()
        if self.async_save:
            self._handle = dckpt.async_save(state, url, step=step, metrics=metrics,
                                            storage_options=self.storage_options,
                                            config=self.config)
            self._after_commit = replaces
            if self.metrics is not None:
                self.metrics.observe_pause(self._handle.pause_s)
            return
        try:
            info = dckpt.save(state, url, step=step, metrics=metrics,
                              storage_options=self.storage_options, config=self.config)
        except DckptError as e:
            if self.metrics is not None:
                self.metrics.observe_failure(type(e).__name__)
            raise
        if self.metrics is not None:
            self.metrics.observe_pause(time.time() - self._started)
            self.metrics.observe_save(info)
        self._drop_all(replaces)

    def settle(self) -> None:
        """(all ranks) Wait for the save in flight. Its failure is logged, not raised: its
        pointer then names a step that never committed, and a load falls back past it."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            info = handle.wait()
        except DckptError as e:
            log.error("the checkpoint save of step %d failed; its pointer names a step a "
                      "load will fall back past: %s", handle.step, str(e))
            self._after_commit = []
            if self.metrics is not None:
                self.metrics.observe_failure(type(e).__name__)
            return
        if self.metrics is not None and info is not None:
            self.metrics.observe_save(info)
        replaced, self._after_commit = self._after_commit, []
        self._drop_all(replaced)

    def release(self, url: str, step: int) -> None:
        """(rank 0) Checkpoint ``step`` lost its pointer: delete it now, or once it
        committed where its save is in flight."""
        if self._handle is not None and self._handle.step == step and not self._handle.done():
            self._after_commit.append((url, step))
        else:
            self.drop(url, step)

    def sweep(self, url: str, pointers: list[str]) -> list[int]:
        """(rank 0) Delete the checkpoints of ``url`` that no pointer among ``pointers`` (file
        paths) names: a crash between replacing or removing a pointer and the delete that
        waited for the next commit leaves them. Only for a repository all of whose pointers
        are in ``pointers``; call it with no save in flight."""
        try:
            return self._sweep(url, pointers)
        except DckptError as e:  # housekeeping: never what ends a training run
            log.warning("could not delete the checkpoints of %s that no pointer names (the "
                        "next run tries again): %s", url, str(e))
            return []

    def _sweep(self, url: str, pointers: list[str]) -> list[int]:
        named: set[int] = set()
        for path in pointers:
            try:
                pointer = read_pointer(path)
            except (OSError, DckptError):
                continue
            if pointer is not None and same_url(pointer.url, url):
                named.add(pointer.step)
        orphans = [s for s in committed(url, storage_options=self.storage_options)
                   if s not in named]
        if orphans:
            log.info("deleting checkpoints %s of %s: no pointer names them", orphans, url)
        self._drop_all([(url, s) for s in orphans])
        return orphans

    def _drop_all(self, checkpoints: list[tuple[str, int]]) -> None:
        for url, step in checkpoints:
            self.drop(url, step)

    def drop(self, url: str, step: int) -> None:
        """(rank 0) Delete checkpoint ``step`` of ``url`` and collect its garbage in the
        background; gone already is fine."""
        try:
            dckpt.delete(url, step=step, storage_options=self.storage_options)
        except CheckpointNotFoundError:
            return
        except DckptError as e:  # housekeeping: never what ends a training run (rank 0's)
            log.warning("could not delete checkpoint %d of %s, whose pointer was replaced "
                        "or removed (a run that keeps its repository beside the pointers "
                        "deletes it at its first save; dckpt.delete otherwise): %s", step,
                        url, str(e))
            return
        if url not in self._upkeep:
            self._upkeep[url] = Upkeep(url, self.storage_options, None, True, self._writing)
        self._upkeep[url].submit()

    def _writing(self) -> tuple[list[int], list[float]]:
        if self._handle is None or self._handle.done():
            return [], []
        return [self._handle.step], [self._started]

    def close(self) -> None:
        """(all ranks) Wait for the save in flight and the garbage collection."""
        self.settle()
        for upkeep in self._upkeep.values():
            upkeep.close()
        self._upkeep = {}


def load_pointed(state: dict[str, Any], pointer: Pointer, *, broadcast: Broadcast, rank: int,
                 storage_options: dict | None, fallback: bool = True,
                 partial: bool = False,
                 metrics: dckpt.Metrics | None = None) -> dckpt.CheckpointInfo:
    """(all ranks) Load ``pointer``'s checkpoint into ``state``. With ``fallback``, where it
    never committed (a save killed in flight) or fails verification, the newest older
    committed checkpoint of the repository that loads cleanly instead, said in a warning.
    ``partial``: load only the keys ``state`` has (the model alone, say); ``metrics``
    records the restore (and the checkpoints passed over as corrupt)."""
    try:
        info = dckpt.load(state, pointer.url, step=pointer.step, partial=partial,
                          storage_options=storage_options)
    except (IntegrityError, CheckpointNotFoundError) as e:
        if not fallback:
            raise
        first: DckptError = e
    else:
        if metrics is not None:
            metrics.observe_restore(info, 1)
        return info
    older: list[int] | DckptError = []
    if rank == 0:
        try:
            older = sorted((c.step for c in dckpt.list_checkpoints(
                pointer.url, storage_options=storage_options)
                if c.step < pointer.step and c.problem is None), reverse=True)
        except DckptError as e:  # the storage failed: the same error on every rank, at once
            older = e
    older = broadcast(older)
    if isinstance(older, DckptError):
        raise older
    for step in older:
        try:
            info = dckpt.load(state, pointer.url, step=step, partial=partial,
                              storage_options=storage_options)
        except IntegrityError as e:
            log.warning("rank %d: step %d of %s fails too: %s", rank, step, pointer.url, str(e))
            continue
        log.warning("rank %d: checkpoint step %d of %s does not load (%s); loaded step %d, "
                    "the newest older one that does", rank, pointer.step, pointer.url,
                    str(first).splitlines()[0], step)
        if metrics is not None:
            metrics.observe_corrupt()
            metrics.observe_restore(info, 1)
        return info
    raise first

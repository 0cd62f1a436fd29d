"""A repository's state for a person or a monitor: the newest checkpoint and its age, how many
there are, damaged or quarantined ones, and a pipeline's progress (not collective)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from dckpt.errors import DckptError
from dckpt.info import CheckpointInfo
from dckpt.layout import PROGRESS_KEY
from dckpt.repository import decode_manifest, read_manifest_bytes
from dckpt.shm import held
from dckpt.storage import Store

__all__ = ["Status", "repository_status"]


@dataclass(frozen=True)
class Status:
    url: str
    checkpoints: int
    """Committed checkpoints, damaged and quarantined ones included."""
    newest: CheckpointInfo | None
    """The newest committed checkpoint whose manifest reads (not quarantined)."""
    newest_age_s: float | None
    damaged: tuple[int, ...] = ()
    quarantined: tuple[int, ...] = ()
    pipeline: dict[str, Any] | None = None
    """The newest checkpoint's pipeline progress (dckpt.Pipeline), when it holds one."""
    problems: tuple[str, ...] = field(default_factory=tuple)
    memory: tuple[str, int, int | None] | None = None
    """This node's memory tier of the repository: (folder, bytes held, newest step), or
    None where it has none."""


def repository_status(store: Store, infos: list[CheckpointInfo],
                      memory_dir: str | None = None) -> Status:
    usable = [i for i in infos if i.problem is None and i.quarantined is None]
    newest = usable[-1] if usable else None
    pipeline, problems = None, []
    if newest is not None:
        try:
            _, raw_manifest = read_manifest_bytes(store, newest.step)
            # JSON writes the key's name as it is: a manifest without it is not decoded
            # (0.5 s for 20,000 items)
            m = (decode_manifest(raw_manifest, newest.step, store.url)
                 if PROGRESS_KEY.encode() in raw_manifest else None)
            keys = [] if m is None else [k for k in m.items
                                         if k.rsplit(".", 1)[-1] == PROGRESS_KEY]
            if m is not None and keys:
                # here only: the value's load needs torch, whose import (seconds) the status
                # of a repository without a pipeline never pays
                from dckpt.items import read_value

                raw = read_value(store, m, keys[0])
                pipeline = json.loads(raw) if isinstance(raw, str) else None
        except (DckptError, ValueError) as e:
            problems.append(f"step {newest.step}: pipeline progress unreadable: {e}")
    return Status(
        url=store.url, checkpoints=len(infos), newest=newest,
        newest_age_s=time.time() - newest.created_at if newest is not None else None,
        damaged=tuple(i.step for i in infos if i.problem is not None),
        quarantined=tuple(i.step for i in infos if i.quarantined is not None),
        pipeline=pipeline, problems=tuple(problems), memory=held(store.url, memory_dir))

"""Structured logs: one JSON object per line and event, for log pipelines.

    dckpt.configure_logging(json_lines=True)       # or DCKPT_LOG_JSON=1 in the environment

Every record carries ``ts``, ``level``, ``logger``, ``run_id``, ``rank`` and ``msg``; dckpt's
events add ``event`` (save_start, save_commit, save_failed, restore, preemption, retention),
``step``, ``seconds``, ``bytes`` and ``reason`` where they apply.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from typing import IO

from dckpt import dist
from dckpt.errors import ArgumentError

__all__ = ["JsonFormatter", "configure_logging", "event", "run_id"]

EVENT_FIELDS = ("event", "step", "seconds", "bytes", "reason")

_run_id: str | None = None


def run_id() -> str:
    """torchrun's run id, else Slurm's job id, else one made up for this process."""
    global _run_id
    if _run_id is None:
        _run_id = (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
                   or uuid.uuid4().hex[:12])
    return _run_id


def event(name: str, **fields: object) -> dict:
    """``extra=`` for a logging call that is an event: ``log.info(msg, extra=event(...))``."""
    return {"event": name, **fields}


class JsonFormatter(logging.Formatter):
    def __init__(self, run: str | None = None) -> None:
        super().__init__()
        self.run = run

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
            "run_id": self.run or run_id(), "rank": dist.rank(), "msg": record.getMessage()}
        for key in EVENT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(json_lines: bool = True, *, level: int | str = logging.INFO,
                      stream: IO[str] | None = None, run: str | None = None) -> logging.Handler:
    """Send dckpt's logs to ``stream`` (stderr), as JSON lines or plain text."""
    named = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if type(named) is not int or not isinstance(json_lines, bool) or (
            stream is not None and not callable(getattr(stream, "write", None))) or (
            run is not None and not isinstance(run, str)):
        raise ArgumentError(
            "configure_logging(json_lines: bool, level: a logging level such as logging.INFO "
            f"or 'INFO', stream: a text stream or None, run: a str or None), got "
            f"json_lines={json_lines!r}, level={level!r}, stream={type(stream).__name__}, "
            f"run={type(run).__name__}")
    level = named
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(run) if json_lines else logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("dckpt")
    for old in [h for h in logger.handlers if getattr(h, "_dckpt", False)]:
        logger.removeHandler(old)
    handler._dckpt = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


if os.environ.get("DCKPT_LOG_JSON", "") not in ("", "0"):
    configure_logging(json_lines=True)

"""Every object name the engine writes, built and parsed in one place.

A repository is a folder (or an S3 prefix)::

    dckpt.json                          marker: {"format": "dckpt.repository", "version": 1}
    manifests/000000000100.json         a committed checkpoint (the commit point)
    manifests/.tmp-<random>             a manifest being committed (local disk only)
    deleted/000000000100-<unix ms>.json a deleted checkpoint's manifest, kept for gc's grace
    quarantine/000000000100.json        a committed checkpoint that verify found damaged
    data/<attempt>/r00000-000.seg       segment objects of one save attempt, per rank and writer

An attempt name is ``s<step>-t<unix ms>-<random hex>``: unique to one try at saving a step,
and it carries its start time so that garbage collection can tell a save still in flight.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from dckpt.errors import FormatError

MAX_STEP = (1 << 63) - 1
"""The largest step (a signed 64-bit integer, as torch and every logger hold it)."""

MARKER = "dckpt.json"
MANIFEST_DIR = "manifests"
DATA_DIR = "data"
DELETED_DIR = "deleted"
QUARANTINE_DIR = "quarantine"
REPOSITORY_NAMES = (MARKER, MANIFEST_DIR, DATA_DIR, DELETED_DIR, QUARANTINE_DIR)
"""What a repository's root holds of its own."""
PROGRESS_KEY = "dckpt_pipeline"
"""The state dict key (last part) under which a dckpt.Pipeline saves its progress: JSON text."""

_MANIFEST_RE = re.compile(r"^(\d{12,20})\.json$")
_TOMBSTONE_RE = re.compile(r"^(\d{12,20})-(\d+)\.json$")
_ATTEMPT_RE = re.compile(r"^s(\d+)-t(\d+)-([0-9a-f]{8})$")
_NAME_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def manifest_name(step: int) -> str:
    return f"{MANIFEST_DIR}/{step:012d}.json"


def parse_manifest_name(basename: str) -> int | None:
    """The step of a committed manifest's base name, or None for anything else."""
    match = _MANIFEST_RE.match(basename)
    return int(match.group(1)) if match else None


def quarantine_name(step: int) -> str:
    return f"{QUARANTINE_DIR}/{step:012d}.json"


def tombstone_name(step: int, now_s: float | None = None) -> str:
    millis = int((time.time() if now_s is None else now_s) * 1000)
    return f"{DELETED_DIR}/{step:012d}-{millis}.json"


def parse_tombstone_name(basename: str) -> tuple[int, float] | None:
    """The step and deletion time (unix seconds) of a tombstone's base name, else None."""
    match = _TOMBSTONE_RE.match(basename)
    return (int(match.group(1)), int(match.group(2)) / 1000) if match else None


def new_attempt(step: int, now_s: float | None = None) -> str:
    millis = int((time.time() if now_s is None else now_s) * 1000)
    return f"s{step}-t{millis}-{secrets.token_hex(4)}"


def attempt_started_s(attempt: str) -> float | None:
    """When an attempt began (unix seconds), or None when the name is not an attempt's."""
    match = _ATTEMPT_RE.match(attempt)
    return int(match.group(2)) / 1000 if match else None


def segment_name(attempt: str, rank: int, writer: int) -> str:
    return f"{DATA_DIR}/{attempt}/r{rank:05d}-{writer:03d}.seg"


def check_object_name(name: object) -> str:
    """Return ``name`` if it is a safe relative object name under data/, else raise.

    A manifest names the objects it needs; a hostile or broken one must not make a reader
    touch anything outside the repository (no absolute paths, no ``..``, no URLs).
    """
    if not isinstance(name, str) or not name:
        raise FormatError(f"object name must be a non-empty string, found {name!r}")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or ":" in name or parts[0] != DATA_DIR
            or not all(_NAME_PART_RE.match(p) for p in parts[1:]) or len(parts) < 2
            or any(p in ("", ".", "..") for p in parts)):
        raise FormatError(
            f"object name {name!r} is not a relative name under {DATA_DIR}/ made of "
            "[A-Za-z0-9._-] parts; the manifest is damaged or was not written by dckpt")
    return name


def full_path(path: str) -> str:
    """A local path as fsspec reads it (``~`` expanded), absolute and normalized."""
    return os.path.abspath(os.path.expanduser(path))


def same_url(a: str, b: str) -> bool:
    """Whether two repository URLs name the same place: local paths absolute and normalized
    (``file://`` or not), other URLs as written, a trailing slash aside."""
    def local(url: str) -> str | None:
        if url.startswith("file://"):
            return url[len("file://"):]
        return None if "://" in url else url

    la, lb = local(a), local(b)
    if la is not None and lb is not None:
        return full_path(la) == full_path(lb)
    return a.rstrip("/") == b.rstrip("/")

"""Finding committed checkpoints in a repository: the listing and the manifests."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator

from dckpt import layout
from dckpt.block_table import BlockTable
from dckpt.decoder import Reference, decode, reference_rows, summary
from dckpt.errors import CheckpointNotFoundError, DckptError, FormatError, IntegrityError
from dckpt.manifest import Manifest, Summary
from dckpt.storage import UNREADABLE, Store

__all__ = ["open_repository", "committed_steps", "read_manifest", "read_manifest_raw",
           "read_references",
           "read_manifest_bytes", "decode_manifest", "require_repository", "mark_repository",
           "quarantined", "set_quarantine", "manifests", "summaries", "still_committed"]

log = logging.getLogger(__name__)

_MARKER = json.dumps({"format": "dckpt.repository", "version": 1}).encode()


def mark_repository(store: Store) -> None:
    """(coordinator) Create the marker that says this URL is a dckpt repository."""
    store.write_if_absent(layout.MARKER, _MARKER)


def open_repository(url: str, storage_options: dict | None = None, *,
                    required: bool = True) -> Store:
    """The repository at ``url``. ``required``: CheckpointNotFoundError when it holds none
    (else an empty or absent repository is a valid, empty one)."""
    store = Store(url, storage_options)
    if required:
        require_repository(store)
    return store


def require_repository(store: Store) -> None:
    if not store.exists(layout.MARKER) and not committed_steps(store):
        raise CheckpointNotFoundError(
            f"{store.url} holds no dckpt repository (no {layout.MARKER} and no "
            f"{layout.MANIFEST_DIR}/); check the URL and storage_options")


def missing_object(store: Store, ends: dict[str, int]) -> str | None:
    """Why the objects do not hold the bytes ``ends`` says they must (``manifest.extents``),
    from one listing per folder; None when they all do."""
    folders: dict[str, dict[str, int]] = {}
    for name, end in sorted(ends.items()):
        folder, _, base = name.rpartition("/")
        if folder not in folders:
            folders[folder] = store.list_sizes(folder)
        size = folders[folder].get(base)
        if size is None:
            return f"object {name} is missing"
        if size < end:
            return f"object {name} holds {size} bytes, the checkpoint needs {end}"
    return None


def committed_steps(store: Store) -> list[int]:
    """Steps with a committed manifest, oldest first. Temp files are not checkpoints."""
    steps = (layout.parse_manifest_name(n) for n in store.list_names(layout.MANIFEST_DIR))
    return sorted(s for s in steps if s is not None)


def read_manifest(store: Store, step: int | None) -> Manifest:
    """The manifest of ``step``; None: of the newest committed step."""
    return read_manifest_raw(store, step)[0]


def read_manifest_raw(store: Store, step: int | None) -> tuple[Manifest, bytes]:
    """The manifest of ``step`` (None: the newest), and its bytes as stored."""
    step, raw = read_manifest_bytes(store, step)
    return decode_manifest(raw, step, store.url), raw


def read_manifest_bytes(store: Store, step: int | None) -> tuple[int, bytes]:
    """The step (None: the newest) and the bytes of its manifest, not yet decoded."""
    if step is None:
        steps = committed_steps(store)
        if not steps:
            raise CheckpointNotFoundError(f"{store.url} holds no committed checkpoint")
        step = steps[-1]
    name = layout.manifest_name(step)
    try:
        return step, store.read_bytes(name)
    except IsADirectoryError:
        raise FormatError(f"{store.url}/{name}: a folder where the manifest of step {step} "
                          "belongs; the manifest is damaged") from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{store.url} has no committed checkpoint for step {step} (no {name}); "
            f"committed steps: {committed_steps(store) or 'none'}") from None
    except OSError as e:
        if e.errno not in UNREADABLE:  # the storage failed (a connection reset, a refusal, a
            raise  # timeout), not this manifest
        raise FormatError(f"{store.url}/{name}: cannot be read ({e.strerror or e}); the "
                          f"manifest of step {step} is damaged") from None


def manifests(store: Store, steps: Iterable[int]) -> Iterator[tuple[int, Manifest | DckptError]]:
    """Each step's manifest, or the error that keeps it from being read. A step deleted since
    it was listed is left out: a job's retention deleting while this runs is no damage."""
    for step in steps:
        try:
            yield step, read_manifest(store, step)
        except CheckpointNotFoundError:
            continue
        except DckptError as e:
            yield step, e


def summaries(store: Store, steps: Iterable[int]) -> Iterator[tuple[int, Summary | IntegrityError]]:
    """``manifests``' headers (``decoder.summary``: the checksum checked, the items not
    decoded), for a listing; a manifest that cannot be used (damaged, or of a newer format)
    as its IntegrityError. The storage failing to give one raises (StorageError): that is
    no finding about the checkpoint, and a listing without it would mislead a retention
    policy or a monitor."""
    for step in steps:
        try:
            step, raw = read_manifest_bytes(store, step)
            name = f"{store.url}/{layout.manifest_name(step)}"
            s = summary(raw, name=name)
            if s.step != step:
                raise FormatError(f"{name}: holds step {s.step}, its name says {step}")
            yield step, s
        except CheckpointNotFoundError:
            continue
        except IntegrityError as e:
            yield step, e


def still_committed(store: Store, step: int) -> bool:
    """Whether ``step``'s manifest is still there: a check that failed on a checkpoint
    deleted meanwhile (its data collected) found no damage."""
    return store.exists(layout.manifest_name(step))


def read_references(store: Store, step: int) -> BlockTable | list[Reference]:
    """``step``'s block references alone (``decoder.reference_rows``, for gc), read and
    checked as ``read_manifest`` reads and checks its manifest."""
    step, raw = read_manifest_bytes(store, step)
    name = f"{store.url}/{layout.manifest_name(step)}"
    held, refs = reference_rows(raw, name=name)
    if held != step:
        raise FormatError(f"{name}: holds step {held}, its name says {step}")
    return refs


def decode_manifest(raw: bytes, step: int, url: str) -> Manifest:
    """Manifest bytes read as those of ``step`` from ``url``, decoded and checked."""
    name = layout.manifest_name(step)
    m = decode(raw, name=f"{url}/{name}")
    if m.step != step:
        raise FormatError(f"{url}/{name}: holds step {m.step}, its name says {step}")
    return m


def quarantined(store: Store) -> dict[int, str]:
    """Steps that ``verify(quarantine=True)`` found damaged, with the reason: restores with
    ``step=None`` skip them without reading them."""
    out: dict[int, str] = {}
    try:
        names = store.list_names(layout.QUARANTINE_DIR)
    except NotADirectoryError:  # advisory marks: the restore verifies every byte anyway
        log.warning("%s/%s is a file, not a folder: quarantine marks ignored", store.url,
                    layout.QUARANTINE_DIR)
        return out
    for name in names:
        step = layout.parse_manifest_name(name)
        if step is None:
            continue
        try:
            doc = json.loads(store.read_bytes(f"{layout.QUARANTINE_DIR}/{name}"))
            out[step] = str(doc.get("reason", "damaged"))
        except FileNotFoundError:
            continue  # cleared since the listing (a verify found it clean)
        except (IsADirectoryError, ValueError, AttributeError):
            out[step] = "quarantined (the marker is unreadable)"
    return out


def set_quarantine(store: Store, step: int, reason: str | None) -> None:
    """Mark ``step`` damaged with ``reason``, or clear its mark (``reason=None``)."""
    name = layout.quarantine_name(step)
    if reason is None:
        store.delete(name)
        return
    with store.open_write(name) as f:
        f.write(json.dumps({"step": step, "reason": reason, "at": time.time()}).encode())

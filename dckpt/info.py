"""What a save or load reports back: CheckpointInfo, built from a manifest (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dckpt.manifest import Manifest, Summary

__all__ = ["CheckpointInfo", "info_from_manifest"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as a save returned it or a listing found it."""

    step: int
    """The training step the checkpoint holds."""
    url: str
    """The repository it lives in."""
    created_at: float
    """Unix time of the commit."""
    metrics: dict[str, float | int | str | bool | None]
    """The metrics passed to the save."""
    world_size: int
    """Ranks that saved it."""
    bytes_logical: int
    """Size of the state (every stored tensor box and value once, all ranks)."""
    bytes_written: int
    """Bytes this save stored, all ranks."""
    bytes_written_raw: int = 0
    """Save only: what ``bytes_written`` held before compression, all ranks (their ratio is
    the compression of the blocks this save wrote)."""
    phase_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: save (plan, write, commit, total, and this rank's ``rank_*``
    phases: see Writer.rank_s; an async save adds this rank's wait_previous, stage, pause);
    load (find, plan, read, total, and this rank's io_thread, verify_thread and copy: see
    Reader.phase_s)."""
    skipped: tuple[tuple[int, str], ...] = ()
    """Load only: newer checkpoints that failed to load, with the reason, newest first."""
    problem: str | None = None
    """Listing only: why the manifest could not be read (the checkpoint is damaged). A
    listing checks each manifest's checksum and header, not its items (``verify`` does)."""
    pause_s: float | None = None
    """Async save only, this rank: seconds the caller was held (waiting for the save before,
    staging, and writing what did not fit the staging budget)."""
    overflow_bytes: int = 0
    """Async save only, this rank: bytes written during the pause because the staging budget
    (``SaveConfig.staging_bytes``) could not hold them."""
    previous_failures: tuple[tuple[int, str], ...] = ()
    """Async save only, this rank: earlier background saves that failed since the last
    report, as (step, reason)."""
    quarantined: str | None = None
    """Listing only: why ``verify(quarantine=True)`` marked it damaged; loads skip it."""
    tried: tuple[int, ...] = ()
    """Load only: the steps tried, newest first (the last is this one)."""
    bytes_read: int = 0
    """Load only: stored bytes read, all ranks."""
    data_lost_steps: int | None = None
    """Load only: steps between this checkpoint and the newest committed one (0 when it is
    the newest): the training to redo."""
    tier: str | None = None
    """Load through a CheckpointManager only: where this rank read from, ``"memory"`` (the
    node's memory tier) or ``"storage"``."""
    data_lost_s: float | None = None
    """Load only: seconds between this checkpoint's commit and the newest one's, where the
    newest's manifest could be read."""


def info_from_manifest(m: Manifest | Summary, url: str, **overrides: object) -> CheckpointInfo:
    fields: dict[str, object] = dict(
        step=m.step, url=url, created_at=m.created_at, metrics=dict(m.metrics),
        world_size=m.world_size, bytes_logical=m.bytes_logical, bytes_written=m.bytes_written,
        phase_s=dict(m.phase_s))
    fields.update(overrides)
    return CheckpointInfo(**fields)  # type: ignore[arg-type]

"""Ways to damage the newest checkpoint of a local repository, for the fallback tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

KINDS = ("flipped_byte", "truncated_segment", "deleted_segment", "truncated_manifest")


def damage(repo: Path, step: int, kind: str, rank: int | None = None) -> None:
    """Damage checkpoint ``step``: one of its segments (of ``rank`` when given), or its
    manifest."""
    manifest = repo / "manifests" / f"{step:012d}.json"
    if kind == "truncated_manifest":
        raw = manifest.read_bytes()
        manifest.write_bytes(raw[: len(raw) // 2])
        return
    segments = json.loads(manifest.read_text())["segments"]
    if rank is not None:
        segments = [s for s in segments if f"/r{rank:05d}-" in s]
    path = repo / max(segments, key=lambda s: os.path.getsize(repo / s))
    if kind == "flipped_byte":
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    elif kind == "truncated_segment":
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind == "deleted_segment":
        os.remove(path)
    else:
        raise ValueError(kind)

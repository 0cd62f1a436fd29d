"""The framework integrations' pointed loads (dckpt.integrations.common.load_pointed): a
pointed step that does not load falls back to the newest older one that does; a storage
that fails while the older ones are listed is that StorageError, not a fallback."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt.integrations.common import Pointer, load_pointed


def _saved(url: str) -> None:
    for step in (1, 2, 3):
        dckpt.save({"w": torch.full((4,), float(step))}, url, step=step)


def test_a_pointed_step_that_does_not_load_falls_back_to_an_older_one(tmp_path):
    url = str(tmp_path / "repo")
    _saved(url)
    (tmp_path / "repo" / "manifests" / "000000000003.json").write_bytes(b"{}")
    state = {"w": torch.zeros(4)}
    info = load_pointed(state, Pointer(url, 3), broadcast=lambda x: x, rank=0,
                        storage_options=None)
    assert info.step == 2 and torch.equal(state["w"], torch.full((4,), 2.0))


def test_a_storage_that_fails_while_listing_the_fallbacks_is_that_error(tmp_path, monkeypatch):
    url = str(tmp_path / "repo")
    _saved(url)
    (tmp_path / "repo" / "manifests" / "000000000003.json").write_bytes(b"{}")

    def failing(*args, **kwargs):
        raise dckpt.StorageError("SlowDown, tries exhausted")

    monkeypatch.setattr(dckpt, "list_checkpoints", failing)
    sent = []

    def broadcast(x):  # rank 0's answer reaches every rank, an error included
        sent.append(x)
        return x

    with pytest.raises(dckpt.StorageError, match="SlowDown"):
        load_pointed({"w": torch.zeros(4)}, Pointer(url, 3), broadcast=broadcast, rank=0,
                     storage_options=None)
    assert len(sent) == 1 and isinstance(sent[0], dckpt.StorageError)

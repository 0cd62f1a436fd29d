"""The framework integrations' pointed loads (dckpt.integrations.common.load_pointed): a
pointed step that does not load falls back to the newest older one that does; a storage
that fails while the older ones are listed is that StorageError, not a fallback. Rank 0's
own work (on_rank0) fails every rank alike; its housekeeping (deleting replaced
checkpoints) never ends a run."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt.integrations.common import Pointer, Saves, load_pointed, on_rank0


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


def test_rank_0s_work_fails_every_rank_alike_and_its_value_stays_on_rank_0():
    def full():
        raise OSError(28, "No space left on device", "/ckpt/last.ckpt")

    sent = []

    def broadcast(x):
        sent.append(x)
        return sent[0]  # rank 0's, on every rank

    with pytest.raises(dckpt.StorageError, match="writing /ckpt/last.ckpt: the storage failed"):
        on_rank0(full, broadcast=broadcast, rank=0, what="writing /ckpt/last.ckpt")
    with pytest.raises(dckpt.StorageError, match="No space left"):
        on_rank0(lambda: 1 / 0, broadcast=broadcast, rank=1, what="writing")  # never runs
    sent.clear()
    assert on_rank0(lambda: [("u", 3)], broadcast=broadcast, rank=0, what="") == [("u", 3)]
    assert on_rank0(lambda: 1 / 0, broadcast=broadcast, rank=1, what="") is None


def test_deleting_a_replaced_checkpoint_that_fails_is_logged_not_raised(tmp_path, monkeypatch,
                                                                        caplog):
    """Rank 0 alone deletes; its raising ended its process mid-run, and the other ranks
    waited in their next collective."""
    url = str(tmp_path / "repo")
    _saved(url)

    def failing(*args, **kwargs):
        raise dckpt.StorageError("SlowDown, tries exhausted")

    monkeypatch.setattr(dckpt, "delete", failing)
    saves = Saves(storage_options=None, async_save=False, config=None)
    saves.save({"w": torch.ones(4)}, url, step=4, metrics={}, replaces=[(url, 2)])
    assert saves.sweep(url, []) == [1, 2, 3, 4]  # none named: each tried, each refused
    saves.close()
    assert [c.step for c in dckpt.list_checkpoints(url)] == [1, 2, 3, 4]
    assert "could not delete checkpoint 2 of" in caplog.text and "SlowDown" in caplog.text

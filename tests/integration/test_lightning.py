"""dckpt's Lightning strategies with the real Lightning: resumes bit-exact after a SIGKILL
under torchrun (DDP, FSDP2 and FSDP1 on 2 gloo ranks), top-k removal deletes checkpoints, a
checkpoint that never committed or is damaged falls back, Lightning's own files still load,
and what cannot load back is refused before anything is written."""

from __future__ import annotations

import json
import logging
import os
import re

import frameworks
import pytest
import torch

pytest.importorskip("lightning", reason="Lightning is not installed: pip install dckpt[lightning]")

import lightning as L
from dckpt_testing import flip_stored_byte
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy as LightningSingleDevice
from lightning_train import Net
from torch.utils.data import DataLoader, TensorDataset

import dckpt
from dckpt.integrations.lightning import SingleDeviceStrategy, load_weights

pytestmark = pytest.mark.integration


def fit(folder, epochs: int, *, resume: str | None = None, strategy=None, callbacks=(),
        model: L.LightningModule | None = None) -> tuple[L.LightningModule, L.Trainer]:
    L.seed_everything(0)
    data = TensorDataset(torch.randn(32, 16), torch.randn(32, 1))
    model = model or Net()
    ckpt = ModelCheckpoint(dirpath=str(folder), monitor="loss", save_top_k=2, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        strategy=strategy or SingleDeviceStrategy(device="cpu"),
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, deterministic=True, callbacks=[ckpt, *callbacks])
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True), ckpt_path=resume)
    return model, trainer


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pointers(folder) -> dict[str, int]:
    return {name: json.loads((folder / name).read_text())["step"]
            for name in sorted(os.listdir(folder)) if name.endswith(".ckpt")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 epochs uninterrupted, with Lightning's own strategy and checkpoints."""
    model, _ = fit(tmp_path_factory.mktemp("ref"), 4, strategy=LightningSingleDevice("cpu"))
    return model.state_dict()


def test_a_resumed_run_equals_an_uninterrupted_one_and_removals_delete(tmp_path, reference):
    fit(tmp_path, 2)
    model, trainer = fit(tmp_path, 4, resume="last")
    assert trainer.global_step == 32
    assert equal(model.state_dict(), reference)
    # top 2 and last.ckpt: every checkpoint Lightning removed is gone from the repository
    held = pointers(tmp_path)
    assert len(held) == 3 and "last.ckpt" in held
    steps = [c.step for c in dckpt.list_checkpoints(str(tmp_path / "dckpt"))]
    assert sorted(set(held.values())) == steps
    assert dckpt.verify(str(tmp_path / "dckpt"), all_steps=True).ok


def test_a_checkpoint_no_pointer_names_is_deleted_at_the_first_save_of_a_run(tmp_path):
    """A crash between replacing last.ckpt and the delete that waited for the next commit
    leaves a checkpoint no pointer names: the next run's first save deletes it."""
    fit(tmp_path, 2)
    repo = str(tmp_path / "dckpt")
    newest = max(c.step for c in dckpt.list_checkpoints(repo))
    dckpt.save({"x": torch.ones(3)}, repo, step=newest + 1)  # named by no pointer
    fit(tmp_path, 3, resume="last")
    held = pointers(tmp_path)
    assert sorted(set(held.values())) == [c.step for c in dckpt.list_checkpoints(repo)]
    assert newest + 1 not in held.values()


def test_a_save_killed_in_flight_falls_back_to_the_one_before(tmp_path, reference, caplog):
    fit(tmp_path, 3)
    newest = pointers(tmp_path)["last.ckpt"]
    dckpt.delete(str(tmp_path / "dckpt"), step=newest)  # as if the commit never came
    with caplog.at_level(logging.WARNING):
        model, trainer = fit(tmp_path, 4, resume=str(tmp_path / "last.ckpt"))
    assert re.search(rf"checkpoint step {newest} of .* does not load", caplog.text)
    assert trainer.global_step == 32
    assert equal(model.state_dict(), reference)


def test_a_damaged_checkpoint_falls_back_and_bit_equal_still(tmp_path, reference, caplog):
    fit(tmp_path, 3)
    repo = str(tmp_path / "dckpt")
    newest = pointers(tmp_path)["last.ckpt"]
    flip_stored_byte(repo, newest, "app.model.net.0.weight", at=5)
    with caplog.at_level(logging.WARNING):
        model, _ = fit(tmp_path, 4, resume=str(tmp_path / "last.ckpt"))
    assert "does not load" in caplog.text
    assert equal(model.state_dict(), reference)


def test_without_fallback_a_damaged_checkpoint_raises(tmp_path):
    fit(tmp_path, 2)
    newest = pointers(tmp_path)["last.ckpt"]
    flip_stored_byte(str(tmp_path / "dckpt"), newest, "app.model.net.0.weight", at=5)
    with pytest.raises(dckpt.IntegrityError, match="app.model.net.0.weight"):
        fit(tmp_path, 3, resume=str(tmp_path / "last.ckpt"),
            strategy=SingleDeviceStrategy(device="cpu", fallback=False))


def test_lightning_own_checkpoint_resumes_and_is_removed_as_a_file(tmp_path):
    fit(tmp_path, 2, strategy=LightningSingleDevice("cpu"))
    own = sorted(os.listdir(tmp_path))
    assert not (tmp_path / "dckpt").exists()
    _model, trainer = fit(tmp_path, 5, resume=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 40
    held = pointers(tmp_path)  # every file now a pointer: Lightning's own were removed
    assert len(held) == 3 and set(own) != set(held)
    assert sorted(set(held.values())) == [c.step for c in dckpt.list_checkpoints(
        str(tmp_path / "dckpt"))]


class Unsafe(L.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["mine"] = {"ok": 1, "bad": logging.getLogger("x")}


def test_a_value_no_load_could_read_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(dckpt.UnsafeValueError, match=r"\['mine'\]\['bad'\] holds a Logger"):
        fit(tmp_path, 1, callbacks=[Unsafe()])
    assert [p for p in os.listdir(tmp_path) if p.endswith(".ckpt")] == []
    assert dckpt.list_checkpoints(str(tmp_path / "dckpt")) == []


def test_load_weights_reads_a_pointer_and_refuses_other_files(tmp_path):
    model, _ = fit(tmp_path, 2)
    fresh = Net()
    load_weights(str(tmp_path / "last.ckpt"), fresh)
    assert equal(fresh.state_dict(), model.state_dict())
    (tmp_path / "other.ckpt").write_bytes(b"PK\x03\x04 not a pointer")
    with pytest.raises(dckpt.FormatError, match="not a dckpt pointer"):
        load_weights(str(tmp_path / "other.ckpt"), fresh)
    (tmp_path / "bad.ckpt").write_text('{"format": "dckpt-pointer", "version": 1, "url": 3}')
    with pytest.raises(dckpt.FormatError, match="damaged dckpt pointer"):
        load_weights(str(tmp_path / "bad.ckpt"), fresh)


# ------------------------------------------------------------ 2 ranks under torchrun


def torchrun(*args: str, check: bool = True) -> str:
    return frameworks.torchrun("lightning_train.py", *args, check=check)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp1"])
def test_two_ranks_killed_with_sigkill_resume_bit_exact(tmp_path, kind):
    """Lightning's own strategy uninterrupted against dckpt's, rank 1 SIGKILLed mid-epoch
    4 and resumed from last.ckpt: the final weights are bit-equal (dropout included: dckpt
    restores each rank's random state). FSDP1 puts the last layer whole on one rank: the
    other's ShardedTensors of it hold nothing (its load asked for "optim.param_groups")."""
    torchrun("--dir", str(tmp_path / "ref"), "--strategy", kind, "--out", str(tmp_path / "ref.pt"))
    out = torchrun("--dir", str(tmp_path / "ckpt"), "--strategy", f"dckpt-{kind}",
                   "--kill-at-step", "29", check=False)
    assert "rank 1: SIGKILL at step 29" in out
    assert not (tmp_path / "got.pt").exists()
    out = torchrun("--dir", str(tmp_path / "ckpt"), "--strategy", f"dckpt-{kind}",
                   "--resume", "last", "--out", str(tmp_path / "got.pt"))
    assert "GLOBAL_STEP 48" in out
    ref, got = (torch.load(tmp_path / n, weights_only=True) for n in ("ref.pt", "got.pt"))
    assert equal(ref, got)
    held = pointers(tmp_path / "ckpt")
    assert sorted(set(held.values())) == [c.step for c in dckpt.list_checkpoints(
        str(tmp_path / "ckpt" / "dckpt"))]


@pytest.mark.parametrize("kind", ["read", "write"])
def test_a_checkpoint_file_rank_0_cannot_read_or_write_fails_every_rank_alike(tmp_path, kind):
    """Lightning's checkpoint files are rank 0's. Where its read (of the file the save
    replaces) or write of one failed, rank 0 raised a bare OSError and rank 1 went on into
    the save's collectives, to wait there for the collective timeout or for rank 0's
    process to end, and then raise a broken collective."""
    out = torchrun("--dir", str(tmp_path / "ckpt"), "--url", str(tmp_path / "repo"),
                   "--strategy", "dckpt-ddp", "--fail-pointer", kind, check=False)
    raised = sorted(line for line in out.splitlines() if " raised " in line)
    assert len(raised) == 2, out[-3000:]
    assert raised[0].removeprefix("rank 0") == raised[1].removeprefix("rank 1"), raised
    assert "raised StorageError: " + ("reading" if kind == "read" else "writing") + \
        " the checkpoint file " in raised[0]
    assert "No space left on device" in raised[0]


def test_a_pointer_that_cannot_be_removed_is_logged_and_training_goes_on(tmp_path,
                                                                          monkeypatch, caplog):
    """Removal (top-k) is rank 0's alone: its raising ended rank 0 mid-run while the other
    ranks went on into their next collective."""
    import dckpt.integrations.lightning as dl

    def failing(path):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(dl, "remove_pointer", failing)
    with caplog.at_level(logging.WARNING):
        _, trainer = fit(tmp_path / "ckpt", 4)
    assert trainer.current_epoch == 4
    assert "could not remove" in caplog.text and "Input/output error" in caplog.text


def test_metrics_record_pauses_saves_and_restores(tmp_path):
    prom = tmp_path / "dckpt.prom"
    metrics = dckpt.Metrics("lightning", textfile=str(prom))
    fit(tmp_path / "ckpt", 2, strategy=SingleDeviceStrategy(device="cpu", metrics=metrics))
    text = prom.read_text()
    assert 'dckpt_saves_total{job_name="lightning"} 4.0' in text  # top-k and last, 2 epochs
    assert 'dckpt_training_pause_seconds_count{job_name="lightning"} 4.0' in text
    fit(tmp_path / "ckpt", 3, resume="last",
        strategy=SingleDeviceStrategy(device="cpu", metrics=metrics))
    assert 'dckpt_restore_seconds{job_name="lightning"}' in prom.read_text()


class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[0].parameters()),
                torch.optim.Adam(self.net[3].parameters())]


def test_a_checkpoint_of_other_optimizers_is_refused_saying_what_to_do(tmp_path):
    fit(tmp_path, 1)
    with pytest.raises(dckpt.StateDictError, match="holds the state of 1 optimizers; this run "
                                                   "has 2.*load_weights"):
        fit(tmp_path, 2, resume="last", model=TwoOptimizers())


def test_bad_arguments_are_refused_at_construction(tmp_path):
    """They were taken, and failed at the first save (or a missing file was a
    FileNotFoundError)."""
    import dckpt
    from dckpt.integrations.lightning import SingleDeviceStrategy, load_weights

    for kwargs in ({"url": 5}, {"url": str(tmp_path), "async_save": "yes"},
                   {"url": str(tmp_path), "fallback": 1}, {"save_config": 5},
                   {"metrics": {}}, {"storage_options": ["key"]}):
        with pytest.raises(dckpt.ArgumentError):
            SingleDeviceStrategy(**kwargs)
    with pytest.raises(dckpt.CheckpointNotFoundError, match="no such checkpoint file"):
        load_weights(str(tmp_path / "absent.ckpt"), torch.nn.Linear(1, 1))
    with pytest.raises(dckpt.ArgumentError, match="torch.nn.Module"):
        load_weights(str(tmp_path / "absent.ckpt"), 5)
    assert list(tmp_path.iterdir()) == []

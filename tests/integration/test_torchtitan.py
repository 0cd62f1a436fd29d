"""dckpt's torchtitan checkpoint manager with the real torchtitan components (its
OptimizersContainer, LRSchedulersContainer, ParallelAwareDataloader, ModelWrapper and
checkpoint manager contract): FSDP2 on 2 gloo ranks killed with SIGKILL resumes bit-equal
to torchtitan's own manager uninterrupted; keep_latest_k; fallback past a damaged step;
load_step; an initial load from torchtitan's own DCP checkpoint. (torchtitan's Trainer
itself needs a GPU: the loop here drives the manager as Trainer.train does.)"""

from __future__ import annotations

import logging
import time

import frameworks
import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed: pip install dckpt[torchtitan]")

from dckpt_testing import flip_stored_byte, run_ranks
from torch import nn
from torchtitan.components.checkpointer.dcp import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan_train import Progress, Samples

import dckpt
from dckpt.integrations.torchtitan import DckptCheckpointManager

pytestmark = pytest.mark.integration


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_killed_with_sigkill_resumes_bit_equal_to_torchtitans_own(tmp_path):
    run = frameworks.torchrun
    run("torchtitan_train.py", "--dir", str(tmp_path / "ref"), "--manager", "own",
        "--out", str(tmp_path / "ref.pt"))
    out = run("torchtitan_train.py", "--dir", str(tmp_path / "run"), "--kill-at-step", "14",
              check=False)
    assert "rank 1: SIGKILL at step 14" in out
    out = run("torchtitan_train.py", "--dir", str(tmp_path / "run"), "--out",
              str(tmp_path / "got.pt"))
    assert "rank 0: starting at step 13" in out  # step 12, the newest before the kill
    ref, got = (torch.load(tmp_path / n, weights_only=True) for n in ("ref.pt", "got.pt"))
    assert equal(ref, got)
    steps = [c.step for c in dckpt.list_checkpoints(str(tmp_path / "run" / "checkpoint"))]
    assert steps == [16, 20]  # keep_latest_k=2; 20 holds the model alone (last step)


class Run:
    """One process: torchtitan's components around a small model, and a checkpointer."""

    def __init__(self, folder, manager=DckptCheckpointManager, **config) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.optimizers = OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                           optimizer_kwargs={"lr": 1e-2})],
            implementation="for-loop").build(model_parts=[self.model])
        self.schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
            optimizers=self.optimizers, training_steps=100)
        self.loader = ParallelAwareDataloader(Samples(0), dp_rank=0, dp_world_size=1,
                                              batch_size=4)
        self.progress = Progress()
        self.checkpointer = manager.Config(
            enable=True, folder="checkpoint", interval=4, keep_latest_k=0,
            **config).build(dataloader=self.loader, model_parts=[self.model],
                            optimizers=self.optimizers, lr_schedulers=self.schedulers,
                            states={"train_state": self.progress}, sd_adapter=None,
                            base_folder=str(folder))

    def train(self, steps: int, load_step: int = -1) -> dict:
        self.checkpointer.load(step=load_step)
        batches = iter(self.loader)
        while self.progress.step < steps:
            self.progress.step += 1
            x, y = next(batches)
            nn.functional.mse_loss(self.model(x), y).backward()
            self.optimizers.step()
            self.schedulers.step()
            self.optimizers.zero_grad()
            self.checkpointer.save(self.progress.step)
        self.checkpointer.close()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_a_damaged_newest_step_falls_back_and_the_run_saves_it_again(tmp_path, caplog):
    reference = Run(tmp_path / "ref").train(16)
    Run(tmp_path / "run").train(12)
    repo = str(tmp_path / "run" / "checkpoint")
    flip_stored_byte(repo, 12, "0.weight", at=5)
    with pytest.raises(dckpt.IntegrityError, match="0.weight"):
        Run(tmp_path / "run").train(16, load_step=12)
    with pytest.raises(FileNotFoundError, match="load_step=9 not found"):
        Run(tmp_path / "run").train(16, load_step=9)
    with caplog.at_level(logging.WARNING):
        run = Run(tmp_path / "run")
        got = run.train(16)
    assert "loaded step 8; passed over [12]" in caplog.text
    assert equal(reference, got)
    assert [c.step for c in dckpt.list_checkpoints(repo)] == [4, 8, 12, 16]
    assert dckpt.verify(repo, all_steps=True).ok  # step 12 made again, whole


def _resume_where_deletes_fail(rank, world, folder):
    """2 gloo ranks resume past a damaged newest step; rank 0's delete of that step fails."""
    if rank == 0:
        def failing(*args, **kwargs):
            raise dckpt.StorageError("SlowDown, tries exhausted")

        dckpt.delete = failing
    begin = time.monotonic()
    try:
        Run(folder).train(16)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e), time.monotonic() - begin
    return None


def test_a_newer_step_rank_0_cannot_delete_fails_every_rank_alike(tmp_path):
    """The run resumes from an older step and deletes the newer ones on rank 0 (it saves
    them again). Where that delete failed, rank 0 alone raised; the others went on to
    train and waited in the first collective, for its timeout."""
    Run(tmp_path / "run").train(12)
    flip_stored_byte(str(tmp_path / "run" / "checkpoint"), 12, "0.weight", at=5)
    out = [o.value for o in run_ranks(_resume_where_deletes_fail, 2, str(tmp_path / "run"))]
    assert out[0][:2] == out[1][:2] == ("StorageError", "SlowDown, tries exhausted"), out
    assert max(o[2] for o in out) < 60, out  # at once, not at a collective's timeout


def test_a_storage_that_fails_while_the_load_looks_is_that_error(tmp_path, monkeypatch):
    """A failed read of the newest manifest was taken for damage: the load went on unsure
    whether that step holds the model alone (step 0, a final save), and loaded as if not."""
    Run(tmp_path / "run").train(4)

    def failing(*args, **kwargs):
        raise dckpt.StorageError("connection reset by peer, tries exhausted")

    monkeypatch.setattr(dckpt, "inspect", failing)
    with pytest.raises(dckpt.StorageError, match="reset by peer"):
        Run(tmp_path / "run").train(8)


def test_an_initial_load_from_torchtitans_own_checkpoint(tmp_path):
    own = Run(tmp_path / "own", manager=CheckpointManager)
    weights = own.train(4)
    run = Run(tmp_path / "run", initial_load_path=str(tmp_path / "own" / "checkpoint" / "step-4"))
    run.checkpointer.load()
    assert equal(weights, run.model.state_dict())
    assert run.progress.step == 0  # model only, as torchtitan's initial_load_model_only


def test_hugging_face_formats_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="dckpt export"):
        DckptCheckpointManager.Config(enable=True, last_save_in_hf=True)


def test_metrics_go_to_the_textfile(tmp_path):
    prom = tmp_path / "dckpt.prom"
    Run(tmp_path / "run", metrics_textfile=str(prom)).train(8)
    text = prom.read_text()
    assert 'dckpt_saves_total{job_name="torchtitan"} 2.0' in text
    assert 'dckpt_training_pause_seconds_count{job_name="torchtitan"} 2.0' in text
    flip_stored_byte(str(tmp_path / "run" / "checkpoint"), 8, "0.weight", at=5)
    Run(tmp_path / "run", metrics_textfile=str(prom)).train(8)  # falls back to step 4
    text = prom.read_text()
    assert 'dckpt_corrupt_checkpoints_detected_total{job_name="torchtitan"} 1.0' in text
    assert 'dckpt_restore_seconds{job_name="torchtitan"}' in text

"""dckpt's torchtitan checkpoint manager with the real torchtitan components (its
OptimizersContainer, LRSchedulersContainer, ParallelAwareDataloader, ModelWrapper and
checkpoint manager contract): FSDP2 on 2 gloo ranks killed with SIGKILL resumes bit-equal
to torchtitan's own manager uninterrupted; keep_latest_k; fallback past a damaged step;
load_step; an initial load from torchtitan's own DCP checkpoint; Hugging Face safetensors in
and out through a state dict adapter, against torchtitan's own manager. (torchtitan's Trainer
itself needs a GPU: the loop here drives the manager as Trainer.train does.)"""

from __future__ import annotations

import json
import logging
import time

import frameworks
import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed: pip install dckpt[torchtitan]")

import safetensors.torch
from dckpt_testing import flip_stored_byte, run_ranks
from torch import nn
from torchtitan.components.checkpointer.dcp import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan_train import Adapter, Progress, Samples

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

    def __init__(self, folder, manager=DckptCheckpointManager, sd_adapter=None,
                 **config) -> None:
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
                            states={"train_state": self.progress}, sd_adapter=sd_adapter,
                            base_folder=str(folder))

    def train(self, steps: int, load_step: int = -1, last: bool = False) -> dict:
        """``last``: ``steps`` is the run's last step (torchtitan's final save)."""
        self.checkpointer.load(step=load_step)
        batches = iter(self.loader)
        while self.progress.step < steps:
            self.progress.step += 1
            x, y = next(batches)
            nn.functional.mse_loss(self.model(x), y).backward()
            self.optimizers.step()
            self.schedulers.step()
            self.optimizers.zero_grad()
            self.checkpointer.save(self.progress.step, last_step=last and self.progress.step == steps)
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


def hf_files(folder) -> dict:
    """Every tensor of a folder's safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {k: v for f in files for k, v in safetensors.torch.load_file(f).items()}


@pytest.mark.parametrize("where", ["hf_assets_path", "initial_load_path"])
def test_an_initial_load_from_hugging_face_safetensors_as_torchtitans_own(tmp_path, where):
    torch.manual_seed(7)
    weights = {k: torch.randn_like(v) for k, v in Run(tmp_path / "shape").model.state_dict().items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    safetensors.torch.save_file(Adapter(None, None).to_hf(weights), hf / "model.safetensors")
    path = {"initial_load_path": str(hf)} if where == "initial_load_path" else {}
    for manager in (CheckpointManager, DckptCheckpointManager):
        run = Run(tmp_path / manager.__name__, manager=manager, initial_load_in_hf=True,
                  sd_adapter=Adapter(None, str(hf) if not path else None), **path)
        assert run.checkpointer.load()
        assert equal(weights, run.model.state_dict()), manager.__name__
        assert run.progress.step == 0
    got = Run(tmp_path / "trained", initial_load_in_hf=True,
              sd_adapter=Adapter(None, str(hf))).train(4)
    assert not equal(weights, got)  # trained from them; a relaunch resumes its own step
    resumed = Run(tmp_path / "trained", initial_load_in_hf=True,
                  sd_adapter=Adapter(None, str(tmp_path / "missing")))
    resumed.checkpointer.load()
    assert resumed.progress.step == 4 and equal(got, resumed.model.state_dict())


@pytest.mark.parametrize("files", [1, 2])
def test_the_last_save_in_hugging_face_safetensors_as_torchtitans_own(tmp_path, files):
    assets = tmp_path / "assets"
    assets.mkdir()
    if files == 2:  # the adapter's index spreads the keys over two files
        keys = Adapter(None, None).to_hf(Run(tmp_path / "shape").model.state_dict())
        (assets / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    final, written = {}, {}
    for manager in (CheckpointManager, DckptCheckpointManager):
        run = Run(tmp_path / manager.__name__, manager=manager, last_save_in_hf=True,
                  export_dtype="bfloat16", sd_adapter=Adapter(None, str(assets)))
        final[manager] = run.train(6, last=True)
        folder = "checkpoint" if manager is CheckpointManager else "checkpoint-hf"
        written[manager] = hf_files(tmp_path / manager.__name__ / folder / "step-6")
        assert len(list((tmp_path / manager.__name__ / folder / "step-6").glob(
            "*.safetensors"))) == files
    assert equal(final[CheckpointManager], final[DckptCheckpointManager])
    ours = written[DckptCheckpointManager]
    assert equal(written[CheckpointManager], ours)
    expected = Adapter(None, None).to_hf(final[DckptCheckpointManager])
    assert equal({k: v.to(torch.bfloat16) for k, v in expected.items()}, ours)
    repo = str(tmp_path / "DckptCheckpointManager" / "checkpoint")
    assert [i.step for i in dckpt.list_checkpoints(repo)] == [4, 6]  # and the model-only step


def test_fsdp2_from_and_to_hugging_face_safetensors_as_torchtitans_own(tmp_path):
    """2 ranks, FSDP2: both managers load the same safetensors into their shards, train,
    and write the final model as safetensors by the adapter's index: the same files."""
    torch.manual_seed(7)
    shapes = {"0.weight": (32, 16), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,),
              "4.weight": (1, 32), "4.bias": (1,)}
    start = Adapter(None, None).to_hf({k: torch.randn(s) for k, s in shapes.items()})
    assets = tmp_path / "assets"
    assets.mkdir()
    safetensors.torch.save_file(start, assets / "model.safetensors")
    (assets / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(start)}}))
    hf = ("--hf-assets", str(assets), "--initial-hf", "--final-hf", "--steps", "6")
    for manager in ("own", "dckpt"):
        out = frameworks.torchrun("torchtitan_train.py", "--dir", str(tmp_path / manager),
                                  "--manager", manager, *hf, "--out",
                                  str(tmp_path / f"{manager}.pt"))
        assert "rank 1: starting at step 1, loaded: True" in out
    own, ours = (torch.load(tmp_path / f"{m}.pt", weights_only=True) for m in ("own", "dckpt"))
    assert equal(own, ours)
    written = hf_files(tmp_path / "dckpt" / "checkpoint-hf" / "step-6")
    assert equal(hf_files(tmp_path / "own" / "checkpoint" / "step-6"), written)
    assert equal({k: v.to(torch.bfloat16) for k, v in Adapter(None, None).to_hf(ours).items()},
                 written)
    assert sorted(p.name for p in (tmp_path / "dckpt" / "checkpoint-hf" / "step-6").glob(
        "*.safetensors")) == ["model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"]


def test_a_seed_checkpoint_starts_two_fsdp2_ranks_as_torchtitans_own(tmp_path):
    """torchtitan's create_seed_checkpoint: one process saves step 0 (the model alone,
    unsharded); a job on 2 FSDP2 ranks starts from it, as from torchtitan's own seed."""
    for manager in ("own", "dckpt"):
        folder = str(tmp_path / manager)
        frameworks.torchrun("torchtitan_train.py", "--dir", folder, "--manager", manager,
                            "--seed-checkpoint", ranks=1)
        out = frameworks.torchrun("torchtitan_train.py", "--dir", folder, "--manager", manager,
                                  "--steps", "6", "--out", str(tmp_path / f"{manager}.pt"))
        assert "rank 1: starting at step 1, loaded: True" in out
    frameworks.torchrun("torchtitan_train.py", "--dir", str(tmp_path / "unseeded"), "--steps",
                        "6", "--out", str(tmp_path / "unseeded.pt"))
    own, ours, unseeded = (torch.load(tmp_path / f"{m}.pt", weights_only=True)
                           for m in ("own", "dckpt", "unseeded"))
    assert equal(own, ours) and not equal(ours, unseeded)
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path / "dckpt" / "checkpoint"))] == [4, 6]


def test_hugging_face_formats_without_an_adapter_or_to_a_remote_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sd_adapter"):
        Run(tmp_path, last_save_in_hf=True)
    with pytest.raises(ValueError, match="sd_adapter"):
        Run(tmp_path, initial_load_in_hf=True)
    with pytest.raises(ValueError, match="s3://bucket/run is remote"):
        DckptCheckpointManager.Config(enable=True, last_save_in_hf=True, url="s3://bucket/run")
    with pytest.raises(ValueError, match="hf_folder"):
        DckptCheckpointManager.Config(enable=True, last_save_in_hf=True,
                                      hf_folder="s3://bucket/hf")
    local = DckptCheckpointManager.Config(enable=True, last_save_in_hf=True,  # its own folder
                                          url="s3://bucket/run", hf_folder=str(tmp_path / "hf"))
    assert local.hf_folder == str(tmp_path / "hf")
    run = Run(tmp_path, initial_load_in_hf=True, sd_adapter=Adapter(None, None),
              initial_load_path=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="nothing is not a folder"):
        run.checkpointer.load()


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

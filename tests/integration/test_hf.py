"""dckpt's Hugging Face integration with the real transformers and Accelerate: a Trainer run
and an Accelerate loop on 2 gloo ranks, rank 1 SIGKILLed, resume bit-exact;
``save_total_limit`` / ``total_limit`` delete checkpoints; a damaged newest checkpoint
gives way to the folder before it."""

from __future__ import annotations

import logging
import os
import shutil

import frameworks
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install dckpt[hf]")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install dckpt[hf]")

import transformers
from dckpt_testing import flip_stored_byte
from hf_train import model_and_data
from transformers import TrainingArguments

import dckpt
from dckpt.integrations.common import read_pointer
from dckpt.integrations.hf import POINTER_NAME, Trainer

pytestmark = pytest.mark.integration


def torchrun(*args: str, check: bool = True) -> str:
    return frameworks.torchrun("hf_train.py", *args, check=check)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def held(folders: list[str]) -> list[int]:
    steps = [read_pointer(os.path.join(f, POINTER_NAME)) for f in folders]
    return sorted(p.step for p in steps if p is not None)


def kill_and_resume(tmp_path, *mode: str) -> dict:
    out = torchrun("--dir", str(tmp_path / "ckpt"), *mode, "--kill-at-step", "14", check=False)
    assert "rank 1: SIGKILL at step 14" in out
    torchrun("--dir", str(tmp_path / "ckpt"), *mode, "--resume", "--out", str(tmp_path / "got.pt"))
    return torch.load(tmp_path / "got.pt", weights_only=True)


def test_trainer_killed_with_sigkill_resumes_bit_exact(tmp_path):
    """The Trainer with its own checkpoints uninterrupted against dckpt's Trainer killed at
    step 14 and resumed from checkpoint-12 (dropout on)."""
    torchrun("--dir", str(tmp_path / "ref"), "--own", "--out", str(tmp_path / "ref.pt"))
    got = kill_and_resume(tmp_path, "--mode", "trainer")
    assert equal(torch.load(tmp_path / "ref.pt", weights_only=True), got)
    folders = sorted(os.path.join(tmp_path / "ckpt", n) for n in os.listdir(tmp_path / "ckpt")
                     if n.startswith("checkpoint-"))
    assert [os.path.basename(f) for f in folders] == ["checkpoint-20", "checkpoint-24"]
    assert held(folders) == [c.step for c in dckpt.list_checkpoints(str(tmp_path / "ckpt/dckpt"))]


def test_accelerate_killed_with_sigkill_resumes_as_accelerate_does(tmp_path):
    """accelerator.save_state / load_state against dckpt's AcceleratorCheckpoints, both
    killed at step 14 and resumed: bit-equal (a hand-written loop makes its random stream
    after load_state what it makes of it, with either)."""
    own = kill_and_resume(tmp_path / "own", "--mode", "accelerate", "--own")
    got = kill_and_resume(tmp_path, "--mode", "accelerate")
    assert equal(own, got)
    root = tmp_path / "ckpt" / "checkpoints"
    assert sorted(os.listdir(root)) == ["checkpoint_4", "checkpoint_5"]  # total_limit 2
    assert held([str(root / n) for n in os.listdir(root)]) == [
        c.step for c in dckpt.list_checkpoints(str(tmp_path / "ckpt" / "dckpt"))]


def trained(folder, steps: int, *, resume: bool = False, cls=Trainer, **kw) -> dict:
    model, data = model_and_data()
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=8,
                             max_steps=steps, save_strategy="steps", save_steps=4,
                             learning_rate=1e-3, report_to=[], seed=0, data_seed=0,
                             use_cpu=True, disable_tqdm=True, logging_steps=1000)
    cls(model=model, args=args, train_dataset=data, **kw).train(
        resume_from_checkpoint=True if resume else None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_checkpoint_that_never_committed_gives_way_to_the_folder_before(tmp_path, caplog):
    """checkpoint-8's save never committed: the run resumes from checkpoint-4 and ends
    bit-equal to the Trainer's own resume from its checkpoint-4 (in one process, the
    Trainer's own mid-epoch resume is not bit-equal to an uninterrupted run: compare what
    it restores, from the same checkpoint-4 of an 8-step run, whose schedule it holds)."""
    trained(tmp_path / "ref", 8, cls=transformers.Trainer)
    shutil.rmtree(tmp_path / "ref" / "checkpoint-8")
    reference = trained(tmp_path / "ref", 12, resume=True, cls=transformers.Trainer)
    trained(tmp_path / "run", 8)
    newest = read_pointer(str(tmp_path / "run" / "checkpoint-8" / POINTER_NAME))
    dckpt.delete(newest.url, step=newest.step)  # as if the commit never came
    with pytest.raises(dckpt.CheckpointNotFoundError):
        trained(tmp_path / "run", 12, resume=True, fallback=False)
    with caplog.at_level(logging.WARNING):
        got = trained(tmp_path / "run", 12, resume=True)
    assert f"resuming from {tmp_path / 'run' / 'checkpoint-4'}" in caplog.text
    assert equal(reference, got)


@pytest.mark.parametrize("where", ["manifest", "pointer"])
def test_a_storage_that_fails_while_resuming_is_that_error_not_an_older_folder(
        tmp_path, monkeypatch, where):
    """A reset connection (or an EIO on the pointer) while rank 0 looked for the newest
    committed folder passed that folder over: the run resumed from checkpoint-4 and
    redid the training since, where a retry would have found checkpoint-8 sound."""
    trained(tmp_path / "run", 8)
    if where == "manifest":
        def failing(*args, **kwargs):
            raise dckpt.StorageError("connection reset by peer, tries exhausted")
        monkeypatch.setattr(dckpt, "inspect", failing)
    else:
        import dckpt.integrations.hf as hf

        def failing(path):
            raise OSError(5, "Input/output error", path)
        monkeypatch.setattr(hf, "read_pointer", failing)
    with pytest.raises(dckpt.StorageError, match="reset by peer|Input/output error"):
        trained(tmp_path / "run", 12, resume=True)


def test_a_folder_rotation_that_fails_is_logged_and_training_goes_on(tmp_path, monkeypatch,
                                                                      caplog):
    """``save_total_limit`` removes old folders on rank 0 alone: its raising ended rank 0
    mid-run while the other ranks went on into their next collective."""
    import dckpt.integrations.hf as hf

    def failing(path):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(hf, "remove_pointer", failing)
    model, data = model_and_data()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             max_steps=12, save_strategy="steps", save_steps=4,
                             save_total_limit=1, report_to=[], use_cpu=True, disable_tqdm=True)
    with caplog.at_level(logging.WARNING):
        out = Trainer(model=model, args=args, train_dataset=data).train()
    assert out.global_step == 12
    assert "could not remove" in caplog.text and "Input/output error" in caplog.text


def test_a_damaged_checkpoint_raises_naming_the_folder_to_resume_from(tmp_path):
    trained(tmp_path / "run", 8)
    newest = read_pointer(str(tmp_path / "run" / "checkpoint-8" / POINTER_NAME))
    flip_stored_byte(newest.url, newest.step, "app.model.transformer.wte.weight", at=3)
    with pytest.raises(dckpt.IntegrityError, match=r"(?s)transformer.wte.weight.*"
                       r"resume_from_checkpoint='[^']*checkpoint-4'"):
        trained(tmp_path / "run", 12, resume=True)


def test_bad_arguments_are_refused_at_construction(tmp_path):
    import accelerate

    import dckpt
    from dckpt.integrations.hf import AcceleratorCheckpoints

    with pytest.raises(dckpt.ArgumentError, match="an accelerate Accelerator"):
        AcceleratorCheckpoints(5)
    accelerator = accelerate.Accelerator(cpu=True)
    for kwargs in ({"url": 5}, {"fallback": "no"}, {"async_save": None},
                   {"save_config": dckpt.LoadConfig()}):
        with pytest.raises(dckpt.ArgumentError):
            AcceleratorCheckpoints(accelerator, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_load_best_model_at_end_loads_the_best_checkpoints_weights(tmp_path):
    """``load_best_model_at_end``: the Trainer's own looks for a weights file in the best
    folder, which holds a pointer; dckpt's loads the pointed checkpoint's model, and the run
    ends with the same weights as the Trainer's own (the best step is not the last)."""

    def best_of(cls, folder) -> tuple[dict, str]:
        model, data = model_and_data()
        args = TrainingArguments(
            output_dir=str(folder), per_device_train_batch_size=4, max_steps=24,
            save_strategy="steps", save_steps=4, eval_strategy="steps", eval_steps=4,
            save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
            greater_is_better=False, learning_rate=5e-2, report_to=[], seed=0, data_seed=0,
            use_cpu=True, disable_tqdm=True, logging_steps=1000)
        t = cls(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
        t.train()
        return ({k: v.detach().clone() for k, v in model.state_dict().items()},
                os.path.basename(t.state.best_model_checkpoint))

    own, own_best = best_of(transformers.Trainer, tmp_path / "own")
    got, best = best_of(Trainer, tmp_path / "run")
    assert best == own_best != "checkpoint-24"
    assert equal(own, got)


@pytest.mark.parametrize("mode", ["trainer", "accelerate"])
def test_a_pointer_rank_0_cannot_write_fails_every_rank_alike(tmp_path, mode):
    """The pointer files are rank 0's. Where one's write failed, rank 0 raised a bare
    OSError and the other ranks went on to wait in the next collective."""
    out = torchrun("--dir", str(tmp_path / "ckpt"), "--mode", mode, "--fail-pointer", "write",
                   check=False)
    raised = sorted(line for line in out.splitlines() if " raised " in line)
    assert len(raised) == 2, out[-3000:]
    assert raised[0].removeprefix("rank 0") == raised[1].removeprefix("rank 1"), raised
    assert "raised StorageError: writing " in raised[0] and POINTER_NAME in raised[0]
    assert "No space left on device" in raised[0]

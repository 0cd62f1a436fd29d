"""A failed save leaves nothing that no manifest can reference (a full disk needs its space
back), and never removes what a manifest may reference."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from dckpt_testing import arm, disarm, leftovers

import dckpt
from dckpt import layout
from dckpt.direct import DirectFile
from dckpt.storage import Store

N = 64 << 10  # float32 elements: 256 KiB per tensor


def _state(seed: float) -> dict:
    g = torch.Generator().manual_seed(int(seed))
    return {f"t{i}": torch.randn(N, generator=g) for i in range(4)}


def _attempts(root) -> list[str]:
    return sorted(os.listdir(os.path.join(root, layout.DATA_DIR)))


def _check_step(url: str, step: int, value: float) -> None:
    out = _state(0.0)
    assert dckpt.load(out, url, step=step).step == step
    assert all(torch.equal(out[k], v) for k, v in _state(value).items())


def test_a_full_disk_mid_save_leaves_nothing_behind(tmp_path):
    url = f"faultyfile://{tmp_path}"
    dckpt.save(_state(1.0), url, step=1)
    before = _attempts(tmp_path)
    arm("enospc", after_bytes=600_000)  # the segment (1 MiB) is cut
    try:
        with pytest.raises(dckpt.CommitError, match="No space left"):
            dckpt.save(_state(2.0), url, step=2)
    finally:
        disarm()
    assert leftovers(str(tmp_path)) == [] and _attempts(tmp_path) == before
    dckpt.save(_state(3.0), url, step=2)
    _check_step(url, 2, 3.0)


@pytest.mark.parametrize("staging_bytes", [None, 384 << 10])
def test_a_full_disk_in_an_async_save_leaves_nothing_behind(tmp_path, staging_bytes):
    """In the background write; with a small staging budget, after the pause wrote what
    the budget does not hold into an attempt folder of its own."""
    url = f"faultyfile://{tmp_path}"
    config = dckpt.SaveConfig(block_size_bytes=64 << 10, staging_bytes=staging_bytes)
    dckpt.async_save(_state(1.0), url, step=1, config=config).wait(timeout=60)
    before = _attempts(tmp_path)
    arm("enospc", after_bytes=900_000)  # past the pause's 768 KiB, in the background
    try:
        handle = dckpt.async_save(_state(2.0), url, step=2, config=config)
        with pytest.raises(dckpt.CommitError, match="No space left"):
            handle.wait(timeout=60)
        assert (handle.error is not None)
    finally:
        disarm()
    assert leftovers(str(tmp_path)) == [] and _attempts(tmp_path) == before
    info = dckpt.async_save(_state(3.0), url, step=2, config=config).wait(timeout=60)
    assert info.overflow_bytes == (0 if staging_bytes is None else 768 << 10)
    _check_step(url, 2, 3.0)


@pytest.mark.parametrize("n", [N, 1000])
def test_a_full_disk_in_direct_writes_leaves_nothing_behind(tmp_path, monkeypatch, n):
    """The local disk's own path: O_DIRECT writes from the tensors' memory, or (small
    items) from the bounce buffer at the segment's close."""
    def state(seed: int) -> dict:
        return {k: v[:n].clone() for k, v in _state(seed).items()}

    dckpt.save(state(1), str(tmp_path), step=1)
    before = _attempts(tmp_path)
    write_all = DirectFile._write_all
    written: list[int] = []

    def fill_up(self, mv):  # half of the first write goes through, then the disk is full
        write_all(self, mv[: len(mv) // 2 // 4096 * 4096])
        written.append(len(mv))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DirectFile, "_write_all", fill_up)
    with pytest.raises(dckpt.CommitError, match="No space left"):
        dckpt.save(state(2), str(tmp_path), step=2)
    monkeypatch.undo()
    assert written and leftovers(str(tmp_path)) == [] and _attempts(tmp_path) == before
    dckpt.save(state(3), str(tmp_path), step=2)
    out = state(0)
    dckpt.load(out, str(tmp_path), step=2)
    assert all(torch.equal(out[k], v) for k, v in state(3).items())


def test_a_refused_async_save_removes_what_its_pause_wrote(tmp_path):
    """The step is committed already: refused at the plan, after the pause wrote."""
    config = dckpt.SaveConfig(block_size_bytes=64 << 10, staging_bytes=128 << 10)
    dckpt.save(_state(1.0), str(tmp_path), step=1)
    handle = dckpt.async_save(_state(2.0), str(tmp_path), step=1, config=config)
    with pytest.raises(dckpt.CheckpointExistsError):
        handle.wait(timeout=60)
    assert leftovers(str(tmp_path)) == [] and len(_attempts(tmp_path)) == 1
    _check_step(str(tmp_path), 1, 1.0)


def test_a_full_disk_at_the_manifest_leaves_nothing_behind(tmp_path):
    """The data fit, the manifest did not: a local create is one link, never made, so the
    data goes too (on an object store it would stay: the request may still arrive)."""
    url = f"faultyfile://{tmp_path}"
    dckpt.save(_state(1.0), url, step=1)
    before = _attempts(tmp_path)
    arm("enospc", after_bytes=10, only=f"/{layout.MANIFEST_DIR}/")
    try:
        with pytest.raises(dckpt.CommitError, match="No space left"):
            dckpt.save(_state(2.0), url, step=2)
    finally:
        disarm()
    assert os.listdir(tmp_path / layout.MANIFEST_DIR) == [layout.manifest_name(1).split("/")[-1]]
    assert leftovers(str(tmp_path)) == [] and _attempts(tmp_path) == before
    _check_step(url, 1, 1.0)


def test_a_step_committed_meanwhile_by_another_save_takes_this_saves_data_away(tmp_path,
                                                                              monkeypatch):
    """Another job committed the same step while this save wrote: the manifest there is
    not this save's (a local create is one link), and this save's data goes."""
    url = str(tmp_path)
    dckpt.save(_state(1.0), url, step=1)
    create = Store.create_exclusive
    raced: list[bool] = []

    def another_job_first(self, name, data):
        if name == layout.manifest_name(2) and not raced:
            raced.append(True)
            dckpt.save(_state(3.0), url, step=2)  # nested: the other job's commit
        create(self, name, data)

    monkeypatch.setattr(Store, "create_exclusive", another_job_first)
    with pytest.raises(dckpt.CheckpointExistsError, match="another save"):
        dckpt.save(_state(2.0), url, step=2)
    monkeypatch.undo()
    assert leftovers(url) == [] and len(_attempts(tmp_path)) == 2
    _check_step(url, 2, 3.0)


def test_a_save_whose_manifest_arrived_despite_an_error_keeps_its_data(tmp_path, monkeypatch):
    """The create of the manifest fails after the store took it (an object store's request
    that timed out but arrived): the error is raised, and the data stays, whole."""
    create = Store.create_exclusive

    def lost_reply(self, name, data):
        create(self, name, data)
        if name.startswith(f"{layout.MANIFEST_DIR}/"):
            raise TimeoutError("Read timeout on endpoint URL (injected)")

    monkeypatch.setattr(Store, "create_exclusive", lost_reply)
    with pytest.raises(dckpt.CommitError, match="Read timeout"):
        dckpt.save(_state(2.0), str(tmp_path), step=2)
    monkeypatch.undo()
    assert leftovers(str(tmp_path)) == []
    _check_step(str(tmp_path), 2, 2.0)
    assert dckpt.verify(str(tmp_path), all_steps=True).ok


def test_a_failed_write_leaves_no_partial_object(tmp_path):
    store = Store(str(tmp_path))
    for direct in (True, False):
        with pytest.raises(OSError, match="injected"):
            with store.open_write(f"data/a/{direct}.seg", direct=direct) as f:
                f.write(b"x" * 10_000)
                raise OSError(errno.ENOSPC, "injected")
        assert os.listdir(tmp_path / "data" / "a") == []


def test_create_exclusive_leaves_no_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    store = Store(str(tmp_path))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        store.create_exclusive("manifests/x.json", b"{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "manifests") == []


@pytest.mark.s3
def test_a_failed_async_save_on_s3_removes_what_its_pause_uploaded(s3_repo):
    """The pause uploaded what the staging budget does not hold as an object of its own;
    the background upload then fails: that object is deleted from the bucket."""
    import fsspec
    from dckpt_testing import faulty_s3_class

    url, opts = s3_repo
    fsspec.register_implementation("faultys3", faulty_s3_class(), clobber=True)
    faulty = url.replace("s3://", "faultys3://")
    config = dckpt.SaveConfig(block_size_bytes=64 << 10, staging_bytes=384 << 10)
    dckpt.async_save(_state(1.0), faulty, step=1, config=config,
                     storage_options=opts).wait(timeout=60)
    arm("eio", after_bytes=900_000)  # past the pause's 768 KiB, in the background
    try:
        handle = dckpt.async_save(_state(2.0), faulty, step=2, config=config,
                                  storage_options=opts)
        with pytest.raises(dckpt.CommitError, match="SlowDown"):
            handle.wait(timeout=60)
    finally:
        disarm()
    assert dckpt.gc(url, dry_run=True, min_age_s=0, storage_options=opts).deleted == ()
    assert [i.step for i in dckpt.list_checkpoints(url, storage_options=opts)] == [1]


def _interrupt_after(seconds: float) -> None:
    import signal
    import threading

    threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT)).start()


def test_ctrl_c_mid_save_interrupts_and_leaves_nothing_behind(tmp_path):
    """DCP catches whatever a step raises: Ctrl-C became a CommitError, which a manager's
    training loop goes on past."""
    url = f"faultyfile://{tmp_path}"
    dckpt.save(_state(1.0), url, step=1)
    arm("slow", delay_s=0.05)  # every write waits: the save takes seconds
    _interrupt_after(0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            dckpt.save(_state(2.0), url, step=2,
                       config=dckpt.SaveConfig(block_size_bytes=64 << 10))
    finally:
        disarm()
    assert leftovers(str(tmp_path)) == []
    dckpt.save(_state(2.0), url, step=2)
    _check_step(str(tmp_path), 2, 2.0)


def test_ctrl_c_mid_load_interrupts_and_falls_back_to_nothing(tmp_path, monkeypatch):
    import time

    from dckpt.reads import Fetcher

    url = str(tmp_path)
    dckpt.save(_state(1.0), url, step=1)
    dckpt.save(_state(2.0), url, step=2)
    read = Fetcher._read
    monkeypatch.setattr(Fetcher, "_read", lambda self, *a: (time.sleep(0.2), read(self, *a))[1])
    _interrupt_after(0.1)
    out = _state(0.0)
    with pytest.raises(KeyboardInterrupt):  # not a fallback to step 1, not a DckptError
        dckpt.load(out, url, config=dckpt.LoadConfig(reader_threads=1))
    monkeypatch.setattr(Fetcher, "_read", read)
    _check_step(url, 2, 2.0)

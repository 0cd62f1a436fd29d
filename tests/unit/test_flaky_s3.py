"""An S3 server behind a proxy that resets connections and cuts responses short: every save
and load either works (values bit-equal) or raises a specific DckptError, in bounded time,
and nothing the storage ends up holding is damaged."""

from __future__ import annotations

import os
import time

import pytest
import torch

import dckpt
from dckpt import dedup
from dckpt_testing import FlakyProxy


def state(step: int) -> dict:
    """Step ``step``'s values: most of ``w`` as step 1's (differential saves), ``e`` new."""
    w = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    w[:1000] += step
    return {"w": w, "e": torch.randn(64, 256, generator=torch.Generator().manual_seed(step)),
            "n": step}


def blank() -> dict:
    return {"w": torch.zeros(200_000), "e": torch.zeros(64, 256), "n": 0}


def equal(got: dict, want: dict) -> bool:
    return all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
               for k, v in want.items())


@pytest.fixture
def flaky_repo(moto_server):
    name = f"flaky-{os.getpid()}-{time.monotonic_ns()}"
    moto_server.make_bucket(name)
    return f"s3://{name}/repo", moto_server


def test_a_response_cut_short_is_a_storage_error_and_the_checkpoint_is_intact(flaky_repo):
    """Every read of a data object answered with one byte of its body and a reset: s3fs
    tries it again, then the load is a StorageError (the storage failed, not the checkpoint:
    no fallback past it) on the first try, not an unexpected DckptError."""
    url, server = flaky_repo
    dckpt.save(state(1), url, step=1, storage_options=server.options())
    proxy = FlakyProxy(server.port, truncate=b" /" + url[5:].encode() + b"/data/")
    try:
        t0 = time.monotonic()
        with pytest.raises(dckpt.StorageError, match="ClientPayloadError") as e:
            dckpt.load(blank(), url, storage_options=proxy.options())
        assert type(e.value) is dckpt.StorageError
        assert time.monotonic() - t0 < 30
        assert proxy.resets >= 2  # tried again before giving up
    finally:
        proxy.close()
    got = blank()
    assert dckpt.load(got, url, storage_options=server.options()).step == 1
    assert equal(got, state(1))


@pytest.mark.parametrize("seed", [1, 2])
def test_saves_and_loads_through_resets_work_or_fail_cleanly_and_damage_nothing(flaky_repo,
                                                                                seed):
    """A third of the connections reset at a random byte, either way: saves (sync, async,
    differential) and loads go on; each call returns right values or raises a DckptError
    subclass that says what failed; what the repository holds afterwards verifies and
    loads bit-equal, and every save that returned is there."""
    url, server = flaky_repo
    proxy = FlakyProxy(server.port, p=0.35, seed=seed)
    returned, errors = [], []
    t0 = time.monotonic()
    try:
        for step in range(1, 9):
            dedup.forget()  # now and then a restarted process: differential against storage
            try:
                if step % 2:
                    dckpt.save(state(step), url, step=step, storage_options=proxy.options())
                else:
                    dckpt.async_save(state(step), url, step=step,
                                     storage_options=proxy.options()).wait(timeout=120)
                returned.append(step)
            except dckpt.DckptError as e:
                errors.append(e)
            got = blank()
            try:
                info = dckpt.load(got, url, storage_options=proxy.options())
                assert equal(got, state(info.step)), info.step
            except dckpt.CheckpointNotFoundError:
                assert not returned
            except dckpt.DckptError as e:
                errors.append(e)
    finally:
        proxy.close()
    assert proxy.resets >= 5
    assert time.monotonic() - t0 < 240
    for e in errors:  # the storage's failure, in the type that says so
        assert type(e) in (dckpt.StorageError, dckpt.CommitError), repr(e)
    listed = [i.step for i in dckpt.list_checkpoints(url, storage_options=server.options())]
    assert set(returned) <= set(listed)
    report = dckpt.verify(url, storage_options=server.options())
    assert report.ok, report.problems
    dckpt.gc(url, storage_options=server.options(), min_age_s=0)
    for step in listed:
        got = blank()
        dckpt.load(got, url, step=step, storage_options=server.options())
        assert equal(got, state(step)), step


def test_a_commit_whose_answer_was_lost_is_a_commit(flaky_repo):
    """The manifest's create reaches the server and its answer is lost to a reset: s3fs
    sends it again, and the retry finds the object there. The manifest there is this
    save's: the save is committed (it raised, though its checkpoint was there, and a retry
    of the save found its step taken)."""
    url, server = flaky_repo
    proxy = FlakyProxy(server.port, drop=b"PUT /" + url[5:].encode() + b"/manifests/")
    try:
        info = dckpt.save(state(1), url, step=1, storage_options=proxy.options())
        assert info.step == 1 and proxy.resets >= 1
        info = dckpt.async_save(state(2), url, step=2, storage_options=proxy.options()).wait()
        assert info.step == 2
    finally:
        proxy.close()
    assert [i.step for i in dckpt.list_checkpoints(url, storage_options=server.options())] == [1, 2]
    assert dckpt.verify(url, storage_options=server.options()).ok
    for step in (1, 2):
        got = blank()
        dckpt.load(got, url, step=step, storage_options=server.options())
        assert equal(got, state(step))


def test_a_create_that_finds_an_object_tells_its_own_from_anothers(monkeypatch):
    """On an object store (memory:// here): the object a create finds is this create's when
    it holds these bytes; another's raises FileExistsError; one that cannot be read back
    (three tries) is neither, and says the create may have made it."""
    import errno

    from dckpt.storage import Store

    store = Store(f"memory://creates-{os.getpid()}-{time.monotonic_ns()}")
    store.create_exclusive("m.json", b"mine")
    store.create_exclusive("m.json", b"mine")  # a retry of a create whose answer was lost
    with pytest.raises(FileExistsError):
        store.create_exclusive("m.json", b"theirs")
    tries = []

    def unreadable(path, *a, **k):
        tries.append(path)
        raise ConnectionResetError("reset")

    monkeypatch.setattr(store.fs, "cat_file", unreadable)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(OSError, match="could not be read back") as e:
        store.create_exclusive("m.json", b"mine")
    assert e.value.errno == errno.EIO and len(tries) == 3
    tries.clear()

    def timed_out(*a, **k):
        raise TimeoutError("no answer")

    monkeypatch.setattr(store.fs, "pipe_file", timed_out)
    with pytest.raises(TimeoutError):  # a storage that stops answering: no read after it
        store.create_exclusive("n.json", b"mine")
    assert tries == []

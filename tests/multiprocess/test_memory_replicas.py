"""The memory tier across nodes, on real gloo ranks: each rank plays one node (torchrun's
GROUP_RANK, one rank per node) with a memory folder of its own. A restart on the same
nodes restores from memory; a node whose memory is gone, or ranks that moved to other
nodes, restore from the peers that hold the segments; a damaged segment falls back to its
replica, and with none to storage; every rank agrees."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dckpt
from dckpt import memory
from dckpt_testing import flip_stored_byte, run_ranks


def _as_node(node: int) -> None:
    os.environ.update(GROUP_RANK=str(node), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def _state(rank: int, step: int) -> dict:
    return {"w": torch.arange(4096, dtype=torch.float32) + step,
            f"rank{rank}.x": torch.full((1000,), float(rank * 100 + step)),
            "opt": {"lr": 0.1 * step}}


def _empty(rank: int) -> dict:
    return {"w": torch.zeros(4096), f"rank{rank}.x": torch.zeros(1000), "opt": {"lr": -1.0}}


def _manager(url, shm, node, replicas):
    return dckpt.CheckpointManager(url, save_every_steps=4, memory_every_steps=3,
                                   memory_replicas=replicas, handle_signals=False,
                                   memory_dir=os.path.join(shm, f"node{node}"))


def _save(rank, world, url, shm, replicas):
    _as_node(rank)
    mgr = _manager(url, shm, rank, replicas)
    for step in range(10):
        mgr.maybe_save(step, _state(rank, step))
    mgr._poll(wait=True)
    mgr._close(remove_memory=False)  # as a crash would leave it
    return mgr.memory.step


def _restore(rank, world, url, shm, replicas, node):
    _as_node(node)
    mgr = _manager(url, shm, node, replicas)
    out = _empty(rank)
    info = mgr.restore(out)
    mgr._close(remove_memory=False)
    want = _state(rank, info.step)
    same = all(torch.equal(out[k], want[k]) for k in ("w", f"rank{rank}.x"))
    return info.step, info.tier, same and out["opt"] == want["opt"]


def _folder(url, shm, node):
    return memory.memory_folder(url, os.path.join(shm, f"node{node}"))


def _setup(tmp_path, replicas):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    for node in (0, 1):
        os.makedirs(os.path.join(shm, f"node{node}"))
    assert [o.value for o in run_ranks(_save, 2, url, shm, replicas)] == [9, 9]
    return url, shm


def _segments(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(os.path.join(folder, "data")) for f in files)


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_restart_on_the_same_nodes_restores_from_each_nodes_memory(tmp_path, replicas):
    url, shm = _setup(tmp_path, replicas)
    a, b = _segments(_folder(url, shm, 0)), _segments(_folder(url, shm, 1))
    both = set(a) & set(b)
    assert both == (set(a) if replicas else set())  # a replica holds the other node's
    for node in (0, 1):  # every node has the manifest
        assert dckpt.list_checkpoints(_folder(url, shm, node))[-1].step == 9
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, replicas)]
    assert values == [(9, "memory", True), (9, "memory", True)]


def _restore_same(rank, world, url, shm, replicas):
    return _restore(rank, world, url, shm, replicas, rank)


def _restore_swapped(rank, world, url, shm, replicas):
    return _restore(rank, world, url, shm, replicas, 1 - rank)


def test_a_lost_nodes_memory_comes_back_from_its_replica(tmp_path):
    url, shm = _setup(tmp_path, 1)
    shutil.rmtree(os.path.join(shm, "node1"))  # the machine was replaced
    os.makedirs(os.path.join(shm, "node1"))
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 1)]
    assert values == [(9, "memory", True), (9, "peer", True)]


def _restore_into_a_full_folder(rank, world, url, shm):
    import errno
    import time

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    kept = os.posix_fallocate
    if rank == 1:  # the replaced node's folder cannot take what its peer sends
        os.posix_fallocate = full
    t0 = time.monotonic()
    try:
        value = _restore(rank, world, url, shm, 1, rank)
    finally:
        os.posix_fallocate = kept
    parts = [p for p in _segments(_folder(url, shm, rank)) if p.endswith(".part")]
    return value, time.monotonic() - t0, parts


def test_a_replaced_node_whose_folder_is_full_restores_from_storage_at_once(tmp_path):
    """Every rank learns of the full folder before any segment is sent (no rank waits out
    the collective timeout), and the restore falls back to storage."""
    url, shm = _setup(tmp_path, 1)
    shutil.rmtree(os.path.join(shm, "node1"))
    os.makedirs(os.path.join(shm, "node1"))
    values = [o.value for o in run_ranks(_restore_into_a_full_folder, 2, url, shm)]
    assert [v for v, _, _ in values] == [(8, "storage", True), (8, "storage", True)]
    assert all(seconds < 30 and parts == [] for _, seconds, parts in values), values


def _manifest_gone_after_the_inventory(rank, world, url, shm):
    import time

    from dckpt import tiers

    def gone(store, step):  # whichever node's leader holds it finds it gone
        raise FileNotFoundError(f"manifests/{step:012d}.json (injected)")

    tiers.read_manifest_raw = gone
    t0 = time.monotonic()
    try:
        _restore(rank, world, url, shm, 1, rank)
        return "restored", time.monotonic() - t0
    except dckpt.StorageError as e:
        return str(e).splitlines()[0], time.monotonic() - t0


def test_a_memory_manifest_gone_after_the_inventory_is_the_same_error_at_once(tmp_path):
    url, shm = _setup(tmp_path, 1)
    values = [o.value for o in run_ranks(_manifest_gone_after_the_inventory, 2, url, shm)]
    assert values[0][0] == values[1][0] and "cannot be read: FileNotFoundError" in values[0][0]
    assert all(seconds < 30 for _, seconds in values), values


def _segment_gone_before_it_is_sent(rank, world, url, shm):
    import contextlib
    import time

    from dckpt import replicas

    @contextlib.contextmanager
    def gone(root):  # the node that holds the segments finds them gone when it sends
        yield lambda segment: None

    if rank == 0:
        replicas.mapped_segments = gone
    t0 = time.monotonic()
    value = _restore(rank, world, url, shm, 1, rank)
    return value, time.monotonic() - t0


def test_a_segment_gone_before_it_is_sent_fails_every_rank_at_once(tmp_path):
    """Node 1 lost its memory; node 0 holds the replicas but finds them gone when it
    sends: every rank learns it before any send (none waits out the collective timeout,
    or receives fewer bytes than planned), and the restore goes to storage."""
    url, shm = _setup(tmp_path, 1)
    shutil.rmtree(os.path.join(shm, "node1"))
    os.makedirs(os.path.join(shm, "node1"))
    values = [o.value for o in run_ranks(_segment_gone_before_it_is_sent, 2, url, shm)]
    assert [v for v, _ in values] == [(8, "storage", True), (8, "storage", True)]
    assert all(seconds < 30 for _, seconds in values), values


def test_without_replicas_a_lost_nodes_memory_means_storage(tmp_path):
    url, shm = _setup(tmp_path, 0)
    shutil.rmtree(_folder(url, shm, 1))
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 0)]
    assert values == [(8, "storage", True), (8, "storage", True)]


@pytest.mark.parametrize("replicas, tier", [(0, "peer"), (1, "memory")])
def test_ranks_that_moved_to_other_nodes_find_their_shards(tmp_path, replicas, tier):
    url, shm = _setup(tmp_path, replicas)
    values = [o.value for o in run_ranks(_restore_swapped, 2, url, shm, replicas)]
    assert values == [(9, tier, True), (9, tier, True)]


def _timed_swapped(rank, world, url, shm):
    import time

    t0 = time.monotonic()
    value = _restore_swapped(rank, world, url, shm, 0)
    return value, time.monotonic() - t0


def test_a_damaged_value_sent_to_a_moved_rank_fails_every_rank_at_once(tmp_path):
    """The value's only copy is on the other node: the rank that holds it finds it damaged
    before sending, every rank learns it at once (none waits out the collective timeout on
    a send that never comes), and the restore goes to storage."""
    url, shm = _setup(tmp_path, 0)
    segment = dckpt.inspect(_folder(url, shm, 0), step=9).items["opt.lr"].data.blocks[0].segment
    holder = next(n for n in (0, 1) if os.path.exists(os.path.join(_folder(url, shm, n),
                                                                   segment)))
    flip_stored_byte(_folder(url, shm, holder), 9, "opt.lr", at=0, mask=0x10)
    values = [o.value for o in run_ranks(_timed_swapped, 2, url, shm)]
    assert [v for v, _ in values] == [(8, "storage", True), (8, "storage", True)]
    assert all(seconds < 30 for _, seconds in values), values


def test_a_damaged_segment_falls_back_to_its_replica(tmp_path):
    url, shm = _setup(tmp_path, 1)
    path = flip_stored_byte(_folder(url, shm, 1), 9, "rank1.x", at=3, mask=0x10)
    damaged = open(path, "rb").read()
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 1)]
    assert values == [(9, "memory", True), (9, "peer", True)]
    assert not os.path.exists(path) or open(path, "rb").read() != damaged


def _sharing(rank, world, url, shm):
    _as_node(rank)
    try:
        dckpt.CheckpointManager(url, memory_every_steps=2, handle_signals=False,
                                memory_dir=shm)  # one folder for both nodes
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    return None


def test_nodes_that_share_one_memory_folder_are_refused_alike(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.mkdir(shm)
    out = [o.value for o in run_ranks(_sharing, 2, url, shm)]
    assert out[0] == out[1] and out[0][0] == "ArgumentError", out
    assert "nodes [0, 1] share the memory tier's folder" in out[0][1]
    assert not os.listdir(shm)  # nothing left made


def test_a_segment_damaged_on_both_nodes_means_storage(tmp_path):
    url, shm = _setup(tmp_path, 1)
    for node in (0, 1):  # the segment and its replica
        flip_stored_byte(_folder(url, shm, node), 9, "rank1.x", at=7)
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 1)]
    assert values == [(8, "storage", True), (8, "storage", True)]
    for node in (0, 1):  # the unusable memory checkpoint is gone from both nodes
        assert memory.held(url, os.path.join(shm, f"node{node}"))[2] is None


def test_a_damaged_manifest_on_one_node_is_replaced_by_another_nodes(tmp_path):
    url, shm = _setup(tmp_path, 0)
    for node in (0, 1):  # one node's copy, then the other's (the first made whole again)
        path = os.path.join(_folder(url, shm, node), "manifests", f"{9:012d}.json")
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0x20
        open(path, "wb").write(bytes(raw))
        values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 0)]
        assert values == [(9, "memory", True), (9, "memory", True)], node
        assert open(path, "rb").read() != bytes(raw), node  # the node's copy is whole again


def _dies_while_replicating(rank, world, url, shm):
    import signal
    import time

    from dckpt import replicas

    _as_node(rank)
    if rank == 1:  # its node dies while the memory save of step 6 sends its replica
        real = replicas.MemoryWriter._replicate

        def replicate(self, written):
            if self.step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, written)

        replicas.MemoryWriter._replicate = replicate
    failures = []
    mgr = dckpt.CheckpointManager(
        url, memory_every_steps=3, memory_replicas=1, handle_signals=False,
        memory_dir=os.path.join(shm, f"node{rank}"),
        save_config=dckpt.SaveConfig(collective_timeout_s=20),
        on_failure=lambda step, e: failures.append((step, type(e).__name__)))
    t0 = time.monotonic()
    for step in range(7):
        mgr.maybe_save(step, _state(rank, step))
    mgr._poll(wait=True)
    seconds = time.monotonic() - t0
    return failures, mgr.memory.step, seconds


def test_a_node_that_dies_while_replicating_fails_the_save_and_the_last_one_restores(tmp_path):
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    for node in (0, 1):
        os.makedirs(os.path.join(shm, f"node{node}"))
    survivor, victim = run_ranks(_dies_while_replicating, 2, url, shm, timeout_s=120,
                                 allow_failures=True)
    assert victim.killed and survivor.error is None, survivor
    failures, newest, seconds = survivor.value
    assert failures == [(6, "CommitError")] and newest == 3 and seconds < 60
    # the job comes back on the same nodes: step 3, from memory, on both
    values = [o.value for o in run_ranks(_restore_same, 2, url, shm, 1)]
    assert values == [(3, "memory", True), (3, "memory", True)]


def _full_on_one_node(rank, world, url, shm, where):
    """Node 1's memory folder fills up at step 1: its own segments, or its peer's replicas."""
    import errno
    import time

    from dckpt import replicas

    _as_node(rank)
    mgr = dckpt.CheckpointManager(url, save_every_steps=100, memory_every_steps=1,
                                  memory_replicas=1, handle_signals=False,
                                  memory_dir=os.path.join(shm, f"node{rank}"),
                                  save_config=dckpt.SaveConfig(collective_timeout_s=20))
    mgr.maybe_save(0, _state(rank, 0))
    assert mgr.memory.poll(wait=True) == []

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    name, owner = (("recycled_write", replicas) if where == "segments"
                   else ("posix_fallocate", os))
    kept = getattr(owner, name)
    if rank == 1:
        setattr(owner, name, full)
    t0 = time.monotonic()
    try:
        mgr.maybe_save(1, _state(rank, 1))
        failed = mgr.memory.poll(wait=True)
    finally:
        setattr(owner, name, kept)
    seconds = time.monotonic() - t0
    folder = _folder(url, shm, rank)
    stray = [p for p in _segments(folder) if "/s1-" in f"/{p}" or p.endswith(".part")]
    mgr.maybe_save(2, _state(rank, 2))  # the tier goes on
    after = mgr.memory.poll(wait=True)
    mgr._close(remove_memory=False)
    return ([(s, type(e).__name__, str(e).splitlines()[0]) for s, e in failed], seconds, stray,
            after, mgr.memory.step)


@pytest.mark.parametrize("where", ["segments", "replicas"])
def test_a_full_memory_folder_on_one_node_fails_that_save_alone_at_once(tmp_path, where):
    """The failure reaches every rank at once, as the full folder's error (no rank waits
    out the collective timeout for a peer that left the replication), leaves no partial
    segment, and the next memory save commits. A peer's replicas are reserved before they
    are mapped: a full tmpfs fails there, not with a SIGBUS that kills the training."""
    url, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    for node in (0, 1):
        os.makedirs(os.path.join(shm, f"node{node}"))
    values = [o.value for o in run_ranks(_full_on_one_node, 2, url, shm, where)]
    for failed, seconds, stray, after, step in values:
        assert [(s, kind) for s, kind, _ in failed] == [(1, "CommitError")]
        message = failed[0][2]
        assert "failed on rank 1" in message and "No space left" in message, message
        assert seconds < 10 and stray == [] and after == [] and step == 2, (seconds, stray)

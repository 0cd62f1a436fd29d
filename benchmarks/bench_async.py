"""Async save: training pause, time to commit and training slowdown, dckpt against DCP.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_async.py --gib-per-rank 1

Every rank holds ``--gib-per-rank`` GiB of float32 DTensor shards (an FSDP-like state), on
CUDA with ``--device cuda``. Each method saves it ``--saves`` times; between saves the
"training" runs steps (matrix products on the same device) while the write goes on, and
after each save every value of the state changes (so no save can skip unchanged blocks). For
each save: the pause (the call until it returns: the state may change then), the time to
commit (until the save is durable and committed), and the step time while the write runs
against the step time with no save running, measured right before each save (the
slowdown; on the CPU, the steps after the ``--overlap-steps`` that follow the call). Methods:

- ``dckpt``: ``dckpt.async_save`` with its defaults (staging memory reserved once up front,
  as the CheckpointManager does after restoring; the reservation time is reported);
- ``dckpt buffered``: the same with ``SaveConfig(direct_io=False)``: writes through the page
  cache instead of ``O_DIRECT``;
- ``dckpt overlap``: ``SaveConfig(overlap=True)``: the call returns before the copies are
  done. On CUDA its pause is the call (the training's stream waits for the copies, the host
  never); on the CPU the copies run in a staging thread while ``--overlap-steps`` steps run
  (the next forward and backward), then the wait that the optimizer's pre-step hook makes,
  and its pause is that stretch beyond as many bare steps: what the training lost. Every
  other method runs the same steps after its call, and every method reports that stretch
  beyond bare steps (``window_lost_median_s``), the one figure alike for all of them;
- ``raw O_DIRECT write`` (CPU): the hardware limit of the slowdown: the same bytes written
  from page-aligned memory by a niced thread, nothing else (no pause: nothing is copied);
- ``DCP``: ``dcp.async_save`` with its defaults (a fresh CPU copy per save);
- ``DCP DefaultStager``: ``dcp.async_save`` with ``DefaultStager`` (cached, and pinned with
  non-blocking copies on CUDA; on torch 2.11, whose stager stages one save and then fails,
  a new one per save, which on 2.11 caches nothing);
- ``DCP BlockingAsyncStager cached`` (CUDA only): the older stager with a pinned cache;
- ``DCP DefaultStager async staging`` (CPU; not on torch 2.11, where staging in its thread
  crashed): ``DefaultStager(use_async_staging=True)``, measured as ``dckpt overlap``: the
  call, ``--overlap-steps`` steps, the wait for ``staging_completion``, beyond bare steps;
- ``torch-checkpointing`` (when installed): meta-pytorch's ``CheckpointManager`` with its
  async saver (asynchronous staging into shared memory, pinned on CUDA, and a writer
  process), staging prewarmed, ``use_direct_io=False`` (its ``O_DIRECT`` path fails on ext4)
  and a finalize callback that fsyncs (it never fsyncs by itself); each rank saves its
  shards. Its pause ends when its ``lock()``, which the optimizer step takes, is free;
  ``torch-checkpointing overlap`` (CPU) takes that lock after ``--overlap-steps`` steps, as
  ``dckpt overlap``.

The hardware limit is the copy itself: ``memcpy`` of the same bytes into pre-faulted host
memory (CPU), or device-to-pinned-host at the measured bandwidth (CUDA). Ratios go in the
last JSON line; a chart beside --out.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import (BlockingAsyncStager, DefaultStager,
                                                  StagingOptions)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import dckpt
from dckpt.bench.methods import reusable_default_stager
from common import bar_chart, emit, fresh_folders, make_state

class Trainer:
    """A stand-in training step: matrix products on the state's device."""

    def __init__(self, device: str) -> None:
        self.device = device
        n = 384 if device == "cpu" else 4096
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.reps = 8 if device == "cpu" else 20

    def step(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.a = torch.tanh(self.a @ self.b)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def copy_limit(state: dict, device: str, repeats: int = 5) -> tuple[float, float]:
    """Seconds to copy the local state once into pre-faulted (pinned on CUDA) host memory,
    the median of ``repeats``; and the bytes copied."""
    locals_ = [v.to_local() for v in state.values() if isinstance(v, DTensor)]
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=(device == "cuda")) for t in locals_]
    for d in dst:
        d.zero_()  # pre-fault
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(dst, locals_):
            d.copy_(s, non_blocking=(device == "cuda"))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(t.numel() * t.element_size() for t in locals_)


class RawWrite:
    """The hardware limit of the background write: the same bytes from page-aligned memory
    to one file with O_DIRECT and an fsync, in a niced thread; no hashing, no commit."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.buf = mmap.mmap(-1, nbytes, flags=flags)

    def __call__(self, path: str, i: int):
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, f"raw-{dist.get_rank()}-{i}")

        def write() -> None:
            os.nice(10)  # as dckpt's persist thread
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            with memoryview(self.buf) as mv:
                for off in range(0, self.nbytes, 4 << 20):
                    os.write(fd, mv[off: off + (4 << 20)])
            os.fsync(fd)
            os.close(fd)

        thread = threading.Thread(target=write)
        thread.start()
        return (lambda: not thread.is_alive()), thread.join


def torch_checkpointing(cuda: bool):
    """torch-checkpointing's async manager, made durable; None when it is not installed."""
    try:
        import torch_checkpointing as tc
        from torch_checkpointing.config import AsyncCheckpointSaverConfig
        from torch_checkpointing.staging import CheckpointStagerConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig
    except ImportError:
        return None
    from dckpt.bench.methods import fsync_files

    staging = CheckpointStagerConfig(use_pinned_memory=cuda, use_shared_memory=True,
                                     use_async_staging=True, use_non_blocking_copy=cuda)
    return tc.CheckpointManager(tc.CheckpointManager.Config(
        save=AsyncCheckpointSaverConfig(staging_config=staging), finalize_callback=fsync_files,
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib-per-rank", type=float, default=1.0)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dir", default="bench-out/async")
    p.add_argument("--out", default="bench-out/async.jsonl")
    p.add_argument("--writer-threads", type=int, default=dckpt.SaveConfig().writer_threads)
    p.add_argument("--methods", default="", help="comma-separated subset of the methods")
    p.add_argument("--nice", default="10",
                   help="comma-separated SaveConfig.persist_nice values to run dckpt with")
    p.add_argument("--overlap-steps", type=int, default=10,
                   help="(CPU) steps between an overlapped save's call and the wait for its "
                        "copies: the forward and backward its copies run under")
    args = p.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    mesh = init_device_mesh(args.device, (world,))
    state = make_state(args.gib_per_rank, mesh, device=args.device)
    state["step"] = 0
    base = fresh_folders(args.dir, args.out)
    trainer = Trainer(args.device)
    for _ in range(3):
        trainer.step()
    idle = statistics.median(trainer.step() for _ in range(15))
    copy_s, nbytes = copy_limit(state, args.device)
    if rank == 0:
        emit(args.out, {"bench": "async", "limit": "copy", "device": args.device,
                        "bytes_per_rank": nbytes, "copy_s": copy_s,
                        "gbps": nbytes / copy_s / 1e9, "idle_step_s": idle})

    savers: dict[str, dckpt.AsyncSaver] = {}  # one per dckpt method: its own persist thread
    stager_opts = StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                 use_async_staging=False, use_non_blocking_copy=cuda)
    stagers = {"default": DefaultStager(stager_opts),
               "blocking": BlockingAsyncStager(cache_staged_state_dict=True)}

    def forward_backward() -> None:
        """(CPU) The steps an overlapped save's copies run under, before the optimizer's
        step waits for them; on CUDA the host waits for nothing."""
        if not cuda:
            for _ in range(args.overlap_steps):
                trainer.step()

    def run_dckpt(path: str, i: int, overlap: bool = False, nice: int = 10, direct: bool = True):
        config = dckpt.SaveConfig(overlap=overlap, persist_nice=nice, direct_io=direct,
                                  writer_threads=args.writer_threads)
        handle = savers[path].async_save(state, path, step=i, config=config)
        if overlap:
            forward_backward()
            handle.wait_staged()  # where the optimizer hook waits; on CUDA the host goes on
        return handle.done, handle.wait

    def run_dcp(path: str, i: int, stager: str | None = None):
        if stager == "default" and not reusable_default_stager():  # torch 2.11: one a save
            stagers["default"].close()
            stagers["default"] = DefaultStager(stager_opts)
        out = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(f"{path}/{i}"),
                             async_stager=stagers[stager] if stager else None)
        if stager == "threaded":
            forward_backward()
            out.staging_completion.result()
        future = getattr(out, "upload_completion", out)
        return future.done, future.result

    tc = (torch_checkpointing(cuda) if not args.methods
          or any(m.startswith("torch-checkpointing") for m in args.methods.split(","))
          else None)

    def run_tc(path: str, i: int, overlap: bool = False):
        payload = {"model": {k: v.to_local() for k, v in state.items()
                             if isinstance(v, DTensor)}}
        if i == 1:
            tc.prewarm_staging(payload)  # as dckpt's reserve: before the first save
        future = tc.save(f"{path}/{i}", payload)
        if overlap:
            forward_backward()
        with tc.lock():  # where the optimizer step waits for the capture
            pass
        return future.done, future.result

    nices = [int(n) for n in args.nice.split(",")]
    methods = {("dckpt" if len(nices) == 1 else f"dckpt nice {n}"):
               (lambda path, i, n=n: run_dckpt(path, i, nice=n)) for n in nices}
    methods["dckpt buffered"] = lambda path, i: run_dckpt(path, i, nice=nices[0], direct=False)
    if not cuda:
        methods["raw O_DIRECT write"] = RawWrite(nbytes // 4096 * 4096)
    methods |= {"DCP": run_dcp,
                "DCP DefaultStager": lambda path, i: run_dcp(path, i, "default")}
    if tc is not None:
        methods["torch-checkpointing"] = run_tc
    if cuda:  # pins its cache: CUDA only
        methods["DCP BlockingAsyncStager cached"] = lambda path, i: run_dcp(path, i, "blocking")
    methods["dckpt overlap"] = lambda path, i: run_dckpt(path, i, overlap=True, nice=nices[0])
    # the copies under the next steps; each pause is then the save's steps beyond bare ones
    overlapped = set() if cuda else {"dckpt overlap"}
    if not cuda and reusable_default_stager():
        stagers["threaded"] = DefaultStager(StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
            use_non_blocking_copy=False))
        methods["DCP DefaultStager async staging"] = lambda path, i: run_dcp(path, i, "threaded")
        overlapped.add("DCP DefaultStager async staging")
    if tc is not None and not cuda:
        methods["torch-checkpointing overlap"] = lambda path, i: run_tc(path, i, overlap=True)
        overlapped.add("torch-checkpointing overlap")
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods.split(",")}
    def measure(name: str, run, path: str, reserve_s: float) -> dict:
        """``--saves`` saves with ``run``, training steps while each one is written."""
        pauses, commits, slow, lost, windows = [], [], [], [], []
        for i in range(1, args.saves + 1):
            # the step time with no save running, right before this save: the machine is
            # shared, so a baseline from the start of the run drifts
            before = statistics.median(trainer.step() for _ in range(7))
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            done, wait = run(path, i)  # an overlapped one ran the steps and waited
            pause = time.perf_counter() - t0
            if name not in overlapped:
                forward_backward()  # the same steps after a call that staged everything
            # what the save's call, its next forward and backward and the optimizer's wait
            # took beyond bare steps: the one figure alike for every method
            window = max(0.0, time.perf_counter() - t0
                         - (0 if cuda else args.overlap_steps) * before)
            windows.append(window)
            if name in overlapped:  # the steps it ran count as training
                pause = window
            steps = []
            while not done():
                steps.append(trainer.step())
            wait()
            commits.append(time.perf_counter() - t0)
            pauses.append(pause)
            if steps:
                slow.append(statistics.median(steps) / before)
                lost.append(sum(steps) - len(steps) * before)
            state["step"] = i
            with torch.no_grad():  # every value changes, as in dense training (no dedup)
                for v in state.values():
                    if isinstance(v, DTensor):
                        v.to_local().add_(1.0)
        result = {
            "pause_median_s": statistics.median(pauses), "pause_max_s": max(pauses),
            "commit_median_s": statistics.median(commits),
            "step_slowdown": statistics.median(slow) if slow else None,
            # training time lost to the background write: its steps' time beyond the baseline
            "steps_lost_s": statistics.median(lost) if lost else None,
            "pause_vs_copy": statistics.median(pauses) / copy_s,
            "window_lost_median_s": statistics.median(windows),
            "max_vs_median_pause": max(pauses) / statistics.median(pauses),
        }
        if rank == 0:
            emit(args.out, {"bench": "async", "method": name, "device": args.device,
                            "world_size": world, "bytes_per_rank": nbytes,
                            "reserve_s": reserve_s, "pauses_s": pauses, "commits_s": commits,
                            **result})
        return result

    summary = {}
    for name, run in methods.items():
        path = os.path.join(base, name.replace(" ", "_"))
        reserve_s = 0.0
        if name.startswith("dckpt"):  # allocate staging up front, as the manager does
            savers[path] = dckpt.AsyncSaver()
            reserve_s = savers[path].reserve(state)
        try:
            summary[name] = measure(name, run, path, reserve_s)
        except Exception as e:  # noqa: BLE001 - a peer that fails on this torch is reported
            summary[name] = {"error": f"{type(e).__name__}: {e}"}
            if rank == 0:
                emit(args.out, {"bench": "async", "method": name, **summary[name]})
        dist.barrier()
        if path in savers:
            savers.pop(path).close()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        os.sync()  # let the file system settle before the next method
        time.sleep(2)
        dist.barrier()
    for stager in stagers.values():
        stager.close()
    if tc is not None:
        tc.close()
    if rank == 0:
        raw = summary.get("raw O_DIRECT write", {}).get("step_slowdown")
        if raw:
            for m in summary.values():
                if m.get("step_slowdown"):
                    m["slowdown_vs_raw_write"] = m["step_slowdown"] / raw
        emit(args.out, {"bench": "async", "device": args.device, "copy_s": copy_s,
                        "summary": summary})
        ok = [m for m in summary if "error" not in summary[m] and not m.startswith("raw")]
        labels = [f"{m} pause" for m in ok] + ["copy limit"]
        values = [summary[m]["pause_median_s"] for m in ok] + [copy_s]
        bar_chart(args.out.replace(".jsonl", ".png"),
                  f"async save pause, {world} ranks x {args.gib_per_rank} GiB ({args.device})",
                  labels, values, "seconds (median)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

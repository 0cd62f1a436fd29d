"""A training process SIGKILLed at random moments, over and over, while it saves every step
(async, to storage and to the memory tier), applies retention and runs gc: after every kill
each committed checkpoint verifies and loads bit-equal to the values of its step, the restart
restores the newest one, and a clean end leaves no memory behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import dckpt

CHILD = r'''
import sys, torch, dckpt
url, memory_dir, end = sys.argv[1], sys.argv[2], int(sys.argv[3])

def state(step):
    g = torch.Generator().manual_seed(step)
    return {"big": torch.arange(200_000, dtype=torch.float32) + step % 3,  # blocks shared
            "small": torch.rand(1000, generator=g), "meta": {"step": step, "name": f"s{step}"}}

memory = dict(memory_every_steps=1, memory_dir=memory_dir) if memory_dir != "-" else {}
mgr = dckpt.CheckpointManager(url, save_every_steps=3 if memory else 1,
                              retention=dckpt.KeepLast(2), **memory)
got = state(0)
info = mgr.restore(got)
if info is not None:
    want = state(info.step)
    assert all(torch.equal(got[k], want[k]) for k in ("big", "small")), "wrong values"
    assert got["meta"] == want["meta"], "wrong values"
print("restored", info.step if info else None, info.tier if info else None, flush=True)
step = info.step + 1 if info else 0
while step < end:
    mgr.maybe_save(step, state(step))
    if step % 5 == 4:  # once something committed
        dckpt.gc(url, deleted_min_age_s=0)  # beside the manager's own, expiring its records
    step += 1
mgr.close()
print("ended", step, flush=True)
'''


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"big": torch.arange(200_000, dtype=torch.float32) + step % 3,
            "small": torch.rand(1000, generator=g), "meta": {"step": step, "name": f"s{step}"}}


def _start(script: str, url: str, memory_dir: str, end: int) -> tuple[subprocess.Popen, list]:
    proc = subprocess.Popen([sys.executable, script, url, memory_dir, str(end)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    return proc, lines


def _wait_for(lines: list, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if line.startswith(prefix):
                return line
        if proc.poll() is not None and not any(line.startswith(prefix) for line in lines):
            time.sleep(0.2)  # the reader may still be draining
            if not any(line.startswith(prefix) for line in lines):
                pytest.fail(f"the child ended ({proc.returncode}) without {prefix!r}: "
                            f"{proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {prefix!r} from the child in {timeout} s")


def _check_every_committed(url: str) -> list[int]:
    infos = dckpt.list_checkpoints(url)
    assert [i.problem for i in infos] == [None] * len(infos)
    report = dckpt.verify(url, all_steps=True)
    assert report.ok, report.problems
    for info in infos:
        want = _state(info.step)
        got = _state(0)
        dckpt.load(got, url, step=info.step)
        assert torch.equal(got["big"], want["big"]) and torch.equal(got["small"], want["small"])
        assert got["meta"] == want["meta"]
    return [i.step for i in infos]


@pytest.mark.parametrize("tier", ["storage", "memory"])
def test_random_sigkills_never_tear_a_checkpoint(tmp_path, tier):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    url = str(tmp_path / "repo")
    memory_dir = "-"
    if tier == "memory":
        os.mkdir(tmp_path / "memory")
        memory_dir = str(tmp_path / "memory")
    rng = random.Random(f"kills-{tier}")
    newest = None
    tiers = []
    for _ in range(5):
        proc, lines = _start(str(script), url, memory_dir, end=10**9)
        restored = _wait_for(lines, "restored", proc).split()
        if tier == "storage":  # the newest committed
            assert restored[1] == str(newest), (restored, newest)
        elif newest is not None:  # or newer, from memory
            assert restored[1] != "None" and int(restored[1]) >= newest, restored
            tiers.append(restored[2])
        time.sleep(rng.uniform(0.1, 1.5))  # into the saves, at a moment of chance
        assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        steps = _check_every_committed(url)
        newest = steps[-1] if steps else newest
    proc, lines = _start(str(script), url, memory_dir, end=(newest or 0) + 8)
    _wait_for(lines, "ended", proc)
    assert proc.wait(60) == 0
    _check_every_committed(url)
    if tier == "memory":
        assert "memory" in tiers  # a killed process's memory outlived it
        assert [n for _, _, fs in os.walk(memory_dir) for n in fs] == []  # a clean end

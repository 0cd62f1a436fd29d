"""What the framework scripts and their tests share: a clean end for a torchrun worker, and
torchrun over a script of this folder."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def leave() -> None:
    """End the process without gloo's C++ teardown, which can abort a finished rank at exit
    ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(script: str, *args: str, check: bool = True, ranks: int = 2) -> str:
    """Run ``script`` of this folder on ``ranks`` ranks; its output (stdout, then stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           os.path.join(HERE, script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout + proc.stderr

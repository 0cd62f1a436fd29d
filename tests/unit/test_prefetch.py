"""`python -m dckpt.prefetch`: which checkpoint, which byte ranges, and no torch import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dckpt
from dckpt.manifest import TensorEntry
from dckpt.prefetch import plan, prefetch


def _ranges_of(url: str, step: int) -> dict[str, list[tuple[int, int]]]:
    """Every block of the manifest, merged where adjacent: what prefetch should ask for."""
    m = dckpt.inspect(url, step=step)
    pieces: dict[str, list[tuple[int, int]]] = {}
    for e in m.items.values():
        datas = [c.data for c in e.chunks] if isinstance(e, TensorEntry) else [e.data]
        for d in datas:
            for b in d.blocks:
                pieces.setdefault(b.segment, []).append((b.offset, b.length))
    out = {}
    for seg, ps in pieces.items():
        ps.sort()
        merged = [list(ps[0])]
        for o, n in ps[1:]:
            if o <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], o + n - merged[-1][0])
            else:
                merged.append([o, n])
        out[seg] = [tuple(x) for x in merged]
    return out


def _repo(tmp_path) -> str:
    """Three steps; step 3 keeps most of step 2's blocks (dedup), so it spans two saves."""
    url = str(tmp_path / "repo")
    w = torch.randn(256, 1024)
    for step in (1, 2, 3):
        if step == 3:
            w[:16] += 1  # the first 64 KiB change
        dckpt.save({"w": w, "step": step, "b": torch.arange(step * 10)}, url, step=step)
    return url


def test_the_newest_checkpoint_and_every_byte_range_it_references(tmp_path):
    url = _repo(tmp_path)
    p = plan(url)
    assert p.step == 3
    assert p.ranges == _ranges_of(url, 3)
    assert len({seg.split("/")[1] for seg in p.ranges}) == 2  # objects of saves 1 and 3
    got = prefetch(url)
    assert got.nbytes == sum(n for rs in p.ranges.values() for _, n in rs) > 1 << 20
    assert got.skipped_bytes == 0
    capped = prefetch(url, max_bytes=1 << 16)
    assert capped.nbytes <= 1 << 16 and capped.skipped_bytes == got.nbytes - capped.nbytes


def test_skips_what_load_skips_and_never_fails(tmp_path):
    url = _repo(tmp_path)
    dckpt.verify(url, all_steps=True, quarantine=True)  # all clean: nothing marked
    assert plan(url).step == 3
    os.makedirs(os.path.join(url, "quarantine"), exist_ok=True)
    with open(os.path.join(url, "quarantine", "000000000003.json"), "w") as f:
        f.write('{"reason": "test"}')
    assert plan(url).step == 2  # quarantined: not tried first by load either
    with open(os.path.join(url, "manifests", "000000000002.json"), "wb") as f:
        f.write(b'{"truncated')
    p = plan(url)
    assert p.step == 1 and p.ranges == _ranges_of(url, 1)
    assert plan(url, step=3).step == 3  # an explicit step is taken as asked
    assert plan(str(tmp_path / "none")).step is None
    assert "not on a local disk" in plan("s3://bucket/run").note
    empty = str(tmp_path / "empty")
    dckpt.save({"x": 1}, empty, step=1)
    os.remove(os.path.join(empty, "manifests", "000000000001.json"))
    assert "no committed checkpoint" in plan(empty).note


def test_ranks_pick_the_objects_those_ranks_wrote(tmp_path):
    from dckpt_testing import run_ranks

    url = str(tmp_path / "repo")
    run_ranks(_save_two_ranks, 2, url)
    both = plan(url)
    assert {seg.rsplit("/", 1)[1][:6] for seg in both.ranges} == {"r00000", "r00001"}
    only1 = plan(url, ranks={1})
    assert set(only1.ranges) == {s for s in both.ranges if "/r00001-" in s}


def _save_two_ranks(rank, world, url):
    dckpt.save({f"w{rank}": torch.full((1000,), float(rank))}, url, step=1)


def test_the_command_runs_without_importing_torch(tmp_path):
    url = _repo(tmp_path)
    out = subprocess.run([sys.executable, "-u", "-X", "importtime", "-m", "dckpt.prefetch", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in out.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "dckpt" in imported and "dckpt.layout" in imported  # the module itself runs as __main__
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "fsspec")]
    assert "dckpt prefetch: step 3:" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "dckpt.prefetch", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 0 and "nothing to prefetch" in missing.stderr


@pytest.mark.parametrize("args, says", [
    (["--step", "-1"], "--step: -1 is less than 0"),  # read as manifest -00000000001.json
    (["--threads", "0"], "--threads: 0 is less than 1"),  # taken
    (["--max-bytes", "-1"], "--max-bytes: -1 is less than 0"),  # taken
    (["--ranks", "5-2"], "a range is low-high"),  # taken: nothing read, without a word
    (["--ranks", "0,x"], "'x' is not a rank"),
])
def test_bad_arguments_exit_2_saying_which(tmp_path, capsys, args, says):
    from dckpt.prefetch import main

    with pytest.raises(SystemExit) as e:
        main([_repo(tmp_path), *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_huge_rank_range_is_not_listed(tmp_path, capsys):
    """``--ranks 0-99999999999`` listed every rank: minutes and the machine's memory."""
    from dckpt.prefetch import main

    url = _repo(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dckpt.prefetch", url, "--ranks", "0-99999999999"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "dckpt prefetch: step 3:" in out.stderr, out.stderr
    assert main([url, "--ranks", "1-7,9"]) == 0
    assert "of 0 objects" in capsys.readouterr().err  # rank 0 wrote them all


def test_the_package_imports_its_names_on_first_use():
    """``import dckpt`` imports no torch (prefetch needs that); a public name imports its
    module when touched, and every name in __all__ resolves."""
    code = ("import sys, dckpt; assert 'torch' not in sys.modules, 'eager'; "
            "dckpt.save; assert 'torch' in sys.modules; "
            "import dckpt.verify, dckpt.status; "  # the functions, not the modules they share names with
            "assert type(dckpt.verify).__name__ == type(dckpt.status).__name__ == 'function'; "
            "missing = [n for n in dckpt.__all__ if getattr(dckpt, n, None) is None]; "
            "assert not missing, missing; print(len(dckpt.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(set(dckpt.__all__)) >= 50
    assert sorted(dckpt.__all__) == sorted(dckpt._MODULE_OF)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        __import__("dckpt").nope  # noqa: B018

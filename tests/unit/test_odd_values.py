"""Every public function and constructor, each argument in turn given an odd value (wrong
types, empty, NUL, infinite, huge, negative, a path object, a callable, a config of the
other kind): the call either works or raises a DckptError, never another exception, and
returns in bounded time. Checked cases found: a Path's CheckpointInfo.url, a falsy config
taken as the default, an infinite collective timeout, Metrics records raising
prometheus_client's TypeError, a Pipeline state that was a tensor."""

from __future__ import annotations

import io
import pathlib
import signal

import numpy as np
import torch

import dckpt


def _odd(tmp_path: pathlib.Path) -> dict[str, object]:
    return {"None": None, "True": True, "0": 0, "-1": -1, "2**70": 2**70, "1.5": 1.5,
            "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-0.0": -0.0,
            "''": "", "'x'": "x", "'min'": "min", "NUL": "a\0b", "b'x'": b"x", "[]": [],
            "[1]": [1], "{}": {}, "{'a': 1}": {"a": 1}, "{1: 2}": {1: 2}, "()": (),
            "object": object(), "tensor": torch.ones(1), "np.int64": np.int64(3),
            "np.float32": np.float32(1.0), "Path": tmp_path / "elsewhere" / "x",
            "lambda": lambda *a: 1, "SaveConfig": dckpt.SaveConfig(),
            "LoadConfig": dckpt.LoadConfig()}


def _state() -> dict:
    return {"w": torch.arange(8.0), "n": 3}


def _calls(repo: str, tmp_path: pathlib.Path, mgr: dckpt.CheckpointManager) -> dict:
    """name -> (call, valid keyword arguments)."""
    return {
        "save": (dckpt.save, dict(state_dict=_state(), url=repo, step=10)),
        "async_save": (lambda **k: dckpt.async_save(**k).wait(timeout=30),
                       dict(state_dict=_state(), url=repo, step=11)),
        "load": (dckpt.load, dict(state_dict=_state(), url=repo, step=None, partial=False)),
        "list_checkpoints": (dckpt.list_checkpoints, dict(url=repo)),
        "verify": (dckpt.verify, dict(url=repo, step=None, all_steps=False, quarantine=False,
                                      progress=None)),
        "inspect": (dckpt.inspect, dict(url=repo, step=None)),
        "gc": (dckpt.gc, dict(url=repo, dry_run=True, min_age_s=3600.0,
                              deleted_min_age_s=None, progress=None)),
        "export": (dckpt.export, dict(url=repo, to=str(tmp_path / "out.pt"), step=None,
                                      format="torch", progress=None)),
        "status": (dckpt.status, dict(url=repo, memory_dir=None)),
        "health": (dckpt.health, dict(url=repo, max_age_s=None, min_free_bytes=None,
                                      verify=False, sample_bytes=1024)),
        "diff": (dckpt.diff, dict(url=repo, step_a=1, step_b=2)),
        "KeepLast": (dckpt.KeepLast, dict(n=2)),
        "KeepBest": (dckpt.KeepBest, dict(n=2, metric="loss", mode="min")),
        "KeepEvery": (dckpt.KeepEvery, dict(steps=2)),
        "EverySteps": (dckpt.EverySteps, dict(steps=2)),
        "EverySeconds": (dckpt.EverySeconds, dict(seconds=2.0)),
        "OnImprove": (dckpt.OnImprove, dict(metric="loss", mode="min")),
        "Pipeline": (dckpt.Pipeline, dict(stages=["a", "b"])),
        "Reader": (dckpt.Reader, dict(url=repo, step=None, config=None)),
        "Writer": (dckpt.Writer, dict(url=repo, step=5, metrics=None, config=None)),
        "Metrics": (dckpt.Metrics, dict(job="j", textfile=None, all_ranks=False)),
        "configure_logging": (dckpt.configure_logging, dict(json_lines=True, level=20,
                                                            stream=io.StringIO(), run=None)),
        "SaveConfig": (dckpt.SaveConfig, dict(block_size_bytes=1 << 18, writer_threads=4,
                                              collective_timeout_s=300.0, staging_bytes=None,
                                              if_busy="wait", persist_nice=10,
                                              compression="auto", direct_io=True)),
        "LoadConfig": (dckpt.LoadConfig, dict(reader_threads=8, read_request_bytes=None,
                                              read_buffer_bytes=1 << 30,
                                              collective_timeout_s=300.0, replicated="auto")),
        "CheckpointManager": (
            lambda **k: dckpt.CheckpointManager(**k).close(),
            dict(url=repo, save_every_steps=None, save_every_seconds=None,
                 save_at_epoch_end=False, save_on_improve=None, retention=None, gc=True,
                 handle_signals=False, save_config=None, load_config=None,
                 memory_every_steps=None, memory_replicas=0, on_save=None, metrics=None)),
        "mgr.restore": (mgr.restore, dict(state_dict=_state(), step=None, best_metric=None,
                                          partial=False)),
        "mgr.maybe_save": (mgr.maybe_save, dict(step=20, state_dict=_state(), metrics=None,
                                                epoch_end=False)),
        "mgr.save": (mgr.save, dict(step=21, state_dict=_state(), metrics=None)),
        "mgr.best": (mgr.best, dict(metric="loss", mode="min")),
        "mgr.apply_retention": (mgr.apply_retention, dict(dry_run=True)),
        "Metrics.observe_pause": (dckpt.Metrics().observe_pause, dict(seconds=1.0)),
        "Metrics.observe_memory": (dckpt.Metrics().observe_memory, dict(held_bytes=1)),
        "Metrics.write_textfile": (dckpt.Metrics().write_textfile,
                                   dict(path=str(tmp_path / "m.prom"))),
        "Pipeline.load_state_dict": (dckpt.Pipeline(["a"]).load_state_dict,
                                     dict(state_dict={})),
        "Stager.stage": (dckpt.Stager().stage, dict(state_dict=_state())),
    }


class _Hung(Exception):
    pass


def _hung(*_: object) -> None:
    raise _Hung


def test_odd_values_for_every_argument_work_or_raise_a_dckpt_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative URLs ('x', 'min') land here
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DCKPT_MEMORY_DIR", str(tmp_path))
    repo = str(tmp_path / "repo")
    dckpt.save(_state(), repo, step=1)
    dckpt.save({"w": torch.arange(8.0) + 1, "n": 4}, repo, step=2, metrics={"loss": 0.5})
    mgr = dckpt.CheckpointManager(repo, save_every_steps=1, handle_signals=False)
    odd = _odd(tmp_path)
    wrong: list[str] = []
    step = 100
    previous = signal.signal(signal.SIGALRM, _hung)
    try:
        for name, (call, valid) in _calls(repo, tmp_path, mgr).items():
            for param in valid:
                for label, value in odd.items():
                    kwargs = {**valid, param: value}
                    if param != "step" and "step" in kwargs and "save" in name:
                        step += 1  # a new step each time: only the odd value can refuse
                        kwargs["step"] = step
                    signal.alarm(60)
                    try:
                        call(**kwargs)
                    except dckpt.DckptError:
                        pass
                    except _Hung:
                        wrong.append(f"{name}({param}={label}): no answer in 60 s")
                    except Exception as e:
                        wrong.append(f"{name}({param}={label}): {type(e).__name__}: "
                                     f"{str(e)[:120]}")
                    finally:
                        signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        mgr.close()
    assert wrong == [], "\n".join(wrong)

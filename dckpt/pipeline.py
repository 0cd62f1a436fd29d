"""Pipeline: the progress of a run made of stages (several models or phases trained in turn),
saved with every checkpoint so that a restart skips the stages already finished.

    pipe = dckpt.Pipeline(["pretrain", "finetune", "eval"])
    mgr.restore({"pipeline": pipe}, partial=True)     # where the run stood, if anywhere
    for stage in pipe:                                 # the stages not finished, in order
        state = {"pipeline": pipe, "app": dckpt.TrainState(*build(stage))}
        if pipe.resuming:                              # this stage was cut short: resume it
            mgr.restore(state)
        for step in range(pipe.step + 1, steps[stage]):
            ...; pipe.step = step
            mgr.maybe_save(global_step, state)
        pipe.finish(stage, loss=...)                   # results kept with the progress

The progress is one JSON value in the checkpoint (key ``...dckpt_pipeline``); ``dckpt status``
shows it. A Stateful: DCP saves and loads it like the rest of the state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from dckpt.arguments import public
from dckpt.errors import ArgumentError, StateDictError
from dckpt.layout import PROGRESS_KEY

__all__ = ["Pipeline", "PROGRESS_KEY"]


class Pipeline(Stateful):
    """Stages done, the current stage and its step, and per-stage results."""

    @public
    def __init__(self, stages: Sequence[str]) -> None:
        if not isinstance(stages, list | tuple):  # a string is a sequence of one-letter stages
            raise ArgumentError(f"Pipeline stages must be a list of stage names, got "
                                f"{type(stages).__name__} {stages!r}")
        stages = list(stages)
        if not stages or not all(isinstance(s, str) and s for s in stages):
            raise ArgumentError(f"Pipeline stages must be non-empty names, got {stages!r}")
        if len(set(stages)) != len(stages):
            raise ArgumentError(f"Pipeline stage names must be unique, got {stages!r}")
        self.stages = stages
        self.done: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.step = -1
        """The last step finished in the current stage (-1: none yet); set it each step."""
        self.resuming = False
        """True while iterating a stage that a checkpoint had started: restore its state."""

    def __iter__(self) -> Iterator[str]:
        for stage in self.stages:
            if stage in self.done:
                continue
            self.resuming = self.current == stage and self.step >= 0
            if not self.resuming:
                self.current, self.step = stage, -1
            yield stage
            if stage not in self.done:
                self.finish(stage)
            self.resuming = False

    @public
    def finish(self, stage: str, **results: Any) -> None:
        """Mark ``stage`` done, with its results (JSON values, the same on every rank: the
        progress is saved once, and a save names a value that differs between ranks)."""
        if stage not in self.stages:
            raise ArgumentError(f"unknown stage {stage!r}; the stages are {self.stages}")
        try:  # refuse what could not be saved, now rather than at the save
            json.dumps(results)
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"the results of stage {stage!r} must be JSON values (numbers, "
                                f"strings, lists, dicts): {e}") from None
        if stage not in self.done:
            self.done.append(stage)
        self.results[stage] = dict(results)
        self.current, self.step = None, -1

    def progress(self) -> dict[str, Any]:
        return {"stages": self.stages, "done": self.done, "current": self.current,
                "step": self.step, "results": self.results}

    def state_dict(self) -> dict[str, Any]:
        return {PROGRESS_KEY: json.dumps(self.progress())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            if not isinstance(state_dict, Mapping):
                raise TypeError(f"a {type(state_dict).__name__}, not a dict")
            p = json.loads(state_dict[PROGRESS_KEY])
            p = {"done": list(p["done"]), "results": dict(p["results"]),
                 "current": p["current"], "step": p["step"]}
            if (not all(isinstance(s, str) for s in p["done"])
                    or not all(isinstance(r, dict) for r in p["results"].values())
                    or not isinstance(p["current"], str | None)
                    or type(p["step"]) is not int or p["step"] < -1):
                raise ValueError(f"fields of the wrong type or value: {p}")
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"the checkpoint's pipeline progress is not one a Pipeline "
                                 f"saved ({type(e).__name__}: {str(e)[:300]})") from None
        unknown = [s for s in p["done"] if s not in self.stages]
        if unknown:
            raise ArgumentError(f"the checkpoint's pipeline finished stages {unknown} that this "
                             f"pipeline ({self.stages}) does not have")
        self.done = list(p["done"])
        self.results = dict(p["results"])
        self.current, self.step = p["current"], p["step"]

    def __repr__(self) -> str:
        return (f"Pipeline(done={self.done}, current={self.current!r}, step={self.step}, "
                f"pending={[s for s in self.stages if s not in self.done]})")

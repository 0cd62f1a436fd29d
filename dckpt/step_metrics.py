"""A save's metrics (``metrics={"loss": ...}``): checked, and made the plain values a
manifest holds."""

from __future__ import annotations

import numpy as np
import torch

from dckpt.errors import ArgumentError
from dckpt.manifest import metric_ok

__all__ = ["Metrics", "plain_metric", "check_metrics"]

Metrics = dict[str, float | int | str | bool | None]


def plain_metric(value: object) -> object:
    """A metric as the format holds it: a one-element tensor (``loss``, not ``loss.item()``)
    or a numpy number as the Python number it holds; anything else as it is. A device
    tensor's value is copied to the host here: call it only where the value is used."""
    return value.item() if _number_like(value) else value  # type: ignore[attr-defined]


def _number_like(value: object) -> bool:
    return ((isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex())
            or (isinstance(value, np.generic) and value.dtype.kind in "biuf"))


def check_metrics(metrics: object, *, convert: bool = True) -> Metrics:
    """``metrics`` checked, and with ``convert``, their values made plain (``plain_metric``);
    without, checked only, a one-element tensor's value left where it is (on its device)."""
    if metrics is None:
        return {}
    if isinstance(metrics, dict):
        values = {k: plain_metric(v) for k, v in metrics.items()} if convert else metrics
        if all(isinstance(k, str) and (metric_ok(v, stored=False)
                                       or (not convert and _number_like(v)))
               for k, v in values.items()):
            return dict(values)  # type: ignore[arg-type]  # checked above
    raise ArgumentError(
        "metrics must map str to int (64-bit), float, str, bool or None (or a "
        f"one-element tensor, a numpy number), got {str(metrics)[:200]}")

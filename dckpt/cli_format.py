"""How the dckpt command prints (sizes, times, ages, metrics, JSON, a progress line) and
which paths it takes."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time

__all__ = ["Progress", "age", "metrics_text", "path_argument", "print_json", "size", "when"]


def path_argument(text: str) -> str:
    """argparse's type for a URL or path: one without control characters (a carriage return
    from a file of CRLF lines, a newline from a pasted list), which name nothing the user
    meant and would break the one-line error that names them."""
    bad = sorted({c for c in text if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds control characters ({', '.join(repr(c) for c in bad)}): "
            "remove them")
    return text


def when(ts: float) -> str:
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return f"unix time {ts!r}"


def json_safe(value: object) -> object:
    """``value`` with every non-finite float as a string: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a named tuple: a BlockRef
        return json_safe(value._asdict())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_json(value: object) -> None:
    print(json.dumps(json_safe(value), indent=2, allow_nan=False, default=str))


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """A progress line on stderr for long work, at most a few updates a second."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self._last = label, enabled, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.25 and done < total):
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        sys.stderr.write(f"\r{self.label}: {size(done)} / {size(total)} ({pct:.0f}%)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def metrics_text(metrics: dict) -> str:
    """``name=value`` pairs; floats to 6 significant digits (--json has them whole)."""
    return " ".join(f"{k}={float(f'{v:.6g}')}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items())


def age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"

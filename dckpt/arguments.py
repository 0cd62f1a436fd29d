"""The public functions' arguments, checked before anything is read or written, and the rule
that only DckptError subclasses leave those functions (``public``)."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, overload

from dckpt.errors import ArgumentError, DckptError, StateDictError, StorageError
from dckpt.layout import MAX_STEP, same_url

__all__ = ["check_step", "check_bool", "check_config", "check_state_dict", "check_seconds",
           "check_bytes", "check_options", "check_url", "public", "storage_error"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@overload
def check_step(step: object, name: str = ..., *, optional: Literal[False] = ...) -> int: ...


@overload
def check_step(step: object, name: str = ..., *, optional: bool) -> int | None: ...


def check_step(step: object, name: str = "step", *, optional: bool = False) -> int | None:
    """``step`` as a Python int (a numpy integer is taken as its value), or None where
    ``optional``; ArgumentError for anything else (bools, floats, tensors, out of range)."""
    if step is None and optional:
        return None
    if type(step) not in (int, bool) and isinstance(step, numbers.Integral):
        step = int(step)  # numpy's integers: the manifests hold plain ints
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ArgumentError(f"{name} must be an int in [0, {MAX_STEP}]"
                            f"{' or None' if optional else ''}, got {_show(step)}")
    return step


def check_bool(value: object, name: str) -> bool:
    if type(value) is not bool:
        raise ArgumentError(f"{name} must be True or False, got {_show(value)}")
    return value


def check_config(config: object, kind: type[T], name: str = "config") -> T | None:
    if config is not None and not isinstance(config, kind):
        raise ArgumentError(f"{name} must be a {kind.__name__} or None, got {_show(config)}")
    return config


def check_state_dict(state_dict: object) -> None:
    if not isinstance(state_dict, Mapping):
        raise ArgumentError(f"state_dict must be a dict of str keys, got {_show(state_dict)}; "
                            "wrap it, for example {'model': model.state_dict()}")
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise ArgumentError(f"state_dict keys must be str, found {_show(bad[0])}")


def check_seconds(value: object, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type, operator]
        raise ArgumentError(f"{name} must be a finite number of seconds >= 0, got {_show(value)}")
    return float(value)  # type: ignore[arg-type]


def check_bytes(value: object, name: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if type(value) is not int or value < 0:
        raise ArgumentError(f"{name} must be an int number of bytes >= 0"
                            f"{' or None' if optional else ''}, got {_show(value)}")
    return value


def check_options(options: object, name: str = "storage_options") -> dict | None:
    if options is None:
        return None
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ArgumentError(f"{name} must be a dict of fsspec options (str keys) or None, "
                            f"got {_show(options)}")
    return dict(options)


def check_path(value: object, name: str, kind: str = "a URL or path") -> str:
    """``value``, a ``str`` or an ``os.PathLike``, as a str; ``name`` says what it is."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise ArgumentError(f"{name} must be {kind}, got {_show(value)}")
    if "\0" in text:
        raise ArgumentError(f"{name} holds a NUL character: {text!r}")
    return text


def check_url(url: object) -> str:
    text = check_path(url, "the repository")
    scheme, sep, rest = text.partition("://")
    if sep and scheme in OBJECT_STORES:
        parts = rest.rstrip("/").split("/")
        if not parts[0] or any(p in ("", ".", "..") for p in parts[1:]):
            raise ArgumentError(
                f"{text}: an object store has no folders to resolve '//', '.' or '..' in (they "
                f"would be part of the object names); write it as {scheme}://BUCKET/PREFIX")
        if "?versionId=" in rest:  # s3fs cuts a version off there: the saves went elsewhere
            raise ArgumentError(f"{text}: '?versionId=' in an S3 path names an object's "
                                "version (s3fs), not a prefix; choose a prefix without it")
    local = text[len("file://"):] if text.startswith("file://") else (
        None if "://" in text else text)
    if local is not None:
        local = os.path.expanduser(local)  # as fsspec reads it
    if local is not None and os.path.exists(local) and not os.path.isdir(local):
        raise ArgumentError(f"{text} is a file, not a repository folder; pass the folder that "
                            "holds (or will hold) the checkpoints")
    return text


def _show(value: object) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 80 else text[:77] + "..."


CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError",
                               "CredentialRetrievalError", "NoAuthTokenError"})
"""botocore's (and s3fs's) errors for missing credentials, by name: botocore is s3fs's."""

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
"""URL schemes whose paths are object names, not folders."""

STORAGE_LIBRARIES = frozenset({"botocore", "aiobotocore", "s3fs", "aiohttp", "urllib3",
                               "requests", "gcsfs", "adlfs", "azure", "google"})
"""Packages whose exceptions are the storage's failures, though not OSErrors (botocore's
EndpointConnectionError: an S3 endpoint that does not answer)."""


def check_checkpoint_id(checkpoint_id: object, url: str, plug_in: str) -> None:
    """DCP's ``checkpoint_id`` (``dcp.save(..., checkpoint_id=)``) names where to save or load;
    a dckpt plug-in has its repository already: another place would be silently ignored."""
    if checkpoint_id is None:
        return
    if not isinstance(checkpoint_id, (str, os.PathLike)) or not same_url(
            os.fspath(checkpoint_id), url):  # type: ignore[arg-type]
        raise ArgumentError(
            f"checkpoint_id={checkpoint_id!r} is not dckpt.{plug_in}'s repository {url}; pass "
            f"checkpoint_id=None (or the same URL), or make the {plug_in} for that repository")


def storage_error(e: BaseException, what: str) -> DckptError:
    """A DckptError for an exception of the storage or of a bug on the way, once."""
    if isinstance(e, DckptError):
        return e
    if isinstance(e, PermissionError) or type(e).__name__ in CREDENTIAL_ERRORS:
        return StorageError(f"{what}: the storage refused access ({type(e).__name__}: {e}); "
                            "check the credentials "
                            "(storage_options key/secret/profile, or the environment's) and "
                            "their rights on that bucket or folder")
    if isinstance(e, (OSError, TimeoutError)) or (
            type(e).__module__.partition(".")[0] in STORAGE_LIBRARIES):
        return StorageError(f"{what}: the storage failed ({type(e).__name__}: {e}); earlier "
                            "checkpoints are intact")
    if isinstance(e, RecursionError):  # a manifest nested too deep: FormatError (decoder)
        return StateDictError(f"{what}: the state dict (or a value given) holds itself (a "
                              "dict or list inside itself, at some depth) or is nested "
                              "deeper than Python's recursion limit")
    if isinstance(e, MemoryError | OverflowError):
        return DckptError(f"{what}: {type(e).__name__}: {str(e)[:200]}; a manifest or an "
                          "argument holds a value far out of range")
    return DckptError(f"{what}: unexpected {type(e).__name__}: {e}")


def public(fn: F) -> F:
    """Only DckptError subclasses leave ``fn``: anything else is translated, and chained; a
    call that does not fit its signature (a missing or unknown argument) is an
    ArgumentError."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ArgumentError(f"{fn.__qualname__}: {e}") from None
        try:
            return fn(*args, **kwargs)
        except DckptError:
            raise
        except Exception as e:
            raise storage_error(e, f"dckpt.{fn.__qualname__}") from e
    return wrapper  # type: ignore[return-value]

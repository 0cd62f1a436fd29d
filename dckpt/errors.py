"""The exception tree: every error dckpt raises derives from DckptError."""

from __future__ import annotations

__all__ = [
    "DckptError",
    "CheckpointNotFoundError",
    "IntegrityError",
    "FormatError",
    "NewerFormatError",
    "UnsafeValueError",
    "CommitError",
    "CheckpointExistsError",
    "StateDictError",
    "UnsavableStateError",
    "ArgumentError",
    "StorageError",
]


class DckptError(Exception):
    """Base of every dckpt error.

    ``failures`` maps a rank to that rank's message when the error stands for a failure
    on one or more ranks of a collective call; every rank raises the same error.
    """

    def __init__(self, message: str, *, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.failures: dict[int, str] = dict(failures or {})

    def __reduce__(self):  # keeps keyword state across pickling (errors cross ranks)
        return (_rebuild, (type(self), self.message, self.failures))

    def __str__(self) -> str:
        if not self.failures:
            return self.message
        lines = [self.message]
        for rank in sorted(self.failures):
            lines.append(f"  rank {rank}: {self.failures[rank]}")
        return "\n".join(lines)


def headline(message: str) -> str:
    """A message's first line, joined with the next where the first only announces a list
    (ends with ``:``): what a one-line report of an error keeps."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def listing(head: str, problems: list[str]) -> str:
    """``head (n problems):`` and one ``  - problem`` line each."""
    n = len(problems)
    return (f"{head} ({n} problem{'s' if n != 1 else ''}):\n"
            + "\n".join(f"  - {p}" for p in problems))


def _rebuild(cls: type[DckptError], message: str, failures: dict[int, str]) -> DckptError:
    return cls(message, failures=failures)


class CheckpointNotFoundError(DckptError):
    """The URL holds no repository, or no committed checkpoint for the asked step."""


class IntegrityError(DckptError):
    """Stored bytes or a manifest do not match what the checkpoint says they are."""


class FormatError(IntegrityError):
    """A manifest is not valid JSON of a known version, or breaks the format spec."""


class NewerFormatError(FormatError):
    """A sound manifest (its checksum matches) of a format version newer than this dckpt
    reads. Not damage: ``load(step=None)`` stops at it instead of falling back to an older
    checkpoint, which would silently lose the training since; upgrade dckpt, or ask for an
    older step."""


class UnsafeValueError(IntegrityError):
    """A stored non-tensor value would need arbitrary code to be loaded; it was refused."""


class CommitError(DckptError):
    """A save did not commit: nothing was written to the manifest, earlier checkpoints stand."""


class CheckpointExistsError(CommitError):
    """The step is already committed; a committed checkpoint is never overwritten."""


class StateDictError(DckptError, ValueError):
    """The state dict does not fit the checkpoint (or cannot be saved); lists every problem."""


class UnsavableStateError(CommitError, StateDictError):
    """A save refused for what its state dict holds (a value that would not load back, keys
    that collide once flattened, a tensor layout that cannot be stored): nothing was
    written or committed. Both a CommitError, as every failed save, and a StateDictError,
    as the same state dict refused by a load."""


class ArgumentError(DckptError, ValueError, TypeError):
    """An argument of a public function or config is of the wrong type or out of range (or
    missing, or unknown: a TypeError too, as Python's own call errors are);
    raised before anything is read or written."""


class SaveTimeoutError(DckptError, TimeoutError):
    """``SaveHandle.wait(timeout)`` returned before the save ended; the save goes on in the
    background (wait again, or see ``handle.done()``)."""


class StorageError(DckptError):
    """The storage refused a request or did not answer in time (wrong credentials, a
    missing bucket, a server that stopped answering); the builtin OSError is chained."""

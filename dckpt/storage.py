"""The only module that imports fsspec: object I/O under a repository root.

Writes are made durable before they return (local: fsync of the file and its folder;
object stores: a completed upload). Local segments may be written with ``O_DIRECT``
(``open_write(direct=True)``): page-aligned memory goes from the caller's buffer to the
disk without a copy into the page cache, which is the CPU a background save would otherwise
take from the training (measured: 1 GiB buffered 0.33-2.6 s of system time, direct 0.05 s).
Committing a manifest is one atomic create that fails when the object exists (local: temp
file in the same folder, fsync, link, fsync the folder; S3: one PUT with ``If-None-Match: *``).
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dckpt import s3
from dckpt.arguments import check_options, check_url
from dckpt.direct import DirectFile
from dckpt.errors import ArgumentError
from dckpt.files import open_file, replaced_by_rename
from dckpt.mounts import watched_filesystem
from dckpt.watchdog import STALL_S, call_bounded

__all__ = ["Store", "UNREADABLE"]

UNREADABLE = frozenset({errno.ELOOP, errno.EIO})
"""Errors of one object, not of the storage: a symlink loop where it belongs, a medium error
under its bytes, something other than a file in its place (``files.open_file``). Its
checkpoint is damaged (a restore falls back past it)."""

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


F = TypeVar("F", bound=Callable[..., Any])


def _bounded(method: F) -> F:
    """A metadata operation, given up after ``Store.stall_s`` on an object store (its
    requests' own timeouts and retries took 90 s each where the server stopped answering,
    whatever ``io_stall_timeout_s`` said) and on a network or FUSE filesystem (a hung mount
    blocks it in the kernel: dckpt.watchdog)."""
    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        if not self.watched:
            return method(self, *args, **kwargs)
        return call_bounded(lambda: method(self, *args, **kwargs), self.stall_s,
                            f"{self.url}: {method.__name__} {args[0] if args else ''}")
    return wrapper  # type: ignore[return-value]


def _unchained(url: str) -> str | None:
    """The protocol of a URL or plain path with "::" in a name, which fsspec would read as
    a chain of filesystems (/ckpt/a::b went to /ckpt/a, where /ckpt/a::c and /ckpt/a went
    too; s3://bucket/a::b failed inside s3fs). None for anything else, and for a chain whose
    first link is a protocol (simplecache::s3://bucket)."""
    head = url.split("::", 1)[0]
    if "::" not in url or head in fsspec.available_protocols():
        return None
    return head.split("://", 1)[0] if "://" in head else "file"


class Store:
    """A repository root on one fsspec filesystem. Names are relative, '/'-separated."""

    stall_s = STALL_S
    """Metadata operations (listings, manifests, folder syncs) that do not return in this
    long raise Stalled (a StorageError) where they are ``watched``; set from
    ``io_stall_timeout_s``."""
    watch_metadata: bool | None = None
    """Whether metadata operations run under ``stall_s``; None: on object stores and on
    network and FUSE filesystems (``watched``)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = check_url(url)
        options = check_options(storage_options) or {}
        self.s3 = self.url.split("://", 1)[0] in ("s3", "s3a")  # dckpt's bounds for S3
        if self.s3:
            options = s3.options_with_bounds(options)
        try:
            protocol = _unchained(self.url)
            if protocol is not None:  # one filesystem: the URL names a path on it
                self.fs = fsspec.filesystem(protocol, **options)
                root = self.fs._strip_protocol(self.url)
            else:
                self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as e:
            raise ArgumentError(f"{self.url}: fsspec cannot open it with storage_options "
                                f"{sorted(options)} ({type(e).__name__}: {e})") from e
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.s3 and hasattr(self.fs, "retries"):
            self.fs.retries = min(self.fs.retries, s3.RETRIES)
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        if not self.local:
            # IMPORTANT: fsspec caches instances and listings across calls; other processes
            # commit checkpoints, so a listing from an earlier call may be stale.
            self.fs.invalidate_cache()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    @functools.cached_property
    def watched(self) -> bool:
        """Whether metadata operations run under ``stall_s`` (``watch_metadata``): requests
        over a network (an object store; not fsspec's in-process memory), or local paths on a
        network or FUSE filesystem."""
        if self.watch_metadata is not None:
            return self.watch_metadata
        if not self.local:
            return not isinstance(self.fs, MemoryFileSystem)
        return watched_filesystem(self.root)

    # ------------------------------------------------------------ writes

    @property
    def direct_capable(self) -> bool:
        """Whether ``open_write(direct=True)`` bypasses the page cache here (plain local files;
        subclasses of the local filesystem may wrap their files, so they do not qualify)."""
        return type(self.fs) is LocalFileSystem and hasattr(os, "O_DIRECT")

    @contextmanager
    def open_write(self, name: str, *, direct: bool = False,
                   window_bytes: int = 0) -> Iterator[BinaryIO]:
        """A new object, durable when the block exits cleanly; discarded when it raises.

        ``direct``: write through ``O_DIRECT`` where ``direct_capable`` (see ``DirectFile``;
        ``window_bytes``: its bytes copied through a reused window of that size); elsewhere
        both are ignored. The object's bytes are the same either way.
        """
        path = self.path(name)
        if self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if direct and self.direct_capable:
            d = DirectFile(path, window_bytes)
            try:
                yield d  # type: ignore[misc]
                d.close()
            except BaseException:
                d.abort()
                _unlink_quietly(path)
                raise
            return
        f = self.fs.open(path, "wb")
        try:
            yield f
            if self.local:
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None and not self.local:
                try:
                    discard()  # abort a multipart upload instead of completing it
                finally:  # s3fs leaves the file open without its buffer, and its
                    _mark_closed(f)  # __del__ then failed to close it, on the stderr
            else:
                _close_quietly(f)  # a full disk fails the flush of the last bytes too
                if self.local:
                    _unlink_quietly(path)
            raise
        f.close()  # object stores: completes the upload

    @contextmanager
    def open_replace(self, name: str) -> Iterator[BinaryIO]:
        """A file that appears under ``name`` only complete and durable, replacing what was
        there (an export's destination); on failure nothing is left under ``name``.

        Local: a temp file in the same folder, fsync, rename over ``name``, fsync the folder.
        Object stores: the upload completes (or is discarded) as one object.
        """
        if not self.local:
            with self.open_write(name) as f:
                yield f
            return
        what = replaced_by_rename(self.path(name))
        if what:
            raise FileExistsError(errno.EEXIST, f"{what} stands there, not a file; not "
                                  "replaced", self.path(name))
        folder, _, base = name.rpartition("/")
        tmp = f"{folder + '/' if folder else ''}.tmp-{uuid.uuid4().hex}-{base}"
        try:
            with self.open_write(tmp) as f:
                yield f
            os.replace(self.path(tmp), self.path(name))
        except BaseException:
            self.delete(tmp)
            raise
        self.sync_folder(folder or ".")

    @_bounded
    def sync_folder(self, name: str) -> None:
        """Make the entries of a local folder durable (no-op on object stores)."""
        if self.local:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @_bounded
    def create_exclusive(self, name: str, data: bytes) -> None:
        """Atomically create ``name`` holding ``data``; FileExistsError when it exists."""
        path = self.path(name)
        if not self.local:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except Exception as e:
                # IMPORTANT: a create whose answer was lost (a connection reset) is sent
                # again, and the retry fails on the object the first one made: when the
                # object holds these bytes, the create is done (a manifest's bytes name its
                # save's attempt: another save's are never the same). Not after a timeout:
                # a storage that stops answering would not answer the read either.
                exists = isinstance(e, FileExistsError)
                if not exists and not s3.connection_lost(e):
                    raise
                held = self._holds(path, data, tries=3 if exists else 1)
                if held:
                    return
                if held is None and exists:
                    raise OSError(errno.EIO, f"the create of {name} found an object there, "
                                  "and it could not be read back to tell whether this create "
                                  "made it: it may have. List the checkpoints (dckpt ls) to "
                                  "see whether the step is committed") from e
                raise
            return
        folder = posixpath.dirname(path)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # IMPORTANT: link, not rename: rename would overwrite
        finally:  # also when the disk is full: no temp file left behind
            _unlink_quietly(tmp)
        self.sync_folder(posixpath.dirname(name))

    def _holds(self, path: str, data: bytes, tries: int) -> bool | None:
        """Whether the object at ``path`` holds ``data``; None when ``tries`` reads fail."""
        for attempt in range(tries):
            try:
                return bool(self.fs.cat_file(path) == data)
            except FileNotFoundError:
                return False
            except Exception:  # a flaky storage: try again, then unknown
                time.sleep(0.2 * 2 ** attempt)
        return None

    def write_if_absent(self, name: str, data: bytes) -> None:
        try:
            self.create_exclusive(name, data)
        except FileExistsError:
            pass

    # ------------------------------------------------------------ reads

    @_bounded
    def read_bytes(self, name: str) -> bytes:
        if type(self.fs) is not LocalFileSystem:
            return self.fs.cat_file(self.path(name))
        with open(open_file(self.path(name)), "rb") as f:
            return f.read()

    def read_into(self, name: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; returns the count read.

        Local files stay open between reads (``close_files`` closes them): a differential
        checkpoint's reads are many and short, and opening the file for each cost more than
        the read (objects are never modified once written, so a handle cannot go stale)."""
        path = self.path(name)
        if type(self.fs) is LocalFileSystem:
            fd = self._fd(path)
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + done)
                if not n:
                    break
                done += n
            return done
        if self.local:
            with self.fs.open(path, "rb") as f:
                f.seek(offset)
                done = 0
                while done < len(out):
                    n = f.readinto(out[done:])
                    if not n:
                        break
                    done += n
                return done
        data = self.fs.cat_file(path, start=offset, end=offset + len(out))
        out[: len(data)] = data
        return len(data)

    @property
    def vectored(self) -> bool:
        """Whether ``read_vectored`` is available (plain local files)."""
        return type(self.fs) is LocalFileSystem

    def read_vectored(self, name: str, offset: int, outs: list[memoryview]) -> int:
        """Read the bytes at ``offset`` into ``outs`` one after the other (one ``preadv``
        per IOV_MAX buffers); returns the count read, short only at the end of the object."""
        fd = self._fd(self.path(name))
        done = 0
        pending = [v for v in outs if len(v)]
        while pending:
            batch = pending[:IOV_MAX]
            want = sum(len(v) for v in batch)
            n = os.preadv(fd, batch, offset + done)
            done += n
            if not n:
                break
            if n == want:
                pending = pending[len(batch):]
                continue
            while n >= len(pending[0]):  # a short read: go on after the bytes that came
                n -= len(pending[0])
                pending.pop(0)
            pending[0] = pending[0][n:]
        return done

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = open_file(path)
        return fd

    def close_files(self) -> None:
        """Close the files ``read_into`` keeps open."""
        with self._fds_lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    @_bounded
    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    @_bounded
    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    @_bounded
    def list_names(self, folder: str) -> list[str]:
        """Base names directly under ``folder``; empty when it does not exist;
        NotADirectoryError when it is a local file (a damaged repository, not an empty one:
        gc would take everything)."""
        self._not_a_file(folder)
        try:
            entries = self.fs.ls(self.path(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without a refresh keyword
            entries = self.fs.ls(self.path(folder), detail=False)
        # a set: an object store may hold an object and a prefix of one name (a key "a"
        # and a key "a/x"), listed as two entries, and a step listed twice was two checkpoints
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries})

    @_bounded
    def list_sizes(self, folder: str) -> dict[str, int]:
        """Base name -> size in bytes of the objects directly under ``folder``."""
        self._not_a_file(folder)
        try:
            entries = self.fs.ls(self.path(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except TypeError:  # filesystems without a refresh keyword
            entries = self.fs.ls(self.path(folder), detail=True)
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type") != "directory"}

    def _not_a_file(self, folder: str) -> None:
        if self.local and os.path.isfile(self.path(folder)):
            raise NotADirectoryError(errno.ENOTDIR, "a file where a folder belongs (the "
                                     "repository is damaged: move the file away)",
                                     self.path(folder))

    @_bounded
    def remove_folder(self, name: str) -> None:
        """Remove an empty local folder (object stores have none); a non-empty one stays."""
        if self.local:
            try:
                os.rmdir(self.path(name))
            except OSError:
                pass

    @_bounded
    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def incomplete_uploads(self, folder: str) -> list[tuple[str, str]]:
        """(S3) The multipart uploads under ``folder`` never completed nor aborted, as (name,
        upload id): ``s3.incomplete_uploads``. [] on other stores."""
        if getattr(self.fs, "call_s3", None) is None:  # s3fs's own: its client's calls
            return []
        return [(key[len(self.root) + 1:], upload_id)
                for key, upload_id in s3.incomplete_uploads(self.fs, self.path(folder))]

    def upload_bytes(self, name: str, upload_id: str) -> int:
        """(S3) The bytes of the parts an incomplete multipart upload of ``name`` holds."""
        return s3.upload_bytes(self.fs, self.path(name), upload_id)

    def abort_upload(self, name: str, upload_id: str) -> None:
        """(S3) Abort an incomplete multipart upload of ``name``: its parts are deleted."""
        s3.abort_upload(self.fs, self.path(name), upload_id)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _mark_closed(f: Any) -> None:
    try:
        f.closed = True  # fsspec's buffered files have a setter
    except AttributeError:
        pass


def _close_quietly(f: Any) -> None:
    try:
        f.close()
    except OSError:
        pass

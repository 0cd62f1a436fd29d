"""The only module that imports fsspec: object I/O under a repository root.

Writes are made durable before they return (local: fsync of the file and its folder;
object stores: a completed upload). Committing a manifest is one atomic create that fails
when the object exists (local: temp file in the same folder, fsync, link, fsync the folder;
S3: one PUT with ``If-None-Match: *``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Store"]


class Store:
    """A repository root on one fsspec filesystem. Names are relative, '/'-separated."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        if not isinstance(url, (str, os.PathLike)) or not str(url):
            raise ValueError(f"expected a repository URL or path, got {url!r}")
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        if not self.local:
            # IMPORTANT: fsspec caches instances and listings across calls; other processes
            # commit checkpoints, so a listing from an earlier call may be stale.
            self.fs.invalidate_cache()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    # ------------------------------------------------------------ writes

    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        """A new object, durable when the block exits cleanly; discarded when it raises."""
        path = self.path(name)
        if self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        f = self.fs.open(path, "wb")
        try:
            yield f
            if self.local:
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None and not self.local:
                discard()  # abort a multipart upload instead of completing it
            else:
                f.close()
            raise
        f.close()  # object stores: completes the upload

    def sync_folder(self, name: str) -> None:
        """Make the entries of a local folder durable (no-op on object stores)."""
        if self.local:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Atomically create ``name`` holding ``data``; FileExistsError when it exists."""
        path = self.path(name)
        if not self.local:
            self.fs.pipe_file(path, data, mode="create")
            return
        folder = posixpath.dirname(path)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # IMPORTANT: link, not rename: rename would overwrite
        finally:
            os.unlink(tmp)
        self.sync_folder(posixpath.dirname(name))

    def write_if_absent(self, name: str, data: bytes) -> None:
        try:
            self.create_exclusive(name, data)
        except FileExistsError:
            pass

    # ------------------------------------------------------------ reads

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_into(self, name: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; returns the count read."""
        path = self.path(name)
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

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def list_names(self, folder: str) -> list[str]:
        """Base names directly under ``folder``; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without a refresh keyword
            entries = self.fs.ls(self.path(folder), detail=False)
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass


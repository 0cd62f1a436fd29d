"""S3's side of the store: dckpt's bounds on every request, the errors of a connection lost
mid-request, and the multipart uploads that a writer killed mid-upload leaves open.

Functions of an s3fs filesystem (``Store.fs``), through its own client calls (``call_s3``);
this module imports no storage library itself (storage.py owns them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONFIG", "RETRIES", "options_with_bounds", "connection_lost", "incomplete_uploads",
           "upload_bytes", "abort_upload"]

CONFIG = {"connect_timeout": 10, "read_timeout": 30,
          "retries": {"max_attempts": 2, "mode": "standard"}}
"""botocore settings an S3 store gets unless ``storage_options["config_kwargs"]`` sets them:
a request that gets no answer fails after 30 s and is tried twice by botocore, and s3fs
tries those twice more (``RETRIES``), so one request takes at most about 2 minutes
(s3fs's own defaults allow 375 s and more: a black-holed save hung past 7 minutes)."""
RETRIES = 2


def options_with_bounds(options: dict) -> dict:
    """``options`` with dckpt's bounded timeouts and retries where the caller set none."""
    config = dict(CONFIG)
    config.update(options.get("config_kwargs") or {})
    return {**options, "config_kwargs": config}


_LOST = frozenset({"ConnectionClosedError", "ServerDisconnectedError", "ClientPayloadError",
                   "ClientOSError", "IncompleteRead", "ProtocolError"})
"""Exceptions of the storage libraries for a connection that broke mid-request (botocore,
aiohttp, urllib3): the request may have arrived."""


def connection_lost(e: BaseException) -> bool:
    """Whether ``e``, or an exception it came from, says the connection broke mid-request."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionError) or type(seen).__name__ in _LOST:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def incomplete_uploads(fs: Any, folder: str) -> list[tuple[str, str]]:
    """The multipart uploads under ``folder`` ("bucket/key...") that were neither completed
    nor aborted (a writer killed mid-upload, or one still writing), as ("bucket/key", upload
    id): no listing shows them, and their parts are stored, and billed, until aborted."""
    bucket, _, key = folder.partition("/")
    out: list[tuple[str, str]] = []
    marker: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket,
                          Prefix=key.rstrip("/") + "/", **marker)
        out += [(f"{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
        if not page.get("IsTruncated"):
            return out
        marker = {"KeyMarker": page["NextKeyMarker"],
                  "UploadIdMarker": page["NextUploadIdMarker"]}


def upload_bytes(fs: Any, path: str, upload_id: str) -> int:
    """The bytes of the parts an incomplete multipart upload of ``path`` holds."""
    bucket, _, key = path.partition("/")
    total, marker = 0, 0
    while True:
        page = fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id,
                          PartNumberMarker=marker)
        total += sum(int(p["Size"]) for p in page.get("Parts", []))
        if not page.get("IsTruncated"):
            return total
        marker = int(page["NextPartNumberMarker"])


def abort_upload(fs: Any, path: str, upload_id: str) -> None:
    """Abort an incomplete multipart upload of ``path``: its parts are deleted."""
    bucket, _, key = path.partition("/")
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

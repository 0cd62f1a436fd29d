"""Per-block compression: zstd, floating-point blocks split into byte planes first (pure).

A float's bytes differ in how they compress: the sign and exponent byte of a bf16 weight
takes few values, its mantissa byte looks random. Stored interleaved, zstd sees noise; split
into planes (every element's byte 0, then every byte 1, ...) the exponent plane compresses
well on its own. A block that does not shrink is stored raw.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from dckpt.errors import IntegrityError

__all__ = ["encode", "decode", "codec_name"]

LEVEL = 1
"""zstd level: the fastest; higher levels gained little on tensor bytes for much more CPU
(docs/design.md, Compression)."""

_PLANES_PREFIX = "zstd-planes-"
_local = threading.local()


def codec_name(planes: int) -> str:
    return "zstd" if planes <= 1 else f"{_PLANES_PREFIX}{planes}"


def _planes_of(codec: str) -> int:
    return int(codec[len(_PLANES_PREFIX):]) if codec.startswith(_PLANES_PREFIX) else 1


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def encode(buf: memoryview, planes: int) -> tuple[str, bytes] | None:
    """``buf`` compressed (split into ``planes`` byte planes first when > 1): the codec's
    name and the payload; None when it would not shrink by at least 1/32."""
    if planes > 1 and len(buf) % planes == 0:
        src = np.frombuffer(buf, dtype=np.uint8).reshape(-1, planes).T.tobytes()
    else:
        planes, src = 1, buf
    payload = _compressor().compress(src)
    if len(payload) > len(buf) - len(buf) // 32:
        return None
    return codec_name(planes), payload


def decode(codec: str, payload: memoryview | bytes | bytearray, out: memoryview, *,
           what: str) -> None:
    """Decode ``payload`` into ``out`` (exactly its length) or raise IntegrityError."""
    try:
        raw = _decompressor().decompress(payload, max_output_size=len(out))
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what}: a {codec} block does not decompress ({e}); the object "
                             "is damaged") from None
    if len(raw) != len(out):
        raise IntegrityError(f"{what}: a {codec} block decompresses to {len(raw)} bytes, "
                             f"expected {len(out)}; the object is damaged")
    planes = _planes_of(codec)
    if planes > 1:
        np.frombuffer(out, dtype=np.uint8).reshape(-1, planes)[:] = \
            np.frombuffer(raw, dtype=np.uint8).reshape(planes, -1).T
    else:
        out[:] = raw

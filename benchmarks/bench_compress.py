"""Compression against the store: is compressing faster than writing the bytes it saves?

    python benchmarks/bench_compress.py --mib 512

Backs ``SaveConfig(compression="auto")``: on for object stores, off for local disks. One
process saves ``--mib`` MiB of bf16 weights (normal, std 0.02, as trained weights are) with
compression on and off, to the local disk and to an S3 protocol server on 127.0.0.1 (moto's
server mode, started here), and loads each back. Beside them, in the same run: the bytes
written raw (one file write + fsync locally, one ``pipe`` through s3fs to S3) as the store's
limit, zstd-1 on this machine's cores (plain and byte planes) as the compression's limit, and
DCP's FileSystemWriter / FsspecWriter as the peer. JSON lines to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import dckpt
from dckpt.codec import encode
from dckpt.segments import byte_planes

from common import emit, evict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dckpt_testing import MotoServer  # noqa: E402


def weights(mib: int) -> dict[str, torch.Tensor]:
    """bf16 weights in 16 MiB tensors (a trained model's spread: std 0.02)."""
    g = torch.Generator().manual_seed(0)
    n = max(1, mib // 16)
    return {f"layer{i}.weight": (torch.randn(2048, 4096, generator=g) * 0.02).bfloat16()
            for i in range(n)}


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def codec_rate(state: dict[str, torch.Tensor], block: int) -> dict:
    """zstd-1 over every block of the state, one core: MB/s and the ratio, plain and planes."""
    out = {}
    for name, planes in (("plain", 1), ("planes", byte_planes(torch.bfloat16))):
        raw = stored = 0
        t0 = time.perf_counter()
        for t in state.values():
            mv = memoryview(t.view(torch.uint8).numpy()).cast("B")
            for o in range(0, len(mv), block):
                chunk = mv[o:o + block]
                enc = encode(chunk, planes)
                raw += len(chunk)
                stored += len(chunk) if enc is None else len(enc[1])
        s = time.perf_counter() - t0
        out[name] = {"MB_s_one_core": round(raw / s / 1e6, 1), "ratio": round(raw / stored, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dir", default="bench-out/compress")
    p.add_argument("--out", default="bench-out/compress.jsonl")
    p.add_argument("--stores", default="local,s3")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = weights(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    cores = len(os.sched_getaffinity(0))
    emit(args.out, {"bench": "compress", "method": "zstd-1 codec", "cores": cores,
                    "bytes": nbytes,
                    **codec_rate(state, dckpt.SaveConfig().block_size_bytes)})
    blob = b"".join(t.view(torch.uint8).numpy().tobytes() for t in state.values())

    server = None
    try:
        for store in args.stores.split(","):
            if store == "local":
                base = os.path.abspath(args.dir)
                shutil.rmtree(base, ignore_errors=True)
                os.makedirs(base)
                opts: dict | None = None
            else:
                server = MotoServer()
                server.make_bucket("bench")
                base, opts = "s3://bench/compress", server.options()
            import fsspec

            fs, _ = fsspec.core.url_to_fs(base, **(opts or {}))

            def raw_write(path: str) -> None:
                if store == "local":
                    with open(path, "wb") as f:
                        f.write(blob)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    fs.pipe(path, blob)

            for rep in range(args.repeat):
                path = f"{base}/raw-{rep}"
                w = seconds(lambda: raw_write(path))
                emit(args.out, {"bench": "compress", "store": store, "method": "raw write",
                                "rep": rep, "save_s": round(w, 3), "bytes": nbytes,
                                "bytes_written": nbytes})
                for mode in ("off", "on"):
                    url = f"{base}/dckpt-{mode}-{rep}"
                    cfg = dckpt.SaveConfig(compression=mode)
                    info = None

                    def save() -> None:
                        nonlocal info
                        info = dckpt.save(state, url, step=1, storage_options=opts, config=cfg)

                    s = seconds(save)
                    if store == "local":
                        evict(url)
                    target = {k: torch.empty_like(v) for k, v in state.items()}
                    r = seconds(lambda: dckpt.load(target, url, step=1, storage_options=opts))
                    assert all(torch.equal(target[k], v) for k, v in state.items())
                    emit(args.out, {"bench": "compress", "store": store,
                                    "method": f"dckpt compression={mode}", "rep": rep,
                                    "save_s": round(s, 3), "load_s": round(r, 3),
                                    "bytes": nbytes, "bytes_written": info.bytes_written,
                                    "save_vs_raw": round(s / w, 2)})
                url = f"{base}/dcp-{rep}"
                if store == "local":
                    s = seconds(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(
                        url, sync_files=True)))
                    evict(url)
                    reader = dcp.FileSystemReader(url)
                else:
                    s = seconds(lambda: dcp.save(state, storage_writer=FsspecWriter(
                        url, sync_files=False, **opts)))
                    reader = FsspecReader(url, **opts)
                target = {k: torch.empty_like(v) for k, v in state.items()}
                r = seconds(lambda: dcp.load(target, storage_reader=reader))
                emit(args.out, {"bench": "compress", "store": store, "method": "DCP", "rep": rep,
                                "save_s": round(s, 3), "load_s": round(r, 3), "bytes": nbytes,
                                "save_vs_raw": round(s / w, 2)})
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()

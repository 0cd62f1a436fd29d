"""The dckpt command: ls, inspect, verify, delete, gc, export, status, health, diff, and
bench (its own package, ``dckpt.bench``). Calls only public functions, and the repository's
marker check (``ls`` tells an absent repository from an empty one)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import dckpt
from dckpt.cli_format import Progress, age, metrics_text, path_argument, print_json, size, when
from dckpt.errors import headline
from dckpt.repository import open_repository

__all__ = ["main"]


def _options(pairs: list[str]) -> dict | None:
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:  # an error like any other: one line, exit 2 (SystemExit's 1
            # read as "a problem found" from verify)
            raise dckpt.ArgumentError(f"-o expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out or None


def cmd_ls(args: argparse.Namespace) -> int:
    infos = dckpt.list_checkpoints(args.url, storage_options=_options(args.option))
    if args.json:
        print_json([dataclasses.asdict(i) for i in infos])
        return 0
    w = max([10] + [len(str(i.step)) for i in infos])  # steps up to 2**63 - 1
    print(f"{'step':>{w}}  {'created':<23}  {'ranks':>5}  {'logical':>10}  {'written':>10}  "
          "metrics")
    for i in infos:
        if i.problem:
            print(f"{i.step:>{w}}  UNREADABLE: {i.problem.splitlines()[0]}")
            continue
        if i.quarantined:
            print(f"{i.step:>{w}}  QUARANTINED: {i.quarantined}")
            continue
        metrics = metrics_text(i.metrics)
        print(f"{i.step:>{w}}  {when(i.created_at):<23}  {i.world_size:>5}  "
              f"{size(i.bytes_logical):>10}  {size(i.bytes_written):>10}  {metrics}")
    if not infos:
        print("(no committed checkpoint" + _no_repository(args) + ")")
    return 0


def _no_repository(args: argparse.Namespace) -> str:
    """Why a listing is empty, where the URL holds no repository at all (a mistyped path)."""
    try:
        open_repository(args.url, _options(args.option))
    except dckpt.CheckpointNotFoundError:
        return f"; {args.url} holds no dckpt repository: check the path"
    except dckpt.DckptError:
        pass
    return ""


def cmd_inspect(args: argparse.Namespace) -> int:
    m = dckpt.inspect(args.url, step=args.step, storage_options=_options(args.option))
    if args.json:
        print_json(dataclasses.asdict(m))
        return 0
    print(f"step {m.step}  attempt {m.attempt}  created {when(m.created_at)}")
    print(f"ranks {m.world_size}  logical {size(m.bytes_logical)}  written "
          f"{size(m.bytes_written)}  segments {len(m.segments())}  "
          f"block size {size(m.block_size_bytes)}")
    if m.metrics:
        print("metrics " + metrics_text(m.metrics))
    print(f"{'item':<48} {'kind':<6} {'dtype':<9} {'shape':<18} {'shards':>6} {'bytes':>10}")
    for fqn, e in m.items.items():
        if isinstance(e, dckpt.TensorEntry):
            print(f"{fqn:<48} tensor {e.dtype:<9} {list(e.size)!s:<18} {len(e.chunks):>6} "
                  f"{size(e.nbytes):>10}")
        else:
            print(f"{fqn:<48} value  {'':<9} {'':<18} {'':>6} {size(e.nbytes):>10}")
    return 0


def _metrics(args: argparse.Namespace) -> dckpt.Metrics | None:
    if not args.metrics_textfile:
        return None
    return dckpt.Metrics(job=args.job, textfile=args.metrics_textfile)


def cmd_verify(args: argparse.Namespace) -> int:
    report = dckpt.verify(args.url, step=args.step, all_steps=args.all,
                          quarantine=args.quarantine, storage_options=_options(args.option),
                          progress=Progress("verifying", not args.json and sys.stderr.isatty()))
    metrics = _metrics(args)
    if metrics is not None:
        metrics.observe_verify(report)
    if args.json:
        print_json({"ok": report.ok, "steps": list(report.steps),
                    "bytes_checked": report.bytes_checked,
                    "problems": [dataclasses.asdict(p) for p in report.problems]})
    else:
        for p in report.problems:
            kind = "" if p.damage else " (the storage failed; the data may be sound)"
            print(f"PROBLEM step {p.step}{kind}: {p.message}")
        state = "clean" if report.ok else f"{len(report.problems)} problem(s) found"
        print(f"verified steps {list(report.steps)}: {size(report.bytes_checked)} checked, "
              f"{state}")
    return 0 if report.ok else 1


def cmd_delete(args: argparse.Namespace) -> int:
    dckpt.delete(args.url, step=args.step, storage_options=_options(args.option))
    if args.json:
        print_json({"deleted": args.step})
    else:
        print(f"deleted step {args.step}; its data goes at the next gc that finds it unreferenced")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    report = dckpt.gc(args.url, dry_run=args.dry_run, min_age_s=args.min_age,
                      storage_options=_options(args.option),
                      progress=Progress("sweeping", not args.json and sys.stderr.isatty()))
    if args.json:
        print_json({**dataclasses.asdict(report), "wasted_bytes": report.wasted_bytes})
        return 0
    verb = "would remove" if report.dry_run else "removed"
    uploads = (f" and {len(report.aborted_uploads)} incomplete uploads"
               if report.aborted_uploads else "")
    print(f"{verb} {len(report.deleted)} objects{uploads}, {size(report.bytes_freed)}; "
          f"live checkpoints {list(report.live_checkpoints)}")
    if report.kept_young:
        print(f"spared {len(report.kept_young)} unreferenced objects younger than "
              f"{args.min_age:.0f} s (a save may be writing them)")
    if report.partly_referenced:
        print(f"{len(report.partly_referenced)} objects are only partly referenced: "
              f"{size(report.wasted_bytes)} in them is no longer needed but kept")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    n = dckpt.export(args.url, args.to, step=args.step, format=args.format,
                     storage_options=_options(args.option),
                     progress=Progress("exporting", not args.json and sys.stderr.isatty()))
    if args.json:
        print_json({"to": args.to, "format": args.format, "bytes": n})
    else:
        print(f"exported to {args.to} ({args.format}, {size(n)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = dckpt.status(args.url, storage_options=_options(args.option),
                      memory_dir=args.memory_dir)
    healthy = st.newest is not None and not st.problems
    if args.json:
        print_json({**dataclasses.asdict(st), "healthy": healthy})
        return 0 if healthy else 1
    print(f"repository  {st.url}")
    print(f"checkpoints {st.checkpoints}" + (f", damaged: steps {list(st.damaged)}"
                                            if st.damaged else "")
          + (f", quarantined: steps {list(st.quarantined)}" if st.quarantined else ""))
    if st.newest is None:
        print("newest      NONE usable: a restart would start from scratch")
    else:
        print(f"newest      step {st.newest.step}, committed {when(st.newest.created_at)} "
              f"({age(st.newest_age_s or 0.0)} ago), {st.newest.world_size} ranks, "
              f"{size(st.newest.bytes_logical)}")
    if st.pipeline is not None:
        p = st.pipeline
        print(f"pipeline    {len(p['done'])} of {len(p['stages'])} stages done")
        for stage in p["stages"]:
            if stage in p["done"]:
                results = " ".join(f"{k}={v}" for k, v in p["results"].get(stage, {}).items())
                print(f"  done      {stage}  {results}".rstrip())
            elif stage == p["current"]:
                print(f"  running   {stage}  at step {p['step']}")
            else:
                print(f"  pending   {stage}")
    if st.memory is not None:
        folder, nbytes, step = st.memory
        print(f"memory      {size(nbytes)} held in {folder} (this node)"
              + (f", newest step {step}" if step is not None else ""))
    for problem in st.problems:
        print(f"problem     {problem}")
    return 0 if healthy else 1


def cmd_health(args: argparse.Namespace) -> int:
    try:
        if not math.isfinite(args.sample_mib) or args.sample_mib < 0:
            raise dckpt.ArgumentError(f"--sample-mib must be a finite number >= 0, got "
                                      f"{args.sample_mib}")
        h = dckpt.health(args.url, max_age_s=args.max_age, min_free_bytes=args.min_free,
                         verify=args.verify, sample_bytes=int(args.sample_mib * (1 << 20)),
                         storage_options=_options(args.option))
    except (dckpt.DckptError, ValueError, OSError) as e:
        metrics = _metrics(args)
        if metrics is not None:
            metrics.observe_unknown()
        if args.json:
            print_json({"url": args.url, "code": 3, "status": "UNKNOWN", "reasons": [str(e)]})
        else:
            print(f"UNKNOWN: {args.url}: {e}")
        return 3
    metrics = _metrics(args)
    if metrics is not None:
        metrics.observe_health(h)
    if args.json:
        print_json({**dataclasses.asdict(h), "status": h.status})
        return h.code
    print(f"{h.status}: {h.url}" + (f": {'; '.join(h.reasons)}" if h.reasons else ""))
    if h.newest_step is not None:
        print(f"newest        step {h.newest_step}, {age(h.newest_age_s or 0.0)} old "
              f"({h.checkpoints} checkpoints)")
    print("recoverable   " + (f"step {h.recoverable_step}" if h.recoverable_step is not None
                              else "NONE: a restart would start from scratch"))
    for step, why in h.unrecoverable:
        print(f"  skipped     step {step}: {why}")
    if h.read_bytes_per_s:
        print(f"read          {h.read_bytes_per_s / 1e6:.3g} MB/s measured; restore read "
              f"about {h.estimated_read_s:.2g} s per rank")
    if h.free_bytes is not None:
        print(f"free storage  {size(h.free_bytes)}")
    return h.code


def cmd_diff(args: argparse.Namespace) -> int:
    d = dckpt.diff(args.url, args.step_a, args.step_b, storage_options=_options(args.option))
    if args.json:
        print_json({**dataclasses.asdict(d), "changed_bytes": d.changed_bytes})
        return 0
    print(f"step {d.step_a} -> step {d.step_b}: {len(d.items)} items differ, {d.same} equal; "
          f"{size(d.changed_bytes)} changed; {size(d.bytes_shared)} of step {d.step_b}'s "
          f"{size(d.bytes_b)} stored bytes shared with step {d.step_a}")
    if d.items:
        print(f"{'item':<56} {'change':<8} {'size':>10} {'changed':>10}")
        for i in d.items:
            print(f"{i.fqn:<56} {i.change:<8} {size(i.nbytes):>10} {size(i.changed_bytes):>10}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dckpt.bench.options import check, reach

    options = _options(args.option)
    names = check(args)  # before torch's import (seconds): a refusal answers at once
    reach(args.url, options)
    from dckpt.bench.run import main as bench

    return bench(args, options, names)


def _metrics_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-textfile", metavar="PATH",
                   help="also write the result as Prometheus metrics to PATH, for "
                        "node_exporter's textfile collector (e.g. from cron)")
    p.add_argument("--job", default="dckpt", help="the job_name label of those metrics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dckpt", description="Inspect and check dckpt "
                                     "checkpoint repositories (a local path or an fsspec URL).")
    parser.add_argument("--version", action="version", version=f"dckpt {dckpt.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("url", type=path_argument,
                       help="repository: a path, file://, s3://bucket/prefix, ...")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec storage option, e.g. -o endpoint_url=http://127.0.0.1:9000")
        p.set_defaults(fn=fn)
        return p

    command("ls", cmd_ls, "list committed checkpoints, oldest first")
    p = command("inspect", cmd_inspect, "show one checkpoint's manifest")
    p.add_argument("--step", type=int, help="the step (default: the newest)")
    p = command("verify", cmd_verify,
                "read back every byte and check it; exit 0 when clean, 1 when a problem is found")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the step (default: the newest)")
    which.add_argument("--all", action="store_true", help="every committed checkpoint")
    p.add_argument("--quarantine", action="store_true",
                   help="mark each damaged checkpoint so that restores skip it (nothing is "
                        "deleted); clear the mark of each that verifies clean")
    _metrics_options(p)
    p = command("delete", cmd_delete, "drop one checkpoint (its data goes at a later gc)")
    p.add_argument("--step", type=int, required=True, help="the step to drop")
    p = command("gc", cmd_gc, "remove data no committed checkpoint references")
    p.add_argument("--dry-run", action="store_true", help="report only, remove nothing")
    p.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                   help="spare unreferenced data younger than this: a save may be writing it "
                        "(default 3600)")
    p = command("export", cmd_export, "write one checkpoint elsewhere, self-contained")
    p.add_argument("--step", type=int, help="the step (default: the newest)")
    p.add_argument("--to", required=True, type=path_argument,
                   help="destination: a new repository (dckpt) or a file")
    p.add_argument("--format", choices=["dckpt", "torch", "safetensors"], default="dckpt",
                   help="dckpt: a repository holding only this checkpoint; torch: one "
                        "torch.save file of the full state; safetensors: its tensors")
    p = command("health", cmd_health,
                "can a restart recover, and how fast? exit 0 OK, 1 WARNING, 2 CRITICAL "
                "(nothing recoverable), 3 UNKNOWN (the check failed)")
    p.add_argument("--max-age", type=float, metavar="SECONDS",
                   help="WARNING when the newest checkpoint is older than this")
    p.add_argument("--min-free", type=int, metavar="BYTES",
                   help="WARNING when the repository's filesystem has less free (local)")
    p.add_argument("--verify", action="store_true",
                   help="read back every byte of the candidate (default: check that every "
                        "object it references exists and is long enough)")
    p.add_argument("--sample-mib", type=float, default=64.0,
                   help="MiB read to measure the read throughput (default 64)")
    _metrics_options(p)
    p = command("diff", cmd_diff, "which items differ between two checkpoints, and the "
                "stored bytes they share (from the manifests; no data read)")
    p.add_argument("step_a", type=int)
    p.add_argument("step_b", type=int)
    p = command("status", cmd_status, "the newest checkpoint, its age, a pipeline's progress "
                "and this node's memory tier; exit 0 when a restart would find a checkpoint, "
                "1 when not")
    p.add_argument("--memory-dir", help="the memory tier's parent folder (default: "
                   "DCKPT_MEMORY_DIR, else /dev/shm)")
    p = sub.add_parser("bench", help="measure save and restore on this storage against "
                       "DCP, torch-checkpointing and the storage's own limit (run it with "
                       "torchrun -m dckpt bench for many ranks)")
    from dckpt.bench.options import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader went away (``dckpt ls URL | head``): exit quietly, as a pipe's writer does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except dckpt.DckptError as e:
        print(f"dckpt {args.command}: {headline(str(e)) if e.failures else e}",
              file=sys.stderr)
        return 2
    except Exception as e:
        print(f"dckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

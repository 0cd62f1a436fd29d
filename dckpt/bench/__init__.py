"""``dckpt bench``: save and restore throughput on the user's own storage, against the peers.

    dckpt bench /mnt/ckpt --gib-per-rank 1
    torchrun --nproc-per-node=8 -m dckpt bench s3://bucket/scratch --gib-per-rank 4

One run measures, on the same synthetic state and the same storage: dckpt (sync save, async
pause and commit, cold restore), DCP in its best configuration, torch-checkpointing where it
runs, the storage's own limit (parallel writes and ranged reads of the same bytes) and the
memory copy limit; it prints a table of GB/s and ratios, writes ``results.jsonl`` and
``summary.png``, and removes all it wrote. See docs/bench.md.

Modules: ``options`` (the arguments), ``workload`` (the synthetic state), ``methods`` (the
engines and the limits), ``report`` (table, JSON lines, chart), ``run`` (ranks, phases,
clean-up).
"""

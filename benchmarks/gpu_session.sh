#!/usr/bin/env bash
# The GPU machine's checks still owed, in one run that fits its lease (about 15 minutes of
# device time a session, one command at most 10): the CUDA tests, the fast disk's save (sync
# and async), cold load and fragmented restore with the reads of 16 MiB, and the async
# save's training time lost over its call and the next steps (issue 19). The memory tier's
# save and restore on the GPU ran on 2026-12-04 (docs/benchmarks.md, The H200 machine).
#
#   bash benchmarks/gpu_session.sh fetch     # here, once: the wheels the GPU image lacks, in .whl/
#   device run: command "bash benchmarks/gpu_session.sh run", carry [".whl"], timeout_s 600
#   bash benchmarks/gpu_session.sh cpu       # here: the same steps, tiny and on the CPU
#
# Every step has a time limit of its own (a slow one does not take the others with it). What
# comes back: gpu.log (every step's output) and one JSON-lines file per benchmark, in $OUT
# (the device tool's folder; bench-out/gpu here).
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    mkdir -p .whl
    grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    # zstandard: a core dependency the image lacks; torch-checkpointing: a benchmark peer
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0 torch_checkpointing==0.1.1
    ls .whl
    exit ;;
run)
    DEVICE=cuda FRAG_GIB=1 SL_GIB=1 ASYNC_GIB=2 PY=python3
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi ;;
cpu)
    DEVICE=cpu FRAG_GIB=0.0625 SL_GIB=0.0625 ASYNC_GIB=0.0625 PY=.venv/bin/python ;;
*)
    sed -n '2,12p' "$0"; exit 2 ;;
esac

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench-out/gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"
WORK=$(mktemp -d /tmp/dckpt-gpu.XXXX)

step() {  # step NAME SECONDS COMMAND...: run it under its limit, its output into the log
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    echo "== $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi -L 2>/dev/null; nproc; free -g | head -2; df -h /tmp | tail -1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  # the disk under the benchmarks: whether sync saves copy through windows there
  $PY -c "
import os, sys
from dckpt.direct import _block_folder, pages_cap_requests
folder = _block_folder(sys.argv[1], '/sys', None)
print('disk', folder, 'takes scattered pages slowly (windows):', pages_cap_requests(sys.argv[1]))
for name in ('max_segments', 'max_segment_size', 'max_sectors_kb', 'nr_requests'):
    for q in (f'{folder}/queue', f'{folder}/../queue'):
        if folder and os.path.exists(f'{q}/{name}'):
            print(name, open(f'{q}/{name}').read().strip()); break
up = folder or '/'
while up != '/' and not os.path.isfile(f'{up}/features'):
    up = os.path.dirname(up)
if up != '/':
    print('virtio features', up, open(f'{up}/features').read().strip())
" "$WORK"
} >> "$LOG" 2>&1

if [ "$DEVICE" = cuda ]; then
    step gpu_tests 60 $PY -m pytest -q -p no:cacheprovider -m gpu \
        tests/unit/test_restore_gpu.py tests/unit/test_async_gpu.py
fi
# Owed since the reads went back to 16 MiB (2026-12-04, docs/benchmarks.md, Read settings):
# the fast disk's save and cold load (1.01x the raw read with 64 MiB), and the fragmented
# restore against DCP with both request sizes (1.11x DCP's speed with 64 MiB), 2 repeats
step save_load 130 $PY -m torch.distributed.run --standalone --nproc-per-node=2 \
    benchmarks/bench_save_load.py --gib-per-rank "$SL_GIB" --repeats 3 \
    --dir "$WORK/save_load" --out "$OUT/save_load.jsonl"
step fragmented 200 $PY benchmarks/bench_restore.py --ranks 2 --gib-per-rank "$FRAG_GIB" \
    --state embedding --repeats 2 --methods raw,dckpt,DCP --read-configs 8x64 \
    --dir "$WORK/fragmented" --out "$OUT/fragmented.jsonl"
# The async save on the GPU (its pause, and the training time lost over the call and the
# next 30 steps, alike for every method: docs/benchmarks.md, The async pause on the CPU)
step async 150 $PY -m torch.distributed.run --standalone --nproc-per-node=1 \
    benchmarks/bench_async.py --device "$DEVICE" --gib-per-rank "$ASYNC_GIB" --saves 5 \
    --overlap-steps 30 --methods "dckpt,dckpt overlap,DCP DefaultStager,DCP DefaultStager async staging,torch-checkpointing,torch-checkpointing overlap" \
    --dir "$WORK/async" --out "$OUT/async.jsonl"
rm -rf "$WORK"
ls -la "$OUT"

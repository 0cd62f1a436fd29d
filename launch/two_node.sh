#!/usr/bin/env bash
# Two torchrun agents ("nodes") on 127.0.0.1 meeting through the c10d rendezvous, one worker
# each, training on dckpt's CheckpointManager: the same command as on two real hosts, where
# RDZV_HOST would be the first node's address.
#
#   bash launch/two_node.sh CKPT_DIR [train_ddp.py options...]
#
# With the memory tier (--memory-every N [--memory-replicas 1]) each node needs a memory
# folder of its own, as two hosts have a /dev/shm each: MEMORY_ROOT=DIR gives node k the
# folder DIR/node-k (DCKPT_MEMORY_DIR), e.g.
#   MEMORY_ROOT=/dev/shm/two-node bash launch/two_node.sh runs/two --steps 40 \
#       --memory-every 2 --memory-replicas 1
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; shift
PY=${PY:-.venv/bin/python}
PORT=${RDZV_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
node() {
    # c10d rendezvous: the agents agree on node ranks themselves (rank 0 prints)
    local k=$1; shift
    if [ -n "${MEMORY_ROOT:-}" ]; then
        mkdir -p "$MEMORY_ROOT/node-$k"
        export DCKPT_MEMORY_DIR="$MEMORY_ROOT/node-$k"
    fi
    "$PY" -m torch.distributed.run --nnodes=2 --nproc-per-node=1 \
        --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$PORT" --rdzv-id="dckpt-$PORT" \
        --local-addr=127.0.0.1 launch/train_ddp.py --ckpt "$CKPT" "$@"
}
node 0 "$@" &
first=$!
node 1 "$@" &
second=$!
status=0
wait "$first" || status=$?
wait "$second" || status=$?
exit "$status"

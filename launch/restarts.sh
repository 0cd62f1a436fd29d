#!/usr/bin/env bash
# Automatic recovery: torchrun restarts the worker group after a worker dies, and the
# restarted workers resume from the newest checkpoint with no manual step.
#
#   bash launch/restarts.sh CKPT_DIR [train_ddp.py options...]
#   e.g. bash launch/restarts.sh runs/restarts --steps 60 --crash-at 25
#
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13 the restarted workers would share the
# agent's rendezvous TCPStore of the previous attempt and the new gloo group can hang
# (pytorch/pytorch#135712); a store per attempt avoids it.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; shift
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "${PY:-.venv/bin/python}" -m torch.distributed.run --standalone --nproc-per-node=2 \
    --max-restarts=2 launch/train_ddp.py --ckpt "$CKPT" "$@"

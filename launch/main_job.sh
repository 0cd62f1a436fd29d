#!/usr/bin/env bash
# The main job, set-up included: a 2-rank torchrun DDP training run that checkpoints to a
# local folder, is killed (SIGKILL, agent and workers) mid-run, is launched again, resumes
# from its newest committed checkpoint, and ends with weights equal, bit for bit, to those
# of an uninterrupted run.
#
#   bash launch/main_job.sh [STEPS] [KILL_AFTER_STEP]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
KILL_AFTER=${2:-30}
SAVE_EVERY=10
bash launch/setup.sh
PY=.venv/bin/python
RUN=${DCKPT_RUN_DIR:-runs/main-job}
rm -rf "$RUN" && mkdir -p "$RUN"
train() {
    "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 launch/train_ddp.py \
        --steps "$STEPS" --save-every "$SAVE_EVERY" "$@"
}

echo "== 1/3 uninterrupted reference run ($STEPS steps)"
train --ckpt "$RUN/reference-ckpt" --out "$RUN/reference.pt" --step-seconds 0 2>"$RUN/reference.log"

echo "== 2/3 training run, killed with SIGKILL once step $KILL_AFTER is committed"
setsid bash -c "$(declare -f train); PY=$PY STEPS=$STEPS SAVE_EVERY=$SAVE_EVERY train \
    --ckpt $RUN/ckpt --out $RUN/final.pt" >"$RUN/first.out" 2>"$RUN/first.log" &
LEADER=$!
target=$(printf "%s/ckpt/manifests/%012d.json" "$RUN" "$KILL_AFTER")
for _ in $(seq 1200); do
    [ -e "$target" ] && break
    kill -0 "$LEADER" 2>/dev/null || { echo "training ended before step $KILL_AFTER"; cat "$RUN/first.log"; exit 1; }
    sleep 0.1
done
# torchrun starts each worker in a session of its own, so killing the agent's process group
# would leave the workers running: collect the whole tree first, then SIGKILL all of it.
tree() { local p; for p in $(pgrep -P "$1"); do echo "$p"; tree "$p"; done; }
victims="$LEADER $(tree "$LEADER")"
{ kill -KILL $victims; wait "$LEADER"; } 2>/dev/null || true
cat "$RUN/first.out"
echo "   killed the whole job with SIGKILL: pids $(echo $victims)"
.venv/bin/dckpt ls "$RUN/ckpt"

echo "== 3/3 relaunch: resumes from the newest committed checkpoint"
# the checkpoint's bytes go into the page cache while torchrun and torch's imports start
"$PY" -m dckpt.prefetch "$RUN/ckpt" &
train --ckpt "$RUN/ckpt" --out "$RUN/final.pt" 2>"$RUN/second.log"
wait

"$PY" - "$RUN/reference.pt" "$RUN/final.pt" <<'PYEOF'
import sys, torch
ref, got = (torch.load(p, weights_only=True) for p in sys.argv[1:3])
same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
print("RESULT: final weights", "EQUAL" if same else "DIFFER",
      "to the uninterrupted run's, bit for bit" if same else "from the uninterrupted run's")
sys.exit(0 if same else 1)
PYEOF

#!/usr/bin/env bash
# scripts/multinode.sh: torchrun across nodes without a scheduler. Run the same command on every node, from the
# project folder on a file system every node sees (the run folder must be shared: docs/OPERATIONS.md):
#
#   NNODES=5 MASTER_HOST=node0 scripts/multinode.sh q0.py configs/fineweb_1p8b_q0.py      # on each of the 5 nodes
#   NNODES=5 MASTER_HOST=node0 scripts/multinode.sh eval.py runs/fineweb_1p8b_q0 --score  # members over 40 GPUs
#
# NPROC_PER_NODE (8), MASTER_PORT (29500), MAX_RESTARTS (3: a dead worker restarts every worker from the last
# checkpoint), RDZV_ID (q0) may be set as well. The trainers (q0.py, train.py, student.py, variants.py) get
# --resume=True, so the same command starts the run and continues it after any stop. MAX_RESTARTS=0 (no restarts)
# needs an explicit --resume=False to start a run or --resume=True to continue one: torchrun's first attempt may
# resume nothing only when it has restarts (docs/OPERATIONS.md), so this script cannot add it.
set -euo pipefail
: "${NNODES:?set NNODES (nodes in the job)}" "${MASTER_HOST:?set MASTER_HOST (the host of the rendezvous, any one node)}"
[ $# -ge 1 ] || { echo "usage: NNODES=N MASTER_HOST=host $0 q0.py|train.py|student.py|variants.py|eval.py ARGS..." >&2; exit 2; }
cd "$(dirname "$0")/.."
case "$1" in q0.py|train.py|student.py|variants.py)
    if [ "${MAX_RESTARTS:-3}" != 0 ]; then
        set -- "$@" --resume=True
    else
        case " $* " in *" --resume "*|*" --resume="*) ;; *)
            echo "MAX_RESTARTS=0: add --resume=False to start the run or --resume=True to continue it: a new run" \
                 "refuses --resume=True unless torchrun has restarts, so this script cannot add it" >&2; exit 2 ;; esac
    fi ;;
esac
# torchrun keeps one store for every restart attempt and across nodes does not scope its keys by attempt: a fresh
# store per attempt instead (pytorch/pytorch#135712, docs/OPERATIONS.md)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# --shutdown-timeout: on SIGTERM torchrun forwards it and waits this long before SIGKILL; the run checkpoints the
# step it is in first (about half a minute at 1.8B, docs/OPERATIONS.md)
exec torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC_PER_NODE:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_HOST:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-q0}" \
    --max-restarts="${MAX_RESTARTS:-3}" --shutdown-timeout=80 "$@"

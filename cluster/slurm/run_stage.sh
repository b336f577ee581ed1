#!/usr/bin/env bash
# The batch-shell half of a PVEN Slurm job: run one torchrun stage on every node of the
# allocation, turn the preemption signal into a checkpoint, and requeue the job after one.
#
#   bash cluster/slurm/run_stage.sh STAGE [--params FILE] [KEY.PATH=VALUE ...]
#
# Called (exec'd) by cluster/slurm/train_reid.sbatch and cluster/slurm/stage.sbatch; see
# their headers for the #SBATCH options and the README section "torchrun on SLURM nodes".
#
# Signal path (why): Slurm sends USR2 to this shell only (#SBATCH --signal=B:USR2@<grace>).
# A signal sent to the job's processes would reach torchrun, whose default USR2 action
# kills it, and NCCL/torchrun handle TERM in their own ways (torchrun SIGKILLs its workers
# about 30 s after forwarding TERM). So the trap below only creates a stop file on shared
# storage; rank 0 of the training loop looks for it before every step, the answer is
# all-reduced, and every rank finishes the same step, writes a checkpoint and exits 0.
# This shell then sees the ".stopped" marker the stage wrote and runs
# `scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from that checkpoint.
#
# Environment (all optional):
#   PVEN_PROJECT          project checkout on shared storage (default: the submit folder)
#   PVEN_VENV             virtual environment with torchrun (default: $PVEN_PROJECT/.venv)
#   PVEN_NPROC_PER_NODE   processes per node (default: GPUs Slurm gave the node, else 1)
#   PVEN_MAX_RESTARTS     torchrun --max-restarts (default 1): a dead rank restarts the group
#   PVEN_RDZV_TIMEOUT     seconds a node waits for the others / for the endpoint (default 300)
#   PVEN_RDZV_PORT        rendezvous port on the head node (default 20000 + job id % 20000)
#   PVEN_RDZV_HOST        rendezvous address (default: the head node's NodeAddr in Slurm)
#   PVEN_LOG_DIR          logs and stop files (default: $PVEN_PROJECT/logs/slurm)
#   MLFLOW_TRACKING_URI   tracking server every node reaches (default: sqlite in the project)
set -euo pipefail

STAGE=${1:?usage: run_stage.sh STAGE [--params FILE] [KEY.PATH=VALUE ...]}
shift
case "$STAGE" in
  train_reid|masks|evaluate) ;;
  *) echo "error: stage '$STAGE': expected one of the torchrun stages train_reid, masks, evaluate" >&2; exit 2 ;;
esac
: "${SLURM_JOB_ID:?run_stage.sh runs inside a Slurm job (sbatch cluster/slurm/${STAGE}.sbatch)}"

export PVEN_PROJECT=${PVEN_PROJECT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PVEN_PROJECT"
export PVEN_VENV=${PVEN_VENV:-$PVEN_PROJECT/.venv}
export PATH="$PVEN_VENV/bin:$PATH"
export PVEN_LOG_DIR=${PVEN_LOG_DIR:-$PVEN_PROJECT/logs/slurm}
mkdir -p "$PVEN_LOG_DIR"

node_addr() {  # the address Slurm itself reaches a node at (NodeAddr), else its name
  local addr
  addr=$(scontrol show node "$1" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
  echo "${addr:-$1}"
}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export PVEN_HEAD_NODE=$HEAD_NODE
export PVEN_RDZV_HOST=${PVEN_RDZV_HOST:-$(node_addr "$HEAD_NODE")}
export PVEN_RDZV_PORT=${PVEN_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export PVEN_RDZV_TIMEOUT=${PVEN_RDZV_TIMEOUT:-300}
export PVEN_MAX_RESTARTS=${PVEN_MAX_RESTARTS:-1}
export PVEN_NPROC_PER_NODE=${PVEN_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
export PVEN_STOP_FILE="$PVEN_LOG_DIR/stop-$SLURM_JOB_ID"
# A tracking call must fail in seconds, not after MLflow's default minutes of retries: the
# stage then keeps its records locally (python -m pipeline.tracking replay, see README).
export MLFLOW_HTTP_REQUEST_MAX_RETRIES=${MLFLOW_HTTP_REQUEST_MAX_RETRIES:-2}
export MLFLOW_HTTP_REQUEST_TIMEOUT=${MLFLOW_HTTP_REQUEST_TIMEOUT:-20}
rm -f "$PVEN_STOP_FILE" "$PVEN_STOP_FILE.stopped"   # left by the run before a requeue

echo "pven: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} stage $STAGE on $SLURM_JOB_NUM_NODES node(s)" \
     "($SLURM_JOB_NODELIST), $PVEN_NPROC_PER_NODE process(es) each; rendezvous $PVEN_RDZV_HOST:$PVEN_RDZV_PORT" \
     "(timeout ${PVEN_RDZV_TIMEOUT}s); project $PVEN_PROJECT; args: $*"

on_stop_signal() {
  echo "pven: $(date -u +%FT%TZ) stop signal: asking $STAGE to checkpoint and stop ($PVEN_STOP_FILE)"
  touch "$PVEN_STOP_FILE"
}
trap on_stop_signal USR2

# One task per node; node.sh starts torchrun there. In the background so that the trap
# runs at once (bash runs traps only between commands, and `wait` is interruptible).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$PVEN_PROJECT/cluster/slurm/node.sh" "$STAGE" "$@" &
SRUN_PID=$!
set +e
while :; do
  wait "$SRUN_PID"
  status=$?
  # >128: `wait` was interrupted by the trapped signal while the step still runs.
  if [ "$status" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
set -e

if [ -e "$PVEN_STOP_FILE.stopped" ] && [ "$status" -eq 0 ]; then
  echo "pven: $(cat "$PVEN_STOP_FILE.stopped"); requeueing job $SLURM_JOB_ID"
  rm -f "$PVEN_STOP_FILE" "$PVEN_STOP_FILE.stopped"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
rm -f "$PVEN_STOP_FILE"
echo "pven: $STAGE finished with status $status"
exit "$status"

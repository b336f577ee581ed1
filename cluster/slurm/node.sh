#!/usr/bin/env bash
# The per-node half of a PVEN Slurm job (one srun task per node, started by run_stage.sh):
# torchrun with the c10d rendezvous on the head node.
#
# pytorch#73656: c10d decides which node hosts the rendezvous store by comparing the
# endpoint with the local hostname/addresses; on clusters where they do not match (aliases,
# several interfaces) no node hosts it, or two try to. So the host is named explicitly
# (is_host=1 on SLURM_NODEID 0, the first node of `scontrol show hostnames`, whose NodeAddr
# is the endpoint) and each node advertises the address Slurm reaches it at (--local_addr).
# join_timeout / read_timeout bound the wait for a node that never comes and for an
# endpoint nobody serves: torchrun then exits with RendezvousTimeoutError /
# RendezvousConnectionError instead of waiting.
set -uo pipefail
STAGE=$1
shift
IS_HOST=0
[ "${SLURM_NODEID:-0}" = 0 ] && IS_HOST=1
ADDR=$(scontrol show node "${SLURMD_NODENAME:-$(hostname -s)}" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
ADDR=${PVEN_LOCAL_ADDR:-${ADDR:-$(hostname)}}
# Threads per process: the CPUs Slurm gave this task, shared by its processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-1} / PVEN_NPROC_PER_NODE > 0 ? ${SLURM_CPUS_ON_NODE:-1} / PVEN_NPROC_PER_NODE : 1 ))}
LOGS="$PVEN_LOG_DIR/$SLURM_JOB_ID/attempt${SLURM_RESTART_COUNT:-0}/node${SLURM_NODEID:-0}"
mkdir -p "$LOGS"
started=$(date +%s)
torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$PVEN_NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$PVEN_RDZV_HOST:$PVEN_RDZV_PORT" --rdzv_id "pven-$SLURM_JOB_ID" \
  --rdzv_conf "join_timeout=$PVEN_RDZV_TIMEOUT,read_timeout=$PVEN_RDZV_TIMEOUT,is_host=$IS_HOST" \
  --local_addr "$ADDR" --max-restarts "$PVEN_MAX_RESTARTS" --log-dir "$LOGS" --tee 3 \
  "$PVEN_PROJECT/stages/$STAGE.py" "$@"
status=$?
if [ "$status" -ne 0 ]; then
  echo "pven: node ${SLURM_NODEID:-0} ($ADDR): torchrun exited $status after $(( $(date +%s) - started )) s;" \
       "rendezvous $PVEN_RDZV_HOST:$PVEN_RDZV_PORT (is_host=$IS_HOST, timeout ${PVEN_RDZV_TIMEOUT}s);" \
       "per-rank logs in $LOGS" >&2
fi
exit "$status"

#!/usr/bin/env bash
#SBATCH --job-name=jaxtune
#SBATCH --nodes=2                 # hosts; override with `sbatch --nodes=N`
#SBATCH --ntasks-per-node=1       # one jaxtune process per node drives all its GPUs
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32        # data workers and the host side of the input pipeline
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300         # SIGTERM to the tasks 5 min before the time limit
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued job appends to its log
#SBATCH --output=%x-%j.out
#
# jaxtune under SLURM, e.g. 2 nodes x 8 GPUs:
#
#   sbatch --nodes=2 scripts/launch_slurm.sh --config=configs/sft_qwen3_8b.py \
#       --config.work_dir=/shared/runs/qwen3-8b
#
# srun starts one process per node; each reads SLURM_PROCID / SLURM_NTASKS and connects to the
# coordinator on the first node (JAXTUNE_COORDINATOR_ADDRESS, set below). Every start passes
# --config.auto_resume=True (JAXTUNE_AUTO_RESUME=0: not), so a requeued job continues from its
# newest checkpoint. When the
# time limit nears, SLURM sends SIGTERM: jaxtune checkpoints the current step and exits 75;
# this script then requeues the job (scontrol requeue), unless JAXTUNE_REQUEUE=0. Any other
# exit code (0 finished, 2 configuration error, 1 error: a failure on one node stops all) is
# the job's. work_dir must be on a file system every node shares.
#
# Environment: PYTHON (interpreter, default python), JAXTUNE_COORDINATOR_PORT (default JAX's
# choice, 61440 + job id % 4096), JAXTUNE_DRY_RUN=1 (print the srun command, one argument per
# line, and the coordinator, instead of running). NCCL reads its own variables (e.g.
# NCCL_SOCKET_IFNAME, NCCL_IB_HCA) from the environment sbatch passes on.
set -uo pipefail

: "${SLURM_JOB_ID:?launch_slurm.sh runs inside a SLURM job: submit it with sbatch}"
first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
[[ -n $first_node ]] || { echo "launch_slurm.sh: no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 2; }
port=${JAXTUNE_COORDINATOR_PORT:-$(( SLURM_JOB_ID % 4096 + 61440 ))}
export JAXTUNE_COORDINATOR_ADDRESS=${JAXTUNE_COORDINATOR_ADDRESS:-$first_node:$port}

# --kill-on-bad-exit=0: jaxtune stops every node itself on a failure; srun killing the others
# the moment one exits would turn a clean exit 75 (checkpoint written) into a kill.
# auto_resume after the recipe's own flags (ml_collections wants --config= first).
resume=(); [[ ${JAXTUNE_AUTO_RESUME:-1} == 1 ]] && resume=(--config.auto_resume=True)
cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=0
     "${PYTHON:-python}" -m jaxtune.main --distributed=slurm "$@" "${resume[@]}")

if [[ ${JAXTUNE_DRY_RUN:-0} == 1 ]]; then
  echo "JAXTUNE_COORDINATOR_ADDRESS=$JAXTUNE_COORDINATOR_ADDRESS"
  printf '%s\n' "${cmd[@]}"
  exit 0
fi

"${cmd[@]}"
rc=$?
if [[ $rc -eq 75 && ${JAXTUNE_REQUEUE:-1} == 1 ]]; then
  echo "launch_slurm.sh: preempted after a checkpoint (exit 75): requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc

#!/usr/bin/env bash
# One jaxtune process per node, started by hand (or by any tool that runs a command per node).
# Run the same command on every node, changing NODE_RANK only (torchrun's variable names):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     scripts/launch_nodes.sh --config=configs/sft_qwen3_8b.py --config.auto_resume=True
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     scripts/launch_nodes.sh --config=configs/sft_qwen3_8b.py --config.auto_resume=True
#
# MASTER_ADDR: a name or IP of node 0 that every node can reach; MASTER_PORT: a free TCP port
# on it (JAX's coordinator). Each process uses all GPUs of its node. With NNODES=1 (the
# default) it is a plain single-process run. Extra arguments go to `python -m jaxtune.main`.
# The exit code is jaxtune's: 0 finished, 75 preempted with a checkpoint (start it again with
# --config.auto_resume=True), 2 configuration error, 1 other errors (a failure on any node
# stops every node). PYTHON picks the interpreter; JAXTUNE_DRY_RUN=1 prints the command, one
# argument per line, instead of running it.
set -euo pipefail

nnodes=${NNODES:-1}
rank=${NODE_RANK:-0}
fail() { echo "launch_nodes.sh: $*" >&2; exit 2; }
[[ $nnodes =~ ^[0-9]+$ && $nnodes -ge 1 ]] || fail "NNODES must be a positive number, got '$nnodes'"
[[ $rank =~ ^[0-9]+$ && $rank -lt $nnodes ]] || fail "NODE_RANK must be 0..$((nnodes - 1)), got '$rank'"

cmd=("${PYTHON:-python}" -m jaxtune.main)
if (( nnodes > 1 )); then
  [[ -n ${MASTER_ADDR:-} ]] || fail "set MASTER_ADDR to node 0's address (reachable from every node)"
  port=${MASTER_PORT:-29500}
  cmd+=(--coordinator_address="$MASTER_ADDR:$port" --num_processes="$nnodes" --process_id="$rank")
fi
cmd+=("$@")

if [[ ${JAXTUNE_DRY_RUN:-0} == 1 ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"

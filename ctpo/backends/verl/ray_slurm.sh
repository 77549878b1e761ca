#!/usr/bin/env bash
# Start a Ray cluster over the nodes of the current SLURM allocation, run a command on it, tear it down.
#
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=64 --exclusive --wrap \
#     "ctpo/backends/verl/ray_slurm.sh ctpo train --config results/paper/config.resolved.yaml \
#        --model qwen3-14b --method ctpo --seed 0 --base Qwen/Qwen3-14B --out results/paper/runs/qwen3-14b/ctpo/s0"
#
# The first node runs the Ray head, every other node a Ray worker (one `srun --overlap` step each, holding
# that node's GPUs); the command then runs on the batch host (the first node) with RAY_ADDRESS pointing at
# the head, so `python -m verl.trainer.main_ppo` joins this cluster instead of starting its own, and
# CTPO_VERL_NNODES / CTPO_VERL_GPUS_PER_NODE telling `ctpo train --backend verl` the allocation's shape.
#
# Environment knobs: CTPO_RAY_PORT (6379), CTPO_RAY_START_TIMEOUT_S (300), CTPO_RAY_TMPDIR (Ray's temp dir;
# default /tmp/ray_$SLURM_JOB_ID, keep it short: Ray's socket paths are length-limited).
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 COMMAND [ARGS...]   (inside a SLURM allocation)" >&2
  exit 2
fi
: "${SLURM_JOB_ID:?$0 must run inside a SLURM allocation (sbatch / salloc)}"
command -v ray >/dev/null || { echo "$0: 'ray' is not on PATH; install the verl extra (pip install -e '.[verl]')" >&2; exit 2; }

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
n_nodes=${#nodes[@]}
port=${CTPO_RAY_PORT:-6379}
gpus=${SLURM_GPUS_ON_NODE:-${CTPO_VERL_GPUS_PER_NODE:-8}}
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
timeout_s=${CTPO_RAY_START_TIMEOUT_S:-300}
tmpdir=${CTPO_RAY_TMPDIR:-/tmp/ray_${SLURM_JOB_ID}}

head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="${head_ip}:${port}"
echo "ray_slurm: ${n_nodes} node(s) [${nodes[*]}], head ${head_node} (${RAY_ADDRESS}), ${gpus} GPUs and ${cpus} CPUs per node"

pids=()
cleanup() {
  for node in "${nodes[@]}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" ray stop --force >/dev/null 2>&1 || true
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

srun --overlap --nodes=1 --ntasks=1 -w "$head_node" \
  ray start --head --node-ip-address="$head_ip" --port="$port" --num-gpus="$gpus" --num-cpus="$cpus" \
  --temp-dir="$tmpdir" --block &
pids+=($!)

wait_for_nodes() {  # until $1 nodes are alive, or the timeout
  local want=$1 deadline=$((SECONDS + timeout_s)) alive
  while (( SECONDS < deadline )); do
    alive=$(python - "$RAY_ADDRESS" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
    if (( alive >= want )); then echo "ray_slurm: ${alive}/${want} node(s) up"; return 0; fi
    sleep 5
  done
  echo "ray_slurm: only ${alive:-0}/${want} Ray node(s) came up within ${timeout_s}s" >&2
  return 1
}

wait_for_nodes 1
for node in "${nodes[@]:1}"; do
  srun --overlap --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$RAY_ADDRESS" --num-gpus="$gpus" --num-cpus="$cpus" --block &
  pids+=($!)
done
wait_for_nodes "$n_nodes"

export CTPO_VERL_NNODES=$n_nodes CTPO_VERL_GPUS_PER_NODE=$gpus
set +e
"$@"
rc=$?
set -e
echo "ray_slurm: command exited with status ${rc}"
exit "$rc"

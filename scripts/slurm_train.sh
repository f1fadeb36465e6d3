#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each running a torchrun agent for that node's GPUs.
#
#   sbatch --nodes 4 --gres gpu:8 scripts/slurm_train.sh --config examples/shapes_world/configs/shapes_dit.yaml \
#       distributed.backend=ddp
#
# The first node of the allocation hosts the c10d rendezvous; every argument goes to scripts/train.py.
# GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8) and RDZV_PORT (default 29500) can be overridden.
#SBATCH --job-name=t2v-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RDZV_PORT=${RDZV_PORT:-29500}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export T2V_DIST_TIMEOUT_MINUTES=${T2V_DIST_TIMEOUT_MINUTES:-30}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

LAUNCH=(torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE"
        --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID")

# 1. check the allocation in seconds (reachability, GPUs, identical config everywhere, all-reduce speed)
srun --ntasks-per-node 1 "${LAUNCH[@]}" scripts/check_cluster.py "$@"
# 2. train
srun --ntasks-per-node 1 "${LAUNCH[@]}" scripts/train.py "$@"

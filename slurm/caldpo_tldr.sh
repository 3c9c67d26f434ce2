#!/bin/bash
# Cal-DPO on TL;DR comparisons (Pythia-2.8B from its SFT run), beta 0.001.
#
# Usage: slurm/submit.sh [sbatch options] slurm/caldpo_tldr.sh [key=value trainer overrides]
#        (checks the partition's GPUs and the trainer's options, then runs sbatch with these arguments;
#        plain `sbatch [sbatch options] slurm/caldpo_tldr.sh ...` works too, checked when the job starts)
# e.g.   slurm/submit.sh -N 2 slurm/caldpo_tldr.sh batch_size=128 lr=1e-6
#        CALDPO_CPU=1 slurm/submit.sh slurm/caldpo_tldr.sh ...   # CPU nodes (no GPUs)
# sbatch options override the #SBATCH lines; see slurm/README.md for the
# environment variables (NPROC_PER_NODE, RUN_DIR, PYTHON, ...).
#SBATCH --job-name=caldpo_tldr
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x_%j.out

# The SFT policy to start from (and use as reference): SFT_ARCHIVE=<sft run>/LATEST/policy.pt
CALDPO_NEEDS_ARCHIVE=1
CALDPO_RUN_NAME=caldpo_tldr
DEFAULTS=(
    "exp_name=${SLURM_JOB_NAME:-caldpo_tldr}"
    model=pythia28
    ${SFT_ARCHIVE:+"model.archive=$SFT_ARCHIVE"}
    "datasets=[tldr]"
    loss=caldpo
    loss.beta=0.001
    trainer=FSDPTrainer
    model.fsdp_policy_mp=bfloat16
    batch_size=64
    gradient_accumulation_steps=2
    eval_batch_size=32
    sample_during_eval=false
)

# sbatch runs a copy of this file from its spool dir: find the repository from
# $CALDPO_HOME, the submitted script's path, the submit dir, or this file.
for CALDPO_HOME in "${CALDPO_HOME:-}" \
    "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." \
    "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
    [ -f "$CALDPO_HOME/slurm/common.sh" ] && break
done
CALDPO_HOME=$(cd "$CALDPO_HOME" && pwd)
# shellcheck source=slurm/common.sh
source "$CALDPO_HOME/slurm/common.sh" || { echo "slurm/common.sh not found: set CALDPO_HOME" >&2; exit 2; }
caldpo_main "$@"

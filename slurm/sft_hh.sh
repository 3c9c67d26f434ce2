#!/bin/bash
# SFT of Pythia-2.8B on Anthropic HH (the reference model of caldpo_hh.sh).
#
# Usage: slurm/submit.sh [sbatch options] slurm/sft_hh.sh [key=value trainer overrides]
#        (checks the partition's GPUs and the trainer's options, then runs sbatch with these arguments;
#        plain `sbatch [sbatch options] slurm/sft_hh.sh ...` works too, checked when the job starts)
# e.g.   slurm/submit.sh -N 2 slurm/sft_hh.sh batch_size=128 lr=1e-6
#        CALDPO_CPU=1 slurm/submit.sh slurm/sft_hh.sh ...   # CPU nodes (no GPUs)
# sbatch options override the #SBATCH lines; see slurm/README.md for the
# environment variables (NPROC_PER_NODE, RUN_DIR, PYTHON, ...).
#SBATCH --job-name=sft_hh
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

CALDPO_RUN_NAME=sft_hh
DEFAULTS=(
    "exp_name=${SLURM_JOB_NAME:-sft_hh}"
    model=pythia28
    "datasets=[hh]"
    loss=sft
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

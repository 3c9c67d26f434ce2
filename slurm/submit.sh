#!/bin/bash
# Submit one of the run scripts the way sbatch does, after the checks sbatch cannot make:
#
#   slurm/submit.sh [sbatch options] slurm/<script>.sh [key=value trainer overrides]
#   e.g. SFT_ARCHIVE=runs/sft_tldr_123/LATEST/policy.pt slurm/submit.sh -N 2 slurm/caldpo_tldr.sh lr=1e-6
#        CALDPO_CPU=1 slurm/submit.sh slurm/sft_hh.sh model=tiny 'datasets=[sample]'   # a cluster without GPUs
#
# Before anything is queued: the partition (-p, $SBATCH_PARTITION, the script's #SBATCH line, or the
# cluster's default) must have the GPUs per node the job asks for (--gpus-per-node, $SBATCH_GPUS_PER_NODE
# or the script's #SBATCH line; other GPU options are not read), else Slurm would leave it pending forever;
# the script's SFT_ARCHIVE rule must hold, and the trainer's preflight must pass the final command line
# (the script's defaults merged with yours) for the job's world size: unknown or misspelt keys, bad
# values, missing archive or data paths. A refusal prints one `caldpo: ...` line and exits 2, and no job
# exists. Then sbatch runs with exactly your arguments (its output and exit status are this script's).
#
# CALDPO_CPU=1: run on CPU nodes. sbatch also gets --gpus-per-node=0 and --cpus-per-task=<the
# partition's CPUs per node> (yours win), and the trainer device=cpu model.fsdp_policy_mp=null.
# PYTHON: the interpreter the checks (and the job) run, as for the scripts (default python3).
set -uo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

opts=() script="" overrides=()
while [ $# -gt 0 ]; do
    if [ -z "$script" ] && [[ $1 == *.sh ]] && [ -f "$1" ]; then
        script=$1
    elif [ -z "$script" ]; then
        opts+=("$1")
    else
        overrides+=("$1")
    fi
    shift
done
[ -n "$script" ] || usage
case $(basename "$script") in common.sh|submit.sh) echo "caldpo: $script is not a run script" >&2; exit 2 ;; esac

# The value of an sbatch option (last one wins, as in sbatch): opt_value <long> <short or ->
opt_value() {
    local long=$1 short=$2 i value=""
    for ((i = 0; i < ${#opts[@]}; i++)); do
        case ${opts[i]} in
            "$long"=*) value=${opts[i]#*=} ;;
            "$long") value=${opts[i + 1]:-} ;;
            "$short") [ "$short" != - ] && value=${opts[i + 1]:-} ;;
            "$short"?*) [ "$short" != - ] && value=${opts[i]#"$short"} ;;
        esac
    done
    printf '%s' "$value"
}
# The value of a #SBATCH line of the script.
script_value() { sed -n "s/^#SBATCH $1=\(.*\)/\1/p" "$script" | tail -n1; }

partition=$(opt_value --partition -p)
partition=${partition:-${SBATCH_PARTITION:-$(script_value --partition)}}
nodes=$(opt_value --nodes -N)
nodes=${nodes:-$(script_value --nodes)}
nodes=${nodes%%-*}
gpus=$(opt_value --gpus-per-node -)
gpus=${gpus:-${SBATCH_GPUS_PER_NODE:-}}

cpu=()
if [ "${CALDPO_CPU:-0}" = 1 ]; then
    if [ -z "$gpus" ]; then cpu+=(--gpus-per-node=0); gpus=0; fi
    if [ -z "$(opt_value --cpus-per-task -c)" ]; then
        ncpu=$(sinfo -h ${partition:+-p "$partition"} -o %c 2>/dev/null | sort -n | head -n1)
        [[ ${ncpu:-} =~ ^[0-9]+$ ]] && cpu+=(--cpus-per-task="$ncpu")
    fi
fi
gpus=${gpus:-$(script_value --gpus-per-node)}
gpus=${gpus##*:}
[[ ${gpus:-} =~ ^[0-9]+$ ]] || gpus=0

CALDPO_PREFLIGHT=1 CALDPO_SUBMIT_NODES=${nodes:-1} CALDPO_SUBMIT_GPUS=$gpus CALDPO_SUBMIT_PARTITION=$partition \
    bash "$script" "${overrides[@]}" || exit $?

# Slurm does not create the directory of --output: a job whose log cannot be opened fails with no log.
out=$(opt_value --output -o)
out=${out:-$(script_value --output)}
case $out in */*) mkdir -p "$(dirname "$out")" ;; esac

exec sbatch "${cpu[@]}" "${opts[@]}" "$script" "${overrides[@]}"

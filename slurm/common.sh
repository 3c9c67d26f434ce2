# Shared body of slurm/*.sh (sourced, not submitted): merges the run's default
# overrides with the command line, launches one torchrun per node through srun,
# and turns a time-limit / preemption signal into a checkpoint + requeue.
#
# Inputs: DEFAULTS (array of key=value trainer overrides set by the run script),
# the run script's arguments (key=value overrides, they win over DEFAULTS), and
# these environment variables, all optional:
#   NPROC_PER_NODE   processes per node (default: GPUs on the node, else 1)
#   RUN_DIR          run directory (default runs/<job name>_<job id>; a run_dir=
#                    override on the command line wins)
#   PYTHON           interpreter (default python3)
#   MASTER_PORT      rendezvous port (default derived from the job id)
#   SRUN_ARGS, TORCHRUN_ARGS   extra words for srun / torchrun
#   CALDPO_TRAIN_MODULE        module torchrun runs (default caldpo.train)
#   CALDPO_CPU=1               CPU nodes: device=cpu model.fsdp_policy_mp=null join the defaults
#                              (slurm/submit.sh also asks Slurm for no GPUs)
#   CALDPO_DRY_RUN=1           print the launch command instead of running it
#   CALDPO_PREFLIGHT=1         (slurm/submit.sh) run the submission checks of the final command
#                              line (caldpo.launch --check-only) and launch nothing; with
#                              CALDPO_SUBMIT_NODES, CALDPO_SUBMIT_GPUS, CALDPO_SUBMIT_PARTITION
#
# Before torchrun starts, the trainer's preflight checks the final command line on this node
# (python -m caldpo.train --preflight): a bad option or path ends the job with one `caldpo: ...`
# line and exit status 2, not a traceback from every worker.

caldpo_log() { echo "[caldpo $(date +%H:%M:%S)] $*"; }

# Key of an override: "+a.b=1", "++a.b=1", "~a.b" and "a.b=1" all name a.b.
_caldpo_key() { local k=${1%%=*}; k=${k#"~"}; k=${k#"++"}; k=${k#"+"}; echo "$k"; }

caldpo_main() {
    local -a user=("$@") merged=()
    local -A given=()
    local o
    if [ "${CALDPO_CPU:-0}" = 1 ]; then
        # CPU nodes: the CPU device and no bf16 mixed precision (emulated, slow on CPUs), in place of the
        # script's GPU defaults; the command line still wins.
        local -a cpu=(device=cpu model.fsdp_policy_mp=null) kept=()
        for o in "${DEFAULTS[@]}"; do
            case $(_caldpo_key "$o") in device|model.fsdp_policy_mp) ;; *) kept+=("$o") ;; esac
        done
        DEFAULTS=("${kept[@]}" "${cpu[@]}")
    fi
    for o in "${user[@]}"; do given[$(_caldpo_key "$o")]=1; done
    # Defaults whose key the user set are dropped: a Hydra command line may not
    # name one key twice.
    for o in "${DEFAULTS[@]}"; do [ -n "${given[$(_caldpo_key "$o")]:-}" ] || merged+=("$o"); done
    merged+=("${user[@]}")

    local job_name=${SLURM_JOB_NAME:-${CALDPO_RUN_NAME:-caldpo}}
    local job_id=${SLURM_JOB_ID:-local}
    RUN_DIR=${RUN_DIR:-runs/${job_name}_${job_id}}
    local -a final=()
    for o in "${merged[@]}"; do
        if [ "$(_caldpo_key "$o")" = run_dir ]; then RUN_DIR=${o#*=}; else final+=("$o"); fi
    done
    case $RUN_DIR in /*) ;; *) RUN_DIR=$PWD/$RUN_DIR ;; esac
    final+=("run_dir=$RUN_DIR")

    if _caldpo_needs_archive "${final[@]}"; then
        echo "caldpo: this run starts from an SFT model: set SFT_ARCHIVE=<sft run dir>/LATEST/policy.pt" \
             "or pass model.archive=<path> (model.archive=null to start from the base model)" >&2
        return 2
    fi

    local python=${PYTHON:-python3}
    local root=${CALDPO_HOME:-}
    [ -n "$root" ] && export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    if [ "${CALDPO_PREFLIGHT:-0}" = 1 ]; then
        _caldpo_submission_checks "$python" "${final[@]}"
        return
    fi

    local nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    gpus=${gpus##*:}; gpus=${gpus%%(*}
    [[ $gpus =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ] || gpus=1
    local nproc=${NPROC_PER_NODE:-$gpus}
    local port=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}
    local head
    if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
        head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    else
        head=${SLURM_JOB_NODELIST:-localhost}
    fi

    local -a cmd=()
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # One torchrun per node; torchrun starts the node's workers.
        cmd+=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
        [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        # shellcheck disable=SC2206
        cmd+=(${SRUN_ARGS:-})
    fi
    cmd+=("$python" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc"
          --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$job_id" --max_restarts=0)
    # shellcheck disable=SC2206
    cmd+=(${TORCHRUN_ARGS:-} -m "${CALDPO_TRAIN_MODULE:-caldpo.train}" "${final[@]}")

    caldpo_log "job=$job_id name=$job_name nodes=$nnodes nproc_per_node=$nproc" \
               "restarts=${SLURM_RESTART_COUNT:-0} run_dir=$RUN_DIR"
    if [ -n "${CALDPO_DRY_RUN:-}" ] && [ "${CALDPO_DRY_RUN}" != 0 ]; then
        printf 'DRY RUN:'; printf ' %q' "${cmd[@]}"; printf '\n'
        return 0
    fi
    if [ "${CALDPO_TRAIN_MODULE:-caldpo.train}" = caldpo.train ]; then
        _caldpo_run_check "$python" -m caldpo.train --preflight --world-size="$((nnodes * nproc))" "${final[@]}" \
            || return
    fi
    printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'

    mkdir -p "$RUN_DIR"
    # A STOP left by a previous incarnation of this job (killed before it could
    # clean up) would stop the resumed run at once.
    rm -f "$RUN_DIR/STOP"
    STOP_SIGNAL=""
    trap '_caldpo_stop USR1' USR1
    trap '_caldpo_stop TERM' TERM
    trap '_caldpo_stop INT' INT

    "${cmd[@]}" &
    local pid=$! rc
    while :; do
        wait "$pid"; rc=$?
        # wait returns >128 when a trapped signal interrupts it: keep waiting.
        if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1 TERM INT

    if [ -e "$RUN_DIR/DONE" ]; then
        caldpo_log "finished: $RUN_DIR/DONE"
        return 0
    fi
    rm -f "$RUN_DIR/STOP"
    if [ "$STOP_SIGNAL" = USR1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        # Time limit ahead (--signal=B:USR1@...): the trainer has checkpointed;
        # requeue keeps the job id, so the rerun resumes from the same run dir.
        caldpo_log "trainer stopped (rc=$rc); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && return 0
        caldpo_log "scontrol requeue failed"
        return 1
    fi
    if [ -n "$STOP_SIGNAL" ]; then
        # TERM comes from scancel, preemption or `scontrol requeue`: Slurm itself
        # decides whether the job comes back, so do not requeue here.
        caldpo_log "trainer stopped on SIG$STOP_SIGNAL (rc=$rc), checkpoint in $RUN_DIR/checkpoints"
        return 143
    fi
    caldpo_log "trainer exited rc=$rc without $RUN_DIR/DONE"
    [ "$rc" -ne 0 ] && return "$rc"
    return 1
}

_caldpo_stop() {
    [ -n "$STOP_SIGNAL" ] || STOP_SIGNAL=$1
    caldpo_log "SIG$1: asking the trainer to checkpoint and stop ($RUN_DIR/STOP)"
    mkdir -p "$RUN_DIR" && touch "$RUN_DIR/STOP"
}

# Runs a check (python -m caldpo...); 0 passes, 2 is a refusal its one `caldpo:` line explains,
# anything else means the check itself could not run (no caldpo in that interpreter, ...).
_caldpo_run_check() {
    local python=$1 rc
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
        echo "caldpo: the preflight could not run under $python (exit $rc): set PYTHON to the python of the" \
             "environment caldpo is installed in" >&2
        return 2
    fi
    return "$rc"
}

# slurm/submit.sh's checks before sbatch: the partition has the GPUs asked and the trainer's preflight of
# the final command line for the job's world size (no device checks: this is not the job's node).
_caldpo_submission_checks() {
    local python=$1; shift
    local nodes=${CALDPO_SUBMIT_NODES:-1} gpus=${CALDPO_SUBMIT_GPUS:-0}
    local tasks=${NPROC_PER_NODE:-$gpus}
    [ "$tasks" -gt 0 ] 2>/dev/null || tasks=1
    local -a args=(--check-only --nodes "$nodes" --gpus-per-node "$gpus" --tasks-per-node "$tasks"
                   --cpu-hint "CALDPO_CPU=1 slurm/submit.sh [sbatch options] <script> ... (slurm/README.md)")
    [ -n "${CALDPO_SUBMIT_PARTITION:-}" ] && args+=(--partition "$CALDPO_SUBMIT_PARTITION")
    _caldpo_run_check "$python" -m caldpo.launch "${args[@]}" -- "$@"
}

# True when the command line leaves model.archive unset or empty.
_caldpo_needs_archive() {
    [ -n "${CALDPO_NEEDS_ARCHIVE:-}" ] || return 1
    local o
    for o in "$@"; do
        if [ "$(_caldpo_key "$o")" = model.archive ]; then [ -z "${o#*=}" ]; return; fi
    done
    return 0
}

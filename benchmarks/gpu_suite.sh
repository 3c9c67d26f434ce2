#!/usr/bin/env bash
# GPU suite, one call on a CUDA machine without internet (at most SUITE_BUDGET_S = 570 s: inside one
# 600-s device command, and with the machine's start inside a 15-minute lease):
#   1. install the benchmark peers from benchmarks/wheels/ (benchmarks/fetch_wheels.sh)
#   2. make caldpo importable (PYTHONPATH to this checkout)
#   3. kernel tests on CUDA: tests/test_kernels/test_cuda.py and test_triton.py (compiled Triton)
#   4. profile_head.py: the fused head's forward and backward apart, per backend
#   5. bench_logprob_loss.py at Pythia shapes, bf16, with its peers
#   6. bench_train.py: the real trainer, fused head vs materialised logits
#   7. bench_e2e.py --stage gpu: the whole trainer against TRL's DPOTrainer at Pythia-2.8B and
#      1.4B shapes (Cal-DPO, FSDP2 bf16, prefix_shared and padded layouts), up to E2E_TIMEOUT_S
#      (360 s), reserved from the start: stages 3-6 share the rest of the budget (about 210 s)
# Each stage is time-boxed so that one failure does not eat the budget. SUITE_BUDGET_S was 480 before
# stage 7; it is 570 now, and with stage 7 the kernel tests get TESTS_TIMEOUT_S = 100 s instead of 280
# (run STAGES="tests profile bench train" SUITE_BUDGET_S=480 for stages 3-6 at their old depth, or
# STAGES=e2e for stage 7 alone, about 6.5 minutes).
# Results: $OUT/gpu_results.json, $OUT/gpu_table.txt, $OUT/suite.log, $OUT/e2e_gpu.{json,md}
# ($OUT defaults to benchmarks/results/gpu_run; stage 7 also writes benchmarks/results/<machine>_<date>/);
# copies go to --dest DIR if given. At most 8 files are written to $OUT (what a lent machine returns).
# Knobs (env): STAGES (tests profile bench train e2e; the environment and the peers always run),
#              SUITE_BUDGET_S (570), TESTS_TIMEOUT_S (280, or 100 with stage 7; shared by the test files),
#              PER_TEST_TIMEOUT_S (90), TESTS (the two CUDA test files, run one stage each), TEST_ARGS (extra
#              pytest args), BENCH_ARGS (extra args), OURS_BACKENDS (auto), SHAPES (cuda), DEVICE (cuda),
#              E2E_TIMEOUT_S (360), E2E_ARGS (extra bench_e2e.py args, e.g. "--shapes pythia-1.4b").
# A CPU dry run of the plumbing:
#   DEVICE=cpu SHAPES=quick TESTS=tests/test_benchmarks.py TEST_ARGS="-k parse_shape" bash benchmarks/gpu_suite.sh
# (stages 4 and 6 run on CUDA only; stage 7 runs its CPU dry run there).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dest=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) dest="$2"; shift 2 ;;
        *) echo "usage: $0 [--dest DIR]" >&2; exit 2 ;;
    esac
done
out="${OUT:-$repo/benchmarks/results/gpu_run}"
mkdir -p "$out"
log="$out/suite.log"
: > "$log"
budget="${SUITE_BUDGET_S:-570}"
start=$SECONDS
stages=" ${STAGES:-tests profile bench train e2e} "
want() { [[ "$stages" == *" $1 "* ]]; }
# stage 7's time, kept back from the stages before it (CUDA only)
reserve=0
want e2e && [ "${DEVICE:-cuda}" = cuda ] && reserve="${E2E_TIMEOUT_S:-360}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export TRITON_PRINT_AUTOTUNING=1  # the chosen backward tile goes into the log

left() { echo $(( budget - (SECONDS - start) - reserve )); }
# stage NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, time left - 10 s).
stage() {
    local name="$1" cap="$2"; shift 2
    local t; t=$(left); t=$(( t - 10 < cap ? t - 10 : cap ))
    if [ "$t" -le 5 ]; then
        echo "== $name: skipped (suite budget spent)" | tee -a "$log"; return 124
    fi
    echo "== $name (timeout ${t}s, $(( SECONDS - start ))s into the suite)" | tee -a "$log"
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $(( SECONDS - start ))s" | tee -a "$log"
    return "$rc"
}

stage "environment" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
    $py -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"

# 1. peers: pure-Python wheels, no dependencies fetched (torch and triton are there). A wheel tagged for
#    one Python version (multiprocess: py312) is installed only by that Python (pip refuses the whole list).
site=/tmp/caldpo_bench_site
pytag=$("$py" -c 'import sys; print("py%d%d" % sys.version_info[:2])' 2>/dev/null)
wheels=()
for w in benchmarks/wheels/*.whl; do
    [ -f "$w" ] || continue
    case "$(basename "$w")" in
        *-py3[0-9]*-none-any.whl) [[ "$(basename "$w")" == *"-$pytag-"* ]] && wheels+=("$w") ;;
        *) wheels+=("$w") ;;
    esac
done
if [ "${#wheels[@]}" -gt 0 ]; then
    stage "install peers" 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheels[@]}" \
        && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "== install peers: no wheels in benchmarks/wheels (run benchmarks/fetch_wheels.sh and carry the folder);" \
         "the benchmark records missing peers" | tee -a "$log"
fi

# 2. caldpo itself, from this checkout (nothing is written into the machine's Python).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# 3. kernel tests on the GPU: the CUDA cases, then the Triton cases compiled (no interpreter),
#    as two stages so that a slow second file cannot hide the first one's failure report;
#    -s prints each case's errors as it runs (kept in the log even if the stage is cut off).
per_test=""
"$py" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=${PER_TEST_TIMEOUT_S:-90}"
tests_rc=0
tests_cap="${TESTS_TIMEOUT_S:-$([ "$reserve" -gt 0 ] && echo 100 || echo 280)}"
want tests || test_files_skip=1
# shellcheck disable=SC2206
test_files=(${TESTS:-tests/test_kernels/test_cuda.py tests/test_kernels/test_triton.py})
[ -n "${test_files_skip:-}" ] && test_files=()
for i in "${!test_files[@]}"; do
    f="${test_files[$i]}"
    # a file with others after it gets up to 4/5 of what is left (on an H100 test_cuda.py needs
    # about 210 s, 46 s of them autotuning); the last file gets all of it
    cap=$tests_cap; [ "$i" -lt $(( ${#test_files[@]} - 1 )) ] && cap=$(( tests_cap * 4 / 5 ))
    t0=$SECONDS
    # shellcheck disable=SC2086
    stage "kernel tests $f" "$cap" "$py" -m pytest "$f" -v -s -rfEs -p no:cacheprovider --durations=5 $per_test \
        ${TEST_ARGS:-} \
        || tests_rc=$?
    tests_cap=$(( tests_cap - (SECONDS - t0) ))
done

# 4. the fused head's forward and backward apart, per backend (cheap; tells which phase is slow).
want profile && [ "${DEVICE:-cuda}" = cuda ] && stage "head profile" "${PROFILE_TIMEOUT_S:-60}" "$py" benchmarks/profile_head.py \
    --json "$out/profile_head.json" | tee "$out/profile_head.txt"

# 5. the micro-benchmark with its peers, leaving TRAIN_RESERVE_S for stage 6; it stops starting
#    new work 40 s before its own timeout and writes its JSON after every shape.
bench_rc=0
bench_txt="$(mktemp)"  # the stage's output (in suite.log too); $OUT keeps the table
if want bench; then
    t=$(( $(left) - ${TRAIN_RESERVE_S:-80} ))
    # shellcheck disable=SC2086
    stage "benchmark" "$t" "$py" benchmarks/bench_logprob_loss.py --device "${DEVICE:-cuda}" --shapes ${SHAPES:-cuda} \
        --ours-backends "${OURS_BACKENDS:-auto}" --budget-s $(( t - 40 > 30 ? t - 40 : 30 )) \
        --json "$out/gpu_results.json" ${BENCH_ARGS:-} | tee "$bench_txt"
    bench_rc=${PIPESTATUS[0]}
fi
# The table is what follows the last blank-line-led '# ' header line of the output.
awk '/^# /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$bench_txt" > "$out/gpu_table.txt"
rm -f "$bench_txt"

# 6. the real trainer on the GPU (Triton head, FSDP2 bf16): fused vs materialised logits.
want train && [ "${DEVICE:-cuda}" = cuda ] && stage "train e2e" "${TRAIN_TIMEOUT_S:-80}" "$py" benchmarks/bench_train.py --device cuda \
    --hidden 1024 --layers 2 --heads 16 --vocab 50304 --batch-size 16 --max-length 256 --steps 8 --warmup 3 \
    --json "$out/train_cuda.json"

# 7. the whole trainer against TRL at Pythia-2.8B and 1.4B shapes (bench_e2e.py --stage gpu): its own time
#    box a little inside the stage's timeout, results written after every column, an OOM or a column that
#    no longer fits recorded as such; the JSON and table go to $OUT and benchmarks/results/<machine>_<date>/.
#    With DEVICE=cpu it is the same code's CPU dry run (tiny shape, fp32; nothing under benchmarks/results).
e2e_rc=0
if want e2e; then
    reserve=0
    e2e_mode=(--results-dir "$repo/benchmarks/results")
    [ "${DEVICE:-cuda}" = cuda ] || e2e_mode=(--dry-run)
    t=$(left); t=$(( t - 10 < ${E2E_TIMEOUT_S:-360} ? t - 10 : ${E2E_TIMEOUT_S:-360} ))
    # shellcheck disable=SC2086
    stage "e2e vs TRL" "$t" "$py" benchmarks/bench_e2e.py --stage gpu --budget-s $(( t - 15 > 30 ? t - 15 : 30 )) \
        --out-dir "$out" "${e2e_mode[@]}" ${E2E_ARGS:-}
    e2e_rc=$?
fi

if [ -n "$dest" ]; then
    mkdir -p "$dest"
    stamp="$(date +%Y%m%d)"
    [ -f "$out/gpu_results.json" ] && cp "$out/gpu_results.json" "$dest/gpu_$stamp.json"
    [ -f "$out/train_cuda.json" ] && cp "$out/train_cuda.json" "$dest/train_cuda_$stamp.json"
    [ -f "$out/profile_head.txt" ] && cp "$out/profile_head.txt" "$dest/profile_head_$stamp.txt"
    [ -f "$out/e2e_gpu.json" ] && cp "$out/e2e_gpu.json" "$dest/e2e_gpu_$stamp.json"
    [ -f "$out/e2e_gpu.md" ] && cp "$out/e2e_gpu.md" "$dest/e2e_gpu_$stamp.md"
    cp "$log" "$dest/gpu_suite_$stamp.log"
    cp "$out/gpu_table.txt" "$dest/gpu_$stamp.txt"
fi
echo "== suite done in $(( SECONDS - start ))s: kernel tests rc=$tests_rc, benchmark rc=$bench_rc, e2e rc=$e2e_rc" \
    | tee -a "$log"
echo
[ -f "$out/e2e_gpu.md" ] && cat "$out/e2e_gpu.md" && echo
cat "$out/gpu_table.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$e2e_rc" -eq 0 ]

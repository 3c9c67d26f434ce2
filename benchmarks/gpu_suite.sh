#!/usr/bin/env bash
# GPU suite, one call on a CUDA machine without internet (about 8 minutes):
#   1. install the benchmark peers from benchmarks/wheels/ (benchmarks/fetch_wheels.sh)
#   2. make caldpo importable (PYTHONPATH to this checkout)
#   3. kernel tests on CUDA: tests/kernels/test_cuda.py and test_triton.py (compiled Triton)
#   4. profile_head.py: the fused head's forward and backward apart, per backend
#   5. bench_logprob_loss.py at Pythia shapes, bf16, with its peers
#   6. bench_train.py: the real trainer, fused head vs materialised logits
# Each stage is time-boxed so that one failure does not eat the budget.
# Results: $OUT/gpu_results.json, $OUT/gpu_table.txt, $OUT/suite.log
# ($OUT defaults to benchmarks/results/gpu_run); copies go to --dest DIR if given.
# Knobs (env): SUITE_BUDGET_S (480), TESTS_TIMEOUT_S (280, shared by the test files), PER_TEST_TIMEOUT_S (90),
#              TESTS (the two CUDA test files, run one stage each), TEST_ARGS (extra pytest args),
#              BENCH_ARGS (extra args), OURS_BACKENDS (auto), SHAPES (cuda), DEVICE (cuda).
# A CPU dry run of the plumbing:
#   DEVICE=cpu SHAPES=quick TESTS=tests/test_benchmarks.py TEST_ARGS="-k parse_shape" bash benchmarks/gpu_suite.sh
# (stages 4 and 6 run on CUDA only).
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
budget="${SUITE_BUDGET_S:-480}"
start=$SECONDS
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export TRITON_PRINT_AUTOTUNING=1  # the chosen backward tile goes into the log

left() { echo $(( budget - (SECONDS - start) )); }
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

# 1. peers: pure-Python wheels, no dependencies fetched (torch and triton are there).
site=/tmp/caldpo_bench_site
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    stage "install peers" 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" benchmarks/wheels/*.whl \
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
tests_cap="${TESTS_TIMEOUT_S:-280}"
# shellcheck disable=SC2206
test_files=(${TESTS:-tests/kernels/test_cuda.py tests/kernels/test_triton.py})
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
[ "${DEVICE:-cuda}" = cuda ] && stage "head profile" "${PROFILE_TIMEOUT_S:-60}" "$py" benchmarks/profile_head.py \
    --json "$out/profile_head.json" | tee "$out/profile_head.txt"

# 5. the micro-benchmark with its peers, leaving TRAIN_RESERVE_S for stage 6; it stops starting
#    new work 40 s before its own timeout and writes its JSON after every shape.
t=$(( $(left) - ${TRAIN_RESERVE_S:-80} ))
# shellcheck disable=SC2086
stage "benchmark" "$t" "$py" benchmarks/bench_logprob_loss.py --device "${DEVICE:-cuda}" --shapes ${SHAPES:-cuda} \
    --ours-backends "${OURS_BACKENDS:-auto}" --budget-s $(( t - 40 > 30 ? t - 40 : 30 )) \
    --json "$out/gpu_results.json" ${BENCH_ARGS:-} | tee "$out/bench_output.txt"
bench_rc=${PIPESTATUS[0]}
# The table is what follows the last blank-line-led '# ' header line of the output.
awk '/^# /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$out/bench_output.txt" > "$out/gpu_table.txt"

# 6. the real trainer on the GPU (Triton head, FSDP2 bf16): fused vs materialised logits.
[ "${DEVICE:-cuda}" = cuda ] && stage "train e2e" "${TRAIN_TIMEOUT_S:-80}" "$py" benchmarks/bench_train.py --device cuda \
    --hidden 1024 --layers 2 --heads 16 --vocab 50304 --batch-size 16 --max-length 256 --steps 8 --warmup 3 \
    --json "$out/train_cuda.json"

if [ -n "$dest" ]; then
    mkdir -p "$dest"
    stamp="$(date +%Y%m%d)"
    [ -f "$out/gpu_results.json" ] && cp "$out/gpu_results.json" "$dest/gpu_$stamp.json"
    [ -f "$out/train_cuda.json" ] && cp "$out/train_cuda.json" "$dest/train_cuda_$stamp.json"
    [ -f "$out/profile_head.txt" ] && cp "$out/profile_head.txt" "$dest/profile_head_$stamp.txt"
    cp "$log" "$dest/gpu_suite_$stamp.log"
    cp "$out/gpu_table.txt" "$dest/gpu_$stamp.txt"
fi
echo "== suite done in $(( SECONDS - start ))s: kernel tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$log"
echo
cat "$out/gpu_table.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

#!/usr/bin/env bash
# The GPU check, one command on a lent CUDA machine (one H100 or H200; 15 minutes of device time in all,
# a machine start of minutes included; one command at most 600 s). Its budget is the command's limit:
#     bash benchmarks/gpu_suite.sh --budget 560        (or SUITE_BUDGET_S=560; default 560)
# and every stage is time-boxed inside it, so the command ends with its results in time for a second try.
# Default stages (STAGES="env attention e2e tests"), expected times on an H100:
#   (peers)    TRL and its wheels from benchmarks/wheels/ (benchmarks/fetch_wheels.sh; carried), before
#              the stages that use them                                                         cap 30 s (~5 s)
#   env        versions (python, torch, CUDA, triton, transformers, TRL, GPU) and the varlen API:
#              torch.nn.attention.varlen.varlen_attn's signature and whether it runs here      cap 20 s (~5 s)
#   attention  benchmarks/bench_attention.py --check-kernel: the varlen kernel against its emulation at
#              head dims 64/80/128 (bf16, fp16), then backbone forward+backward at Pythia-2.8B width
#              (H 2560, 32 heads, 4 layers, bf16) for padded (mask), padded (no mask), dense-mask
#              prefix_shared and varlen prefix_shared                                        cap 60 s (~25 s)
#   e2e        benchmarks/bench_e2e.py --stage gpu at Pythia-2.8B: caldpo prefix_shared (varlen), caldpo
#              padded, TRL's DPOTrainer; tokens/s, useful-work MFU, memory, the targets   cap 330 s (~200 s)
#   tests      CUDA tests with what is left: the varlen kernel and the step's host syncs
#              (tests/test_attention.py, tests/test_host_syncs.py), then tests/test_kernels/test_cuda.py
#              (about 210 s on an H100 if it all runs; each test capped at PER_TEST_TIMEOUT_S)
# Optional stages (add to STAGES): profile (benchmarks/profile_head.py), bench (bench_logprob_loss.py with
# its peers), train (bench_train.py).
# Results, all under $OUT (default benchmarks/results/gpu_run; at most 8 files, what a lent machine
# returns): suite.log, env.json, attention.json, attention.md, e2e_gpu.json, e2e_gpu.md (and, with the
# optional stages, gpu_results.json / profile_head.json / train_cuda.json). The tables are printed last.
# Knobs (env): STAGES, SUITE_BUDGET_S, TESTS (test files, in order), TEST_ARGS, PER_TEST_TIMEOUT_S (60),
# ATTENTION_ARGS, E2E_ARGS (extra bench_e2e.py args), E2E_CAP_S (330), ATTENTION_CAP_S (60), DEVICE (cuda),
# PYTHON. DEVICE=cpu is the dry run of the plumbing (tests/test_benchmarks.py runs it): bench_attention
# --quick, bench_e2e --stage gpu --dry-run, and the tests given in TESTS.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
budget="${SUITE_BUDGET_S:-560}"
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget="$2"; shift 2 ;;
        *) echo "usage: $0 [--budget SECONDS]" >&2; exit 2 ;;
    esac
done
out="${OUT:-$repo/benchmarks/results/gpu_run}"
mkdir -p "$out"
log="$out/suite.log"
: > "$log"
start=$SECONDS
stages=" ${STAGES:-env attention e2e tests} "
want() { [[ "$stages" == *" $1 "* ]]; }
device="${DEVICE:-cuda}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( budget - (SECONDS - start) )); }
# stage NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, time left - 5 s); skipped when no time is left.
stage() {
    local name="$1" cap="$2"; shift 2
    local t; t=$(left); t=$(( t - 5 < cap ? t - 5 : cap ))
    if [ "$t" -le 5 ]; then
        echo "== $name: skipped (suite budget spent)" | tee -a "$log"; return 124
    fi
    echo "== $name (timeout ${t}s, $(( SECONDS - start ))s into a ${budget}s budget)" | tee -a "$log"
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $(( SECONDS - start ))s" | tee -a "$log"
    return "$rc"
}
cap_of() {  # cap_of CAP: CAP, or less so that the time left after it is at least 0
    local l; l=$(left); echo $(( $1 < l ? $1 : l ))
}

rcs=""
note() { rcs="$rcs $1=$2"; }

# peers: pure-Python wheels, no dependencies fetched (torch, triton, transformers, accelerate are there). A wheel
# tagged for one Python version (multiprocess: py312) is installed only by that Python (pip refuses the list).
if want peers || want e2e || want bench; then
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
        stage "peers" 30 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" "${wheels[@]}" \
            && export PYTHONPATH="$PYTHONPATH:$site"
        note peers $?
    else
        echo "== peers: no wheels in benchmarks/wheels (run benchmarks/fetch_wheels.sh and carry the folder);" \
             "TRL's column is recorded missing" | tee -a "$log"
    fi
fi

# env: versions and the varlen API (what the varlen path needs: torch >= 2.10, sm80+)
if want env; then
    stage "env" 20 "$py" - "$out/env.json" <<'EOF'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
from importlib.metadata import PackageNotFoundError, version
for pkg in ("triton", "transformers", "trl", "datasets", "accelerate"):  # versions without importing them
    try:
        info[pkg] = version(pkg)
    except PackageNotFoundError:
        info[pkg] = "missing"
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = list(torch.cuda.get_device_capability())
    info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    info["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
from caldpo.train.attention import varlen_signature, varlen_unavailable
info["varlen_signature"] = varlen_signature()
info["varlen_unavailable"] = varlen_unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
EOF
    note env $?
fi

# attention: the varlen kernel against its emulation, then the four attention paths timed
if want attention; then
    if [ "$device" = cuda ]; then
        att_args=(--device cuda --check-kernel --reps 5)
    else
        att_args=(--quick)
    fi
    cap=$(cap_of "${ATTENTION_CAP_S:-60}")
    # shellcheck disable=SC2086
    stage "attention" "$cap" "$py" benchmarks/bench_attention.py "${att_args[@]}" \
        --budget-s $(( cap - 20 > 10 ? cap - 20 : 10 )) --json "$out/attention.json" --md "$out/attention.md" \
        ${ATTENTION_ARGS:-}
    note attention $?
fi

# e2e: the whole trainer against TRL at Pythia-2.8B (its own time box 15 s inside the stage's timeout,
# its JSON and table written after every column, OOM / skipped columns recorded as such)
if want e2e; then
    if [ "$device" = cuda ]; then
        e2e_mode=(--shapes pythia-2.8b --columns prefix_shared:varlen,padded:sdpa,trl)
    else
        e2e_mode=(--dry-run)
    fi
    cap=$(cap_of "${E2E_CAP_S:-330}")
    # shellcheck disable=SC2086
    stage "e2e" "$cap" "$py" benchmarks/bench_e2e.py --stage gpu "${e2e_mode[@]}" \
        --budget-s $(( cap - 20 > 30 ? cap - 20 : 30 )) --out-dir "$out" ${E2E_ARGS:-}
    note e2e $?
fi

# optional stages of the earlier suite
if want profile && [ "$device" = cuda ]; then
    stage "head profile" 60 "$py" benchmarks/profile_head.py --json "$out/profile_head.json"
    note profile $?
fi
if want bench; then
    cap=$(cap_of 150)
    stage "benchmark" "$cap" "$py" benchmarks/bench_logprob_loss.py --device "$device" \
        --shapes "$([ "$device" = cuda ] && echo cuda || echo quick)" --budget-s $(( cap - 30 > 20 ? cap - 30 : 20 )) \
        --json "$out/gpu_results.json"
    note bench $?
fi
if want train && [ "$device" = cuda ]; then
    stage "train e2e" 80 "$py" benchmarks/bench_train.py --device cuda --hidden 1024 --layers 2 --heads 16 \
        --vocab 50304 --batch-size 16 --max-length 256 --steps 8 --warmup 3 --json "$out/train_cuda.json"
    note train $?
fi

# tests: CUDA tests with what is left, the short new ones first; -s prints each case's numbers as it runs
if want tests; then
    per_test=""
    "$py" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=${PER_TEST_TIMEOUT_S:-60}"
    # shellcheck disable=SC2206
    files=(${TESTS:-tests/test_attention.py tests/test_host_syncs.py tests/test_kernels/test_cuda.py})
    for f in "${files[@]}"; do
        k_args=()
        case "$f" in
            tests/test_attention.py) [ -z "${TEST_ARGS:-}" ] && k_args=(-k "varlen_kernel") ;;
            tests/test_host_syncs.py) [ -z "${TEST_ARGS:-}" ] && k_args=(-k "cuda") ;;
        esac
        # shellcheck disable=SC2086
        stage "tests $f" "$(left)" "$py" -m pytest "$f" -v -s -rfEs -p no:cacheprovider --durations=5 $per_test \
            "${k_args[@]}" ${TEST_ARGS:-}
        note "tests:$f" $?
    done
fi

echo "== suite done in $(( SECONDS - start ))s of ${budget}s:$rcs" | tee -a "$log"
echo
[ -f "$out/attention.md" ] && cat "$out/attention.md" && echo
[ -f "$out/e2e_gpu.md" ] && cat "$out/e2e_gpu.md"
# non-zero when a stage failed (a stage skipped for lack of time is 124)
for kv in $rcs; do
    [ "${kv##*=}" = 0 ] || exit 1
done
exit 0

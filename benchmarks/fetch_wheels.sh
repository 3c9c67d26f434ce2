#!/usr/bin/env bash
# Download the benchmark peers as wheels into benchmarks/wheels/ (git-ignored),
# for machines that cannot reach a package index (the GPU suite installs them
# from there with --no-deps). Versions are pinned to the ones the CPU results were made with.
# The GPU machine's Python is 3.12 (PY_VERSION): version-tagged wheels are fetched for it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: -d "$dest" \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" \
    "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
# The trainer's config layer, which the GPU image lacks (pure-Python wheels), for the
# suite's end-to-end training stages (pip wheel builds antlr4's pure-Python wheel from its sdist).
python3 -m pip wheel -q --no-deps -w "$dest" "hydra-core==1.3.8" "omegaconf==2.3.1" "antlr4-python3-runtime==4.9.3"
# TRL's DPOTrainer for bench_e2e.py --stage gpu. TRL imports accelerate and datasets; the GPU image
# has accelerate, transformers, pyarrow, pandas, xxhash, fsspec, requests, httpx and huggingface-hub,
# but not datasets nor its dill and multiprocess (multiprocess's wheels are tagged per Python version).
# datasets 4.8 rather than 5.x: it asks for pyarrow >= 21 and huggingface-hub < 2 (5.x: pyarrow >= 24).
python3 -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" -d "$dest" \
    "trl==${TRL_VERSION:-1.16.0}" "datasets==${DATASETS_VERSION:-4.8.0}" "dill==0.4.1" "multiprocess==0.70.19"
ls -l "$dest"

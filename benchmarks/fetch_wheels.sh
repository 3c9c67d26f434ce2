#!/usr/bin/env bash
# Download the benchmark peers as wheels into benchmarks/wheels/ (git-ignored),
# for machines that cannot reach a package index (the GPU suite installs them
# from there). Versions are pinned to the ones the CPU results were made with.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: -d "$dest" \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" \
    "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
# The trainer's config layer, which the GPU image lacks (pure-Python wheels), for the
# suite's end-to-end training stage (pip wheel builds antlr4's pure-Python wheel from its sdist).
python3 -m pip wheel -q --no-deps -w "$dest" "hydra-core==1.3.8" "omegaconf==2.3.1" "antlr4-python3-runtime==4.9.3"
ls -l "$dest"

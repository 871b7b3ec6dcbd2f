#!/usr/bin/env bash
# Download the peer libraries of the benchmark as wheels into .whl/ (gitignored), for a
# GPU machine that has no network (Python 3.12, x86-64 manylinux; its image already has
# torch, triton, transformers and accelerate). Run here, from the repository root:
#
#     bash benchmarks/fetch_wheels.sh
#
# and pass `carry: [".whl"]` to the device call; benchmarks/gpu_round.sh installs them.
# All three are pure-Python wheels whose runtime needs (torch, triton, transformers,
# accelerate, packaging, ...) the GPU image already holds, so --no-deps is enough:
#   liger-kernel        LigerCrossEntropyLoss (sft) and its fused-linear losses
#   cut-cross-entropy   linear_cross_entropy (linear path, sft)
#   trl                 trl.kernels.selective_log_softmax_and_entropy / ChunkedLogProbFunction
#                       (importing trl.kernels needs transformers only, not datasets)
# Pins: the newest releases seen on the index on 2026-11-21. Keep one version of each.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
ls -la .whl
du -sh .whl

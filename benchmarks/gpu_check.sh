#!/usr/bin/env bash
# GPU check of issue 16 (one GPU, under 8 minutes): ResNet-50, the release multi-crop recipe
# (2 x 224 + 6 x 96), batch 128, bf16; the full step fed by the photo loader against the
# backbone-only ceiling, with the loader's JPEGs decoded by its CPU workers (train.decode=cpu) and
# on the GPU (train.decode=gpu: nvJPEG + crops on the device), and how far one batch's views differ
# between the two. Prints the figures and one JSON line (benchmarks/gpu_check.py).
# Making the 4,000 synthetic photos takes about 1.5 minutes on 16 cores' worth of one process.
# Not yet run on a GPU: no GPU was lent to the session that wrote it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="${PYTHONPATH:-$here/../src}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python "$here/gpu_check.py" --device cuda --backbone resnet50 --batch 128 --steps 20 --warmup 5 \
    --workers "${WORKERS:-$(( $(nproc) - 2 ))}" "$@"

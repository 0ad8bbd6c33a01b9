#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and onnxruntime-gpu, in under five minutes: is CUDA (and
# TensorRT, when this onnxruntime has it) really running the model, do GPU and CPU agree,
# and what do the engine and the HTTP service reach (tools/gpu_check.py says how).
#
#   tools/gpu_check.sh                      # exports a ResNet-50 (random weights) to test
#   MODEL=models/x/1/model.onnx IMAGES=photos/ tools/gpu_check.sh
#
# Exit status: 0 all checks passed, 1 a check failed, 2 no GPU or no onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
IMAGES=${IMAGES:-../shared/photos}
[ -d "$IMAGES" ] || IMAGES=tests/fixtures/cifar10-val
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)" >&2
    exit 2
fi
providers=$("$PYTHON" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))')
echo "onnxruntime providers: $providers"
if [[ $providers != *CUDAExecutionProvider* ]]; then
    echo "gpu_check: this onnxruntime has no CUDA provider; install onnxruntime-gpu (docs/gpu.md)" >&2
    exit 2
fi
if [ -z "${MODEL:-}" ]; then
    "$PYTHON" -m export resnet50 --weights none --out "$work/models" --name resnet50 >/dev/null
    MODEL=$work/models/resnet50/1/model.onnx
fi
timeout 240 "$PYTHON" -m tools.gpu_check --model "$MODEL" --images "$IMAGES" --provider cuda
if [[ $providers == *TensorrtExecutionProvider* ]]; then
    # TensorRT builds an engine per shape on first use: a few sizes only.
    timeout 120 "$PYTHON" -m tools.gpu_check --model "$MODEL" --images "$IMAGES" \
        --provider tensorrt --batches 1,64 --clients 64
fi
echo "gpu_check: passed"

#!/bin/sh
# EfficientNetB7 @512 on an NVIDIA GPU: Keras FP32 and mixed_float16, ONNX Runtime's CUDA and
# TensorRT (FP32, FP16) execution providers, side by side; s/slice and one worker's 300-slice
# studies per hour (model time), each checked against Keras FP32 (top-1 agreement, max |dp|).
#
#   bench/gpu.sh [WORK_DIR]      WORK_DIR keeps the B7 bench bundle (bench.b7_bundle) for reruns
#
# Installs into its own virtual environment, build/venv-gpu or $AINODE_GPU_VENV (the CPU .venv
# is left as it is; one whose TensorFlow already sees the GPU is used as it is, so a host
# without a package index can be given a prepared one):
# the project's pinned dependencies (constraints.txt) with tensorflow[and-cuda] at the repo's
# TensorFlow version instead of tensorflow-cpu, onnxruntime-gpu instead of onnxruntime, and
# TensorRT's pip packages when pip has them. Says what it installed and what it could not; a
# runtime that cannot run prints why and the others go on. Exits non-zero only when there is
# no GPU, when TensorFlow cannot be installed, or when the benchmark itself fails.
set -eu
cd "$(dirname "$0")/.."

venv=${AINODE_GPU_VENV:-build/venv-gpu}
py=$venv/bin/python
installed=""
missing=""

say() { echo "gpu.sh: $*" >&2; }

# pip_install LABEL ARGS...: install, recording the outcome under LABEL; never exits
pip_install() {
    label=$1
    shift
    if "$py" -m pip install -q --disable-pip-version-check "$@" >"$venv/pip-$label.log" 2>&1; then
        installed="$installed $label"
        return 0
    fi
    missing="$missing $label"
    say "could not install $label (last lines of $venv/pip-$label.log):"
    tail -n 5 "$venv/pip-$label.log" >&2
    return 1
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    say "no NVIDIA GPU here (nvidia-smi missing or lists none): nothing to measure"
    exit 1
fi
nvidia-smi -L >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true

tf_version=$(sed -n 's/^tensorflow[-_]cpu==//p' constraints.txt)
ort_version=$(sed -n 's/^onnxruntime==//p' constraints.txt)
if [ -z "$tf_version" ]; then
    say "constraints.txt pins no tensorflow-cpu version: cannot match TensorFlow"
    exit 1
fi

gpu_ready() {
    "$py" -c 'import sys, tensorflow as tf; sys.exit(not tf.config.list_physical_devices("GPU"))' \
        >/dev/null 2>&1
}

install() {
    if [ ! -x "$py" ]; then
        say "creating $venv"
        mkdir -p "$(dirname "$venv")"
        python3 -m venv "$venv"
        "$py" -m pip install -q --disable-pip-version-check --upgrade pip
    fi
    # the repo's pins, less the CPU-only builds the GPU ones replace
    grep -v -E '^(tensorflow[-_]cpu|onnxruntime)==' constraints.txt >"$venv/constraints-gpu.txt"
    "$py" -c '
import tomllib
with open("pyproject.toml", "rb") as source:
    dependencies = tomllib.load(source)["project"]["dependencies"]
print("\n".join(d for d in dependencies if not d.startswith(("tensorflow-cpu", "onnxruntime"))))
' >"$venv/requirements-gpu.txt"

    tf="tensorflow[and-cuda]==$tf_version"
    if ! pip_install tensorflow-and-cuda "$tf" -c "$venv/constraints-gpu.txt"; then
        say "retrying $tf without the repo's other pins"
        pip_install tensorflow-and-cuda-unpinned "$tf" || {
            say "TensorFlow for CUDA could not be installed: stopping"
            exit 1
        }
    fi
    pip_install dependencies -r "$venv/requirements-gpu.txt" -c "$venv/constraints-gpu.txt" ||
        pip_install dependencies-unpinned -r "$venv/requirements-gpu.txt" || {
        say "the project's dependencies could not be installed: stopping"
        exit 1
    }
    pip_install ainode --no-deps -e . || exit 1
    if [ -n "$ort_version" ]; then
        pip_install "onnxruntime-gpu-$ort_version" "onnxruntime-gpu==$ort_version" ||
            pip_install onnxruntime-gpu-latest onnxruntime-gpu || true
    else
        pip_install onnxruntime-gpu-latest onnxruntime-gpu || true
    fi
    # TensorRT 10 for ONNX Runtime's TensorRT execution provider (CUDA 12 builds)
    pip_install tensorrt-cu12 "tensorrt-cu12>=10,<11" || true
}

if [ -x "$py" ] && gpu_ready; then
    say "$venv: TensorFlow already sees the GPU, installing nothing (remove $venv to reinstall)"
else
    install
fi

# ONNX Runtime dlopens TensorRT's libraries: put the pip package's folder on the search path
trt_libs=$("$py" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' \
    2>/dev/null || true)
if [ -n "$trt_libs" ]; then
    LD_LIBRARY_PATH="$trt_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
fi

say "installed:${installed:- nothing}"
say "could not install:${missing:- nothing}"
"$py" -c 'import tensorflow as tf; print("TensorFlow", tf.__version__, "GPUs:",
    tf.config.list_physical_devices("GPU"))' >&2
"$py" -c 'import onnxruntime as ort; print("ONNX Runtime", ort.__version__,
    ort.get_available_providers())' >&2 || true

if [ $# -gt 0 ]; then
    set -- --work "$1"
fi
TF_CPP_MIN_LOG_LEVEL=2 "$py" -m bench.inference --gpu "$@" \
    --slices 64 --repeats 5 --gpu-batch-sizes 8,32,64

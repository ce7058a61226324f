"""Helpers of the open_clip plugin tests."""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PLUGIN_CONFIGS = osp.join(ROOT, 'plugins', 'vlp_codebook_openclip', 'model_configs')


def run_entry_point(*argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``python -m vlp_codebook_openclip.train ARGV`` in a fresh process (one torch thread)."""
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([osp.join(ROOT, 'plugins'), ROOT, os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-m', 'vlp_codebook_openclip.train', *argv], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)

# the tests' own helpers (ddp_utils) live one folder up
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

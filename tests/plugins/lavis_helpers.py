"""Helpers of the LAVIS adapter tests (tiny configs and samples)."""
from __future__ import annotations

import argparse
import os

import torch

TINY_RUN_CONFIG = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'plugins',
                                               'vlp_codebook_lavis', 'configs', 'projects',
                                               'codis_retrieval_tiny.yaml'))

# 4 images, 2 captions each; image i has colour COLOURS[i]
COLOURS = {'red': (220, 20, 20), 'green': (20, 200, 40), 'blue': (30, 40, 220), 'yellow': (230, 220, 30)}


def lavis_config(path: str = TINY_RUN_CONFIG, options=None):
    """LAVIS's ``Config`` of a run YAML, as its train script builds it."""
    from lavis.common.config import Config
    return Config(argparse.Namespace(cfg_path=path, options=list(options or [])))


def retrieval_samples(batch: int = 4, image_size: int = 32, seed: int = 0):
    """LAVIS retrieval training samples: captions of 2 images x 2 captions each."""
    g = torch.Generator().manual_seed(seed)
    captions = ['a red square', 'a picture that is all red', 'a blue square', 'a picture that is all blue']
    return {
        'image': torch.randn(batch, 3, image_size, image_size, generator=g),
        'text_input': [captions[i % 4] for i in range(batch)],
        'image_id': torch.tensor([i // 2 for i in range(batch)]),
        'epoch': 0, 'iters': 3, 'num_iters_per_epoch': 10,
    }

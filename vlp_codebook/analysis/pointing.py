r"""Does a word's Grad-CAM map point at the object the word names? A pointing game on the
synthetic-shapes scenes, where every object's mask is known exactly.

For each test scene, its full caption ("a small red circle left of a large blue square") and
each colour or shape word that names exactly one of the two objects:

* ``hit``: the fraction of the map's peak patch covered by the named object's mask (1 when the
  peak patch lies inside the object, 0 when it misses it);
* ``chance``: the named object's area / image area -- the expected ``hit`` of a peak patch drawn
  uniformly at random, since the patches tile the image;
* ``other``: the same coverage for the *other* object's mask (a control: maps that peak on
  objects in general, whichever the word, score as high here as in ``hit``);
* ``patch_coverage``: (n, h * w) the named object's coverage of every patch. Its mean over
  patches is ``chance``; the maximum over patches of its mean over occurrences is the best an
  image-independent map can score (the objects sit near the centre lines, so a map that always
  peaks in the middle beats the area chance without looking at the image).

Example::

    >>> result = pointing_game(model, SyntheticShapesDataset(num_images=150, split='test'))
    >>> result['color']['hit'].mean(), result['color']['chance'].mean()
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from vlp_codebook.analysis.gradcam import itm_gradcam
from vlp_codebook.datasets.synthetic_shapes import COLORS, SHAPES, scene_captions

__all__ = ['patch_coverage', 'peak_coverage', 'pointing_game']


def patch_coverage(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, cols): the fraction of each patch's pixels inside ``mask`` (H, W) bool."""
    if mask.shape[0] % rows or mask.shape[1] % cols:
        raise ValueError(f'mask {mask.shape} is not a whole number of ({rows}, {cols}) patches')
    return mask.reshape(rows, mask.shape[0] // rows, cols, mask.shape[1] // cols).mean(axis=(1, 3))


def peak_coverage(cam: torch.Tensor, mask: np.ndarray) -> float:
    """Fraction of the pixels of ``cam``'s (h, w) peak patch inside ``mask`` (H, W) bool, with
    H, W multiples of h, w. Ties go to the first patch in raster order."""
    rows, cols = cam.shape
    row, col = divmod(int(cam.flatten().argmax()), cols)
    return float(patch_coverage(mask, rows, cols)[row, col])


@torch.no_grad()
def pointing_game(model, dataset, num_images: Optional[int] = None, layer: Optional[int] = None,
                  transform=None) -> Dict[str, Dict[str, np.ndarray]]:
    """``{'color': {...}, 'shape': {...}}``, each with arrays ``hit``, ``other``, ``chance`` (one
    entry per word occurrence) over the first ``num_images`` scenes of a
    ``SyntheticShapesDataset``; ``transform`` (optional) maps each (h, w) map before scoring
    (e.g. a flip, as a misregistration control)."""
    num_images = len(dataset.scenes) if num_images is None else min(num_images, len(dataset.scenes))
    scenes = dataset.scenes[:num_images]
    captions = [scene_captions(scene)[0] for scene in scenes]
    images = torch.stack([dataset.image(i) for i in range(num_images)])
    data = model.data_preprocessor({'images': images, 'texts': captions}, False)
    with torch.enable_grad():
        cams, _ = itm_gradcam(model, data['images'], data['input_ids'], data['attention_mask'], layer=layer)
    tokenizer = model.data_preprocessor.tokenizer
    result = {kind: {'hit': [], 'other': [], 'chance': [], 'patch_coverage': []} for kind in ('color', 'shape')}
    for i, scene in enumerate(scenes):
        pixels = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(int)
        masks = {obj: (pixels == np.array(COLORS[obj.color])).all(-1) for obj in (scene.first, scene.second)}
        for position, word in enumerate(tokenizer.convert_ids_to_tokens(data['input_ids'][i].tolist())):
            named = [obj for obj in masks if word in (obj.color, obj.shape)]
            if len(named) != 1 or cams[i, position].max() <= 0:
                continue          # not a colour/shape word, or both objects share the shape
            other = next(obj for obj in masks if obj is not named[0])
            cam = cams[i, position] if transform is None else transform(cams[i, position])
            kind = 'color' if word in COLORS else 'shape'
            assert kind == 'color' or word in SHAPES
            result[kind]['hit'].append(peak_coverage(cam, masks[named[0]]))
            result[kind]['other'].append(peak_coverage(cam, masks[other]))
            result[kind]['chance'].append(float(masks[named[0]].mean()))
            result[kind]['patch_coverage'].append(patch_coverage(masks[named[0]], *cam.shape).flatten())
    return {kind: {key: np.asarray(values) for key, values in parts.items()} for kind, parts in result.items()}

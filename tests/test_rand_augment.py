"""RandAugment with ALBEF's operations: each operation's effect, the sampler, the dataset option."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlp_codebook.datasets import CaptionPretrainDataset
from vlp_codebook.datasets.rand_augment import ALBEF_OPS, FILL, RandAugment, apply_op


def dot_image(x=10, y=12, size=32):
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[y, x] = 255
    return Image.fromarray(pixels)


def white_pixels(image):
    ys, xs = np.nonzero(np.asarray(image)[..., 0] == 255)
    return list(zip(xs.tolist(), ys.tolist()))


@pytest.mark.parametrize('axis', ['X', 'Y'])
def test_translate_moves_the_content_by_10_s_pixels(axis):
    moved = set()
    for seed in range(20):   # both signs occur
        out = apply_op(f'Translate{axis}', dot_image(), magnitude=7, rng=random.Random(seed))
        (x, y), = white_pixels(out)
        moved.add((x - 10, y - 12))
    assert moved == ({(7, 0), (-7, 0)} if axis == 'X' else {(0, 7), (0, -7)})


def test_geometric_ops_at_magnitude_zero_change_nothing_and_fill_grey():
    image = dot_image()
    for name in ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate'):
        assert np.array_equal(np.asarray(apply_op(name, image, 0, random.Random(0))), np.asarray(image)), name
    rotated = np.asarray(apply_op('Rotate', Image.new('RGB', (32, 32), (255, 255, 255)), 10, random.Random(0)))
    assert tuple(rotated[0, 0]) == FILL   # a corner uncovered by a 30 degree rotation


def test_shear_and_rotate_magnitudes():
    # ShearX at s: an output pixel (x, y) shows the input at (x +- 0.3 s y, y).
    out = apply_op('ShearX', dot_image(x=10, y=20), magnitude=10, rng=random.Random(1))
    (x, y), = white_pixels(out)
    assert y == 20 and abs(x - 10) == 6
    # Rotate at level 5: +-15 degrees about the centre.
    (x, y), = white_pixels(apply_op('Rotate', dot_image(x=26, y=16), magnitude=5, rng=random.Random(0)))
    angle = np.degrees(np.arctan2(-(y + 0.5 - 16), x + 0.5 - 16))
    assert abs(abs(angle) - 15) < 3


def test_photometric_ops():
    low = Image.fromarray(np.linspace(100, 140, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8))
    stretched = np.asarray(apply_op('AutoContrast', low, 7))
    assert stretched.min() == 0 and stretched.max() == 255
    grey = Image.new('RGB', (8, 8), (100, 100, 100))
    # Brightness factor 0.1 + 1.8 * 0.5 = 1.0 at level 5, 0.1 at level 0.
    assert np.asarray(apply_op('Brightness', grey, 5)).max() == 100
    assert np.asarray(apply_op('Brightness', grey, 0)).max() == 10
    assert np.array_equal(np.asarray(apply_op('Identity', low, 10)), np.asarray(low))


def test_rand_augment_draws_and_validates():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    augment = RandAugment(num_ops=2, magnitude=7)
    assert augment.ops == ALBEF_OPS
    outs = [np.asarray(augment(image, random.Random(seed))) for seed in range(12)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any(not np.array_equal(o, np.asarray(image)) for o in outs)
    assert np.array_equal(np.asarray(augment(image, random.Random(5))), outs[5])       # seeded: reproducible
    assert np.array_equal(np.asarray(RandAugment(num_ops=0)(image, random.Random(0))), np.asarray(image))
    assert np.array_equal(np.asarray(RandAugment(prob=0.0)(image, random.Random(0))), np.asarray(image))
    with pytest.raises(ValueError, match=r"unknown: \['Solarise'\]; known: Identity"):
        RandAugment(ops=['Rotate', 'Solarise'])
    with pytest.raises(ValueError, match='magnitude must be in'):
        RandAugment(magnitude=11)
    with pytest.raises(ValueError, match="unknown RandAugment operation 'Blur'"):
        apply_op('Blur', image, 3)


def test_dataset_option(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
    ann = tmp_path / 'a.json'
    ann.write_text(json.dumps([{'image': 'a.png', 'caption': 'noise'}]))
    plain = CaptionPretrainDataset(str(ann), str(tmp_path), image_size=16)[0]['image']
    data = CaptionPretrainDataset(str(ann), str(tmp_path), image_size=16, rand_augment=dict(num_ops=2, magnitude=9))
    random.seed(0)
    items = [data[0]['image'] for _ in range(10)]
    assert any(not torch.equal(item, plain) for item in items)
    with pytest.raises(TypeError, match='rand_augment must be a dict'):
        CaptionPretrainDataset(str(ann), str(tmp_path), image_size=16, rand_augment=RandAugment())

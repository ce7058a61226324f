"""JSON caption datasets, the embedded synthetic shapes dataset and vlp_collate."""
import json
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from vlp_codebook.datasets import (CaptionPretrainDataset, CaptionRetrievalDataset, SyntheticShapesDataset,
                                   clean_caption, swap_left_right, vlp_collate)
from vlp_codebook.registry import DATASETS, FUNCTIONS

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_image(path, color, size=(8, 6), mode='RGB'):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """Two images: red.png (RGB) and a half-blue, half-transparent RGBA image."""
    write_image(tmp_path / 'img' / 'red.png', RED)
    half = Image.new('RGBA', (8, 8), (0, 0, 0, 0))
    half.paste(Image.new('RGBA', (4, 8), BLUE + (255,)), (0, 0))  # left half blue, right transparent
    half.save(tmp_path / 'img' / 'half.png')
    return tmp_path


# ---- caption cleaning ------------------------------------------------------------------------------

def test_clean_caption_follows_albef():
    assert clean_caption('  A Red-Circle, LEFT of (a) "blue" square!\n') == 'a red circle left of a blue square'
    assert clean_caption('a/b  c;d~e') == 'a b cde'  # ; and ~ are deleted, / becomes a space
    assert clean_caption('<person> rides a horse') == 'person rides a horse'
    assert clean_caption('one two three four', max_words=2) == 'one two'
    with pytest.raises(TypeError, match='caption must be a str'):
        clean_caption(3)


def test_swap_left_right_whole_words_only():
    assert swap_left_right('a cat left of a dog, right? leftover') == 'a cat right of a dog, left? leftover'


# ---- CaptionPretrainDataset ------------------------------------------------------------------------

def test_pretrain_dataset_pairs_cleaning_and_images(corpus):
    ann = write_json(corpus / 'train.json', [
        {'image': 'img/red.png', 'caption': 'A RED Square!'},
        {'image': 'img/half.png', 'caption': ['Blue on the left.', 'Half-transparent   image']},
        {'image': 'img/red.png', 'caption': 'still (the) red one'},
    ])
    dataset = DATASETS.build(dict(type='CaptionPretrainDataset', ann_file=ann, image_root=str(corpus),
                                  image_size=4))
    assert len(dataset) == 4
    assert [dataset[i]['text'] for i in range(4)] == [
        'a red square', 'blue on the left', 'half transparent image', 'still the red one']
    # No image_id in the file: one id per distinct image path, in order of appearance.
    assert [dataset[i]['image_id'] for i in range(4)] == [0, 1, 1, 0]
    red = dataset[0]['image']
    assert red.shape == (3, 4, 4) and red.dtype == torch.float32
    assert torch.allclose(red[0], torch.ones(4, 4)) and red[1:].abs().max() == 0
    half = dataset[1]['image']
    # left half blue, transparent right half composited onto white (the middle columns mix under
    # the bicubic 8 -> 4 resize; the outer ones do not)
    assert torch.allclose(half[:, :, 0], torch.tensor([0.0, 0.0, 1.0]).view(3, 1).expand(3, 4))
    assert torch.allclose(half[:, :, 3], torch.ones(3, 4))
    assert torch.equal(dataset[1]['image'], dataset[1]['image'])  # no augmentation: deterministic


def test_pretrain_dataset_image_ids(corpus):
    entries = [{'image': 'img/red.png', 'caption': 'a', 'image_id': 17},
               {'image': 'img/half.png', 'caption': 'b', 'image_id': 4}]
    dataset = CaptionPretrainDataset(write_json(corpus / 'ints.json', entries), str(corpus), image_size=4)
    assert [dataset[i]['image_id'] for i in range(2)] == [17, 4]  # int ids are kept
    entries = [{'image': 'img/red.png', 'caption': 'a', 'image_id': 'coco_9'},
               {'image': 'img/half.png', 'caption': 'b', 'image_id': 'coco_3'},
               {'image': 'img/red.png', 'caption': 'c', 'image_id': 'coco_9'}]
    dataset = CaptionPretrainDataset(write_json(corpus / 'strs.json', entries), str(corpus), image_size=4)
    assert [dataset[i]['image_id'] for i in range(3)] == [0, 1, 0]  # strings -> dense ints


def test_pretrain_dataset_several_files_and_max_words(corpus):
    first = write_json(corpus / 'a.json', [{'image': 'img/red.png', 'caption': 'one two three four'}])
    second = write_json(corpus / 'b.json', [{'image': 'img/half.png', 'caption': 'five six'}])
    dataset = CaptionPretrainDataset([first, second], str(corpus), image_size=4, max_words=3)
    assert [dataset[i]['text'] for i in range(2)] == ['one two three', 'five six']


def test_horizontal_flip_swaps_left_and_right(corpus):
    ann = write_json(corpus / 'flip.json', [{'image': 'img/half.png', 'caption': 'blue on the left'}])
    plain = CaptionPretrainDataset(ann, str(corpus), image_size=4)[0]
    flipped = CaptionPretrainDataset(ann, str(corpus), image_size=4, horizontal_flip_prob=1.0)[0]
    assert flipped['text'] == 'blue on the right'
    assert torch.equal(flipped['image'], plain['image'].flip(-1))
    assert not torch.equal(flipped['image'], plain['image'])


@given(width=st.integers(1, 400), height=st.integers(1, 400), lo=st.floats(0.05, 1.0),
       span=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_random_crop_box_lies_in_the_image_with_the_asked_area_and_ratio(width, height, lo, span, seed):
    from vlp_codebook.datasets.image_loading import random_crop_box
    hi = lo + span * (1.0 - lo)
    left, top, right, bottom = random_crop_box(width, height, (lo, hi), rng=random.Random(seed))
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    # A drawn box has the asked area fraction and ratio up to the rounding of its sides
    # (half a pixel each); the fallback is centred and spans the image in one direction.
    area_ok = lo * width * height - (w + h) <= w * h <= hi * width * height + (w + h) + 1
    ratio_ok = 3 / 4 * (1 - 1 / min(w, h)) - 1e-9 <= w / h <= 4 / 3 * (1 + 1 / min(w, h)) + 1e-9
    fallback = (w == width or h == height) and left == (width - w) // 2 and top == (height - h) // 2
    assert (area_ok and ratio_ok) or fallback


def test_crop_scale_crops_then_resizes(tmp_path):
    from vlp_codebook.datasets.image_loading import load_image, random_crop_box
    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    path = tmp_path / 'noise.png'
    Image.fromarray(pixels).save(path)
    ours = load_image(str(path), 16, crop_scale=(0.2, 0.5), rng=random.Random(3))
    box = random_crop_box(64, 48, (0.2, 0.5), rng=random.Random(3))
    expected = Image.fromarray(pixels).crop(box).resize((16, 16), Image.BICUBIC)
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255)
    assert not torch.equal(ours, load_image(str(path), 16))
    with pytest.raises(ValueError, match='crop_scale must satisfy'):
        load_image(str(path), 16, crop_scale=(0.6, 0.5))
    with pytest.raises(ValueError, match='crop_scale must be a pair'):
        CaptionPretrainDataset(write_json(tmp_path / 'a.json', [{'image': 'noise.png', 'caption': 'x'}]),
                               str(tmp_path), image_size=8, crop_scale=0.5)


def test_missing_annotation_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nope.json'))):
        CaptionPretrainDataset(str(tmp_path / 'nope.json'))


def test_missing_image_names_the_full_path(corpus):
    ann = write_json(corpus / 'gone.json', [{'image': 'img/gone.png', 'caption': 'x'}])
    dataset = CaptionPretrainDataset(ann, str(corpus), image_size=4)
    with pytest.raises(FileNotFoundError, match=re.escape(str(corpus / 'img' / 'gone.png'))):
        dataset[0]
    with pytest.raises(FileNotFoundError, match=re.escape(str(corpus / 'img' / 'gone.png'))):
        CaptionPretrainDataset(ann, str(corpus), image_size=4, check_images=True)


@pytest.mark.parametrize('data, error, message', [
    ({'image': 'img/red.png', 'caption': 'x'}, TypeError, 'must hold a JSON list'),
    ([{'image': 'img/red.png', 'caption': 'x'}, {'image': 'img/red.png'}], KeyError, 'entry 1 .* "caption"'),
    ([{'caption': 'x'}], KeyError, 'entry 0 .* "image"'),
    ([{'image': 'img/red.png', 'caption': 5}], TypeError, 'str or a list of str'),
    ([{'image': 'img/red.png', 'caption': []}], ValueError, 'empty list'),
    ([{'image': 'img/red.png', 'caption': '?!'}], ValueError, 'empty after cleaning'),
    (['img/red.png'], TypeError, 'entry 0 .* JSON object'),
    ([{'image': 'img/red.png', 'caption': 'x', 'image_id': [1]}], TypeError, 'image_id'),
])
def test_bad_annotations_are_named(corpus, data, error, message):
    ann = write_json(corpus / 'bad.json', data)
    with pytest.raises(error, match=message):
        CaptionPretrainDataset(ann, str(corpus), image_size=4)


def test_invalid_json_names_the_file(corpus):
    (corpus / 'broken.json').write_text('[{"image": ')
    with pytest.raises(ValueError, match='broken.json is not valid JSON'):
        CaptionPretrainDataset(str(corpus / 'broken.json'))


# ---- CaptionRetrievalDataset -----------------------------------------------------------------------

def test_retrieval_dataset_items_and_mappings(corpus):
    ann = write_json(corpus / 'test.json', [
        {'image': 'img/red.png', 'caption': ['A red square.', 'Red!']},
        {'image': 'img/half.png', 'caption': ['Blue left', 'white right', 'half and half']},
    ])
    dataset = DATASETS.build(dict(type='CaptionRetrievalDataset', ann_file=ann, image_root=str(corpus),
                                  image_size=4))
    assert len(dataset) == 2
    assert dataset[1]['texts'] == ['blue left', 'white right', 'half and half']
    assert dataset[1]['image_id'] == 1 and dataset[1]['image'].shape == (3, 4, 4)
    assert dataset.text == ['a red square', 'red', 'blue left', 'white right', 'half and half']
    assert dataset.img2txt == {0: [0, 1], 1: [2, 3, 4]}
    assert dataset.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}


def test_retrieval_dataset_missing_caption(corpus):
    ann = write_json(corpus / 'test.json', [{'image': 'img/red.png'}])
    with pytest.raises(KeyError, match='entry 0 .* "caption"'):
        CaptionRetrievalDataset(ann, str(corpus))


# ---- SyntheticShapesDataset ------------------------------------------------------------------------

# The test's own notion of each color (loose channel thresholds, not the module's palette).
COLOR_TESTS = {
    'red': lambda r, g, b: (r > 150) & (g < 100) & (b < 100),
    'green': lambda r, g, b: (g > 120) & (r < 100) & (b < 120),
    'blue': lambda r, g, b: (b > 150) & (r < 100) & (g < 150),
    'yellow': lambda r, g, b: (r > 150) & (g > 150) & (b < 100),
}
OBJECT = r'(?:(small|large) )?(red|green|blue|yellow) (circle|square|triangle)'
RELATION = r'(left of|to the left of|right of|to the right of|above|over|below|under)'
SENTENCE = re.compile(rf'^(?:there is )?a {OBJECT} {RELATION} a {OBJECT}$')
PAIR = re.compile(rf'^a picture of a {OBJECT} and a {OBJECT}$')


def _mask(image, color):
    r, g, b = (image * 255).round().numpy()
    return COLOR_TESTS[color](r, g, b)


def _check_object(image, size, color, shape):
    mask = _mask(image, color)
    assert mask.sum() > 0, f'no {color} pixel'
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    # a square fills its bounding box, a disc pi/4 of it, a triangle about half
    expected = {'square': (0.95, 1.0), 'circle': (0.65, 0.9), 'triangle': (0.4, 0.68)}[shape]
    assert expected[0] <= fill <= expected[1], (color, shape, fill)
    side = max(height, width) / image.shape[-1]
    assert (side > 0.36) == (size == 'large'), (size, side)
    return ys.mean(), xs.mean()


def _check_caption(image, caption):
    pair = PAIR.match(caption)
    if pair:
        _check_object(image, *pair.groups()[:3])
        _check_object(image, *pair.groups()[3:])
        return
    match = SENTENCE.match(caption)
    assert match, f'unexpected caption form: {caption!r}'
    size_a, color_a, shape_a, relation, size_b, color_b, shape_b = match.groups()
    assert color_a != color_b
    ya, xa = _check_object(image, size_a, color_a, shape_a) if size_a else _centroid(image, color_a)
    yb, xb = _check_object(image, size_b, color_b, shape_b) if size_b else _centroid(image, color_b)
    if 'left' in relation:
        assert xa < xb, caption
    elif 'right' in relation:
        assert xa > xb, caption
    elif relation in ('above', 'over'):
        assert ya < yb, caption
    else:
        assert ya > yb, caption


def _centroid(image, color):
    ys, xs = np.nonzero(_mask(image, color))
    assert len(ys) > 0
    return ys.mean(), xs.mean()


def test_synthetic_captions_describe_the_pixels():
    dataset = SyntheticShapesDataset(num_images=40, image_size=32, split='test', seed=3, captions_per_image=11)
    for item in dataset:
        for caption in item['texts']:
            _check_caption(item['image'], caption)
        # exactly two colors are drawn, the ones named in the captions
        named = set(re.findall(r'red|green|blue|yellow', ' '.join(item['texts'])))
        drawn = {color for color in COLOR_TESTS if _mask(item['image'], color).any()}
        assert named == drawn and len(drawn) == 2


def test_synthetic_is_deterministic_and_splits_differ():
    first = SyntheticShapesDataset(num_images=30, split='train', seed=1)
    second = SyntheticShapesDataset(num_images=30, split='train', seed=1)
    assert len(first) == 60  # 2 captions per image by default
    for index in (0, 7, 59):
        assert torch.equal(first[index]['image'], second[index]['image'])
        assert first[index]['text'] == second[index]['text']
    other_seed = SyntheticShapesDataset(num_images=30, split='train', seed=2)
    assert first.text != other_seed.text
    train = SyntheticShapesDataset(num_images=300, split='train', seed=0)
    test = SyntheticShapesDataset(num_images=100, split='test', seed=0)
    train_images = {train.image(i).numpy().tobytes() for i in range(train.num_images)}
    assert not any(test[i]['image'].numpy().tobytes() in train_images for i in range(len(test)))


def test_synthetic_item_formats():
    train = SyntheticShapesDataset(num_images=5, image_size=24, split='train', captions_per_image=3)
    assert len(train) == 15
    item = train[4]
    assert set(item) == {'image', 'text', 'image_id'} and item['image_id'] == 1
    assert item['image'].shape == (3, 24, 24) and 0 <= item['image'].min() and item['image'].max() <= 1
    assert torch.equal(train[3]['image'], train[5]['image'])  # captions 3..5 share image 1
    test = SyntheticShapesDataset(num_images=4, split='test')
    item = test[2]
    assert set(item) == {'image', 'texts', 'image_id'} and item['image_id'] == 2
    assert len(item['texts']) == 5 and len(set(item['texts'])) == 5
    assert test.img2txt[2] == [10, 11, 12, 13, 14] and test.txt2img[12] == 2
    assert [test.text[j] for j in test.img2txt[2]] == item['texts']
    with pytest.raises(IndexError):
        test[4]


@pytest.mark.parametrize('kwargs, message', [
    (dict(split='val'), 'split'), (dict(image_size=8), 'image_size'),
    (dict(num_images=0), 'num_images'), (dict(captions_per_image=12), 'captions_per_image'),
])
def test_synthetic_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticShapesDataset(**kwargs)


def test_vocabulary_covers_every_caption_and_builds_a_tokenizer(tmp_path):
    vocabulary = SyntheticShapesDataset.vocabulary()
    assert vocabulary[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    assert len(set(vocabulary)) == len(vocabulary)
    words = set()
    for split in ('train', 'test'):
        dataset = SyntheticShapesDataset(num_images=200, split=split, captions_per_image=11)
        words.update(word for caption in dataset.text for word in caption.split())
    assert words <= set(vocabulary)
    assert len(words) == len(vocabulary) - 5  # and every listed word does occur
    from transformers import BertTokenizer
    tokenizer = BertTokenizer(vocab_file=SyntheticShapesDataset.write_vocabulary(str(tmp_path / 'vocab.txt')))
    tokens = tokenizer.tokenize('there is a small red circle to the left of a large blue square')
    assert '[UNK]' not in tokens and len(tokens) == 14


# ---- collate ---------------------------------------------------------------------------------------

def test_collate_training_batch():
    dataset = SyntheticShapesDataset(num_images=6, image_size=16, split='train')
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=FUNCTIONS.get('vlp_collate'))))
    assert set(batch) == {'images', 'texts', 'image_ids'}
    assert batch['images'].shape == (4, 3, 16, 16)
    assert batch['texts'] == [dataset.text[i] for i in range(4)]
    assert batch['image_ids'].dtype == torch.long and batch['image_ids'].tolist() == [0, 0, 1, 1]


def test_collate_retrieval_batch_keeps_caption_lists():
    items = [dict(image=torch.zeros(3, 4, 4), texts=['a', 'b', 'c'], image_id=0),
             dict(image=torch.ones(3, 4, 4), texts=['d'], image_id=1)]
    batch = vlp_collate(items)
    assert batch['texts'] == [['a', 'b', 'c'], ['d']]  # not transposed
    assert batch['images'].shape == (2, 3, 4, 4) and batch['images'][1].min() == 1
    assert batch['image_ids'].tolist() == [0, 1]


@pytest.mark.parametrize('items, message', [
    ([], 'empty batch'),
    ([dict(image=torch.zeros(3, 4, 4), text='a', image_id=0),
      dict(image=torch.zeros(3, 4, 4), texts=['b'], image_id=1)], 'either'),
    ([dict(image=torch.zeros(3, 4, 4), text='a')], 'image_id'),
    ([dict(image=torch.zeros(3, 4, 4), text='a', image_id=0),
      dict(image=torch.zeros(3, 5, 5), text='b', image_id=1)], 'share a shape'),
])
def test_collate_errors(items, message):
    with pytest.raises(ValueError, match=message):
        vlp_collate(items)

"""prepare_emoji on a tiny fake unpacked layout of the two npm packages (no npm, no network)."""
import json

import pytest
from PIL import Image

from vlp_codebook.datasets import CaptionPretrainDataset, CaptionRetrievalDataset
from vlp_codebook.tools import prepare_emoji
from vlp_codebook.tools.prepare_emoji import convert, emoji_captions, emoji_key, in_test_split, main

GOOGLE = [
    dict(name='GRINNING FACE', unified='1F600', image='1f600.png', short_names=['grinning'],
         subcategory='face-smiling', sort_order=1, has_img_google=True),
    dict(name='WHITE SMILING FACE', unified='263A-FE0F', image='263a-fe0f.png', short_names=['relaxed'],
         subcategory='face-affection', sort_order=2, has_img_google=True),
    dict(name='Jordan Flag', unified='1F1EF-1F1F4', image='1f1ef-1f1f4.png', short_names=['flag-jo'],
         subcategory='country-flag', sort_order=3, has_img_google=True),
    dict(name='RED APPLE', unified='1F34E', image='1f34e.png', short_names=['apple'],
         subcategory='food-fruit', sort_order=4, has_img_google=True),
    dict(name='NO IMAGE', unified='1F9FF', image='1f9ff.png', short_names=['nazar_amulet'],
         subcategory='', sort_order=5, has_img_google=True),  # its PNG is missing
]
OPENMOJI = [
    dict(hexcode='1F600', annotation='grinning face', tags='face, grin', openmoji_tags='happy, grin'),
    dict(hexcode='263A', annotation='smiling face', tags='face, relaxed, smile', openmoji_tags=''),
    dict(hexcode='1F1EF-1F1F4', annotation='flag: Jordan', tags='', openmoji_tags=''),
]
COLORS = {'1f600.png': (255, 200, 0, 255), '263a-fe0f.png': (0, 0, 255, 255),
          '1f1ef-1f1f4.png': (0, 128, 0, 255), '1f34e.png': (255, 0, 0, 0)}  # the apple is transparent


@pytest.fixture
def packages(tmp_path):
    google = tmp_path / 'emoji-datasource-google' / 'package'
    (google / 'img' / 'google' / '64').mkdir(parents=True)
    (google / 'emoji.json').write_text(json.dumps(GOOGLE))
    for name, color in COLORS.items():
        Image.new('RGBA', (64, 64), color).save(google / 'img' / 'google' / '64' / name)
    openmoji = tmp_path / 'openmoji' / 'package'
    (openmoji / 'data').mkdir(parents=True)
    (openmoji / 'data' / 'openmoji.json').write_text(json.dumps(OPENMOJI))
    return str(google), str(openmoji)


def test_emoji_key_ignores_fe0f_and_case():
    assert emoji_key('263a-fe0f') == emoji_key('263A') == '263A'
    assert emoji_key('1F1EF-1F1F4') == '1F1EF-1F1F4'


def test_captions_from_names_short_names_and_keywords():
    assert emoji_captions(GOOGLE[0], OPENMOJI[0]) == [
        'grinning face',                     # Unicode name == openmoji annotation (kept once)
        'grinning',                          # short name
        'grinning face face grin happy',     # annotation + tags (deduplicated)
        'grinning face face smiling',        # name + subcategory
    ]
    # A flag's short name 'flag-jo' is a code, not a description: dropped.
    assert emoji_captions(GOOGLE[2], OPENMOJI[2]) == ['jordan flag', 'flag jordan', 'jordan flag country flag']
    # Without openmoji data: name, short name, subcategory.
    assert emoji_captions(GOOGLE[3], None) == ['red apple', 'apple', 'red apple food fruit']


def test_split_is_a_stable_hash():
    codes = [f'{0x1F300 + i:X}' for i in range(400)]
    test_share = sum(in_test_split(code, 0.25) for code in codes) / len(codes)
    assert 0.15 < test_share < 0.35
    assert all(in_test_split(code, 0.25) == in_test_split(code.lower() + '-FE0F', 0.25) for code in codes)
    assert not any(in_test_split(code, 0.0) for code in codes)


def test_convert_writes_albef_json_and_images(packages, tmp_path, monkeypatch):
    # Put the grinning face (and only it) in the test split, whatever the hash says.
    monkeypatch.setattr(prepare_emoji, 'in_test_split', lambda code, fraction: code == '1F600')
    out = tmp_path / 'out'
    counts = convert(*packages, str(out), size=16, test_fraction=0.5)
    assert counts == dict(emoji=5, missing_images=1, train_images=3, train_captions=5 + 3 + 3,
                          test_images=1, test_captions=4)
    train = json.loads((out / 'train.json').read_text())
    test = json.loads((out / 'test.json').read_text())
    assert test == [dict(image='images/1f600.png', caption=emoji_captions(GOOGLE[0], OPENMOJI[0]))]
    # white smiling face: name, annotation 'smiling face', 'relaxed', annotation + tags,
    # name + subcategory = 5 captions; Jordan flag 3; red apple 3 (no openmoji entry)
    assert [entry['image_id'] for entry in train] == [0] * 5 + [1] * 3 + [2] * 3
    assert train[0] == dict(image='images/263a-fe0f.png', caption='white smiling face', image_id=0)
    # joined to openmoji through 263A == 263A-FE0F:
    assert 'smiling face face relaxed smile' in [entry['caption'] for entry in train]
    with Image.open(out / 'images' / '263a-fe0f.png') as image:
        assert image.size == (16, 16) and image.mode == 'RGB' and image.getpixel((8, 8)) == (0, 0, 255)
    with Image.open(out / 'images' / '1f34e.png') as image:  # transparent -> white
        assert image.getpixel((8, 8)) == (255, 255, 255)
    # the files load with the project's datasets
    pretrain = CaptionPretrainDataset(str(out / 'train.json'), str(out), image_size=16)
    retrieval = CaptionRetrievalDataset(str(out / 'test.json'), str(out), image_size=16)
    assert len(pretrain) == 11 and len(retrieval) == 1 and retrieval.img2txt == {0: [0, 1, 2, 3]}


def test_main_with_unpacked_dirs_is_deterministic(packages, tmp_path):
    args = ['--google-dir', packages[0], '--openmoji-dir', packages[1], '--size', '8', '--test-fraction', '0.5']
    first = main(['--out', str(tmp_path / 'a')] + args)
    second = main(['--out', str(tmp_path / 'b')] + args)
    assert first == second and first['train_images'] + first['test_images'] == 4
    for name in ('train.json', 'test.json'):
        assert (tmp_path / 'a' / name).read_text() == (tmp_path / 'b' / name).read_text()


def test_missing_inputs_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='emoji.json'):
        convert(str(tmp_path / 'nowhere'), None, str(tmp_path / 'out'))
    monkeypatch.setattr(prepare_emoji.shutil, 'which', lambda name: None)
    with pytest.raises(FileNotFoundError, match='npm is not on PATH'):
        main(['--out', str(tmp_path / 'out')])

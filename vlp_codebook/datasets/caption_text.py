"""Caption text normalisation, as ALBEF/BLIP clean captions before tokenisation.

``clean_caption`` lower-cases, deletes the punctuation ``, . ' ! ? " ( ) * # : ; ~``, turns
``-`` and ``/`` into spaces, maps ALBEF's ``<person>`` placeholder to ``person``, collapses runs of
white space and keeps the first ``max_words`` words. ``swap_left_right`` exchanges the words
"left" and "right": a caption stays true when its image is flipped horizontally.

Reference: ALBEF ``dataset/utils.py::pre_caption`` (Li et al., NeurIPS 2021); written anew here.

Example::

    >>> clean_caption('A  Red-Circle, LEFT of (a) blue square!', max_words=30)
    'a red circle left of a blue square'
    >>> swap_left_right('a red circle left of a blue square')
    'a red circle right of a blue square'
"""
from __future__ import annotations

import re

__all__ = ['clean_caption', 'swap_left_right', 'check_unicode']

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r'[-/]')
_WHITESPACE = re.compile(r'\s+')
_LEFT_RIGHT = re.compile(r'\b(left|right)\b')


def clean_caption(text: str, max_words: int = 30) -> str:
    """The normalised caption (see the module docstring); ``max_words`` < 1 means no limit.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``text`` is not valid Unicode: it holds a lone surrogate (``'\\udcff'``), as
            JSON escapes or ``errors='surrogateescape'`` decoding of non-UTF-8 bytes produce; the
            tokenizer would fail on it much later.
    """
    if not isinstance(text, str):
        raise TypeError(f'caption must be a str, got {type(text).__name__}: {text!r}')
    check_unicode(text)
    text = text.lower().replace('<person>', 'person')
    text = _SPACED.sub(' ', _DELETED.sub('', text))
    words = _WHITESPACE.sub(' ', text).strip().split(' ')
    if max_words >= 1:
        words = words[:max_words]
    return ' '.join(words)


def check_unicode(text: str, what: str = 'caption') -> str:
    """``text`` if it encodes to UTF-8, else ``ValueError`` naming the first lone surrogate."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise ValueError(f'{what} {text!r:.120} holds a lone surrogate {bad!r} (U+{ord(bad):04X}) at position '
                         f'{error.start}: not valid Unicode (a \\ud800-\\udfff escape in the JSON, or bytes '
                         'that were not UTF-8); fix the text in the annotation file') from None
    return text


def swap_left_right(text: str) -> str:
    """``text`` with every whole word "left" replaced by "right" and vice versa."""
    return _LEFT_RIGHT.sub(lambda m: 'right' if m.group(1) == 'left' else 'left', text)

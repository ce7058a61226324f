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

__all__ = ['clean_caption', 'swap_left_right']

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r'[-/]')
_WHITESPACE = re.compile(r'\s+')
_LEFT_RIGHT = re.compile(r'\b(left|right)\b')


def clean_caption(text: str, max_words: int = 30) -> str:
    """The normalised caption (see the module docstring); ``max_words`` < 1 means no limit.

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f'caption must be a str, got {type(text).__name__}: {text!r}')
    text = text.lower().replace('<person>', 'person')
    text = _SPACED.sub(' ', _DELETED.sub('', text))
    words = _WHITESPACE.sub(' ', text).strip().split(' ')
    if max_words >= 1:
        words = words[:max_words]
    return ' '.join(words)


def swap_left_right(text: str) -> str:
    """``text`` with every whole word "left" replaced by "right" and vice versa."""
    return _LEFT_RIGHT.sub(lambda m: 'right' if m.group(1) == 'left' else 'left', text)

"""``Backbone.unknown_words`` for tokenizers: the words of a text that hold the unknown token.

One helper for every Hugging Face tokenizer (Janus's, BLIP3o's, a user's) and the encoding
step the reference model's ``tokenizers`` tokenizer shares with it. Words are split as
:func:`fedumm.data.vocabulary.split_words` splits them, so the counts of
:mod:`fedumm.data.vocabulary` add up.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedumm.data.vocabulary import split_words, words_at


def unknown_in_encoding(text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                        unk_id: int | None) -> list[str]:
    """The words of ``text`` holding a token ``unk_id``, from an encoding's ids and character
    offsets (``tokenizers.Encoding``'s, or a fast tokenizer's ``offset_mapping``)."""
    if unk_id is None:
        return []
    return words_at(text, [tuple(o) for i, o in zip(ids, offsets, strict=True) if i == unk_id])


def tokenizer_unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that a Hugging Face tokenizer maps (in part) to its unknown token:
    none where it has no ``unk_token_id`` (a byte-level BPE knows every string). A fast
    tokenizer is asked once, with offsets; a slow one word by word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        return [w for w in split_words(text)
                if unk in tokenizer.encode(w, add_special_tokens=False)]
    return unknown_in_encoding(text, enc["input_ids"], enc["offset_mapping"], unk)

"""Words a backbone's tokenizer does not know, counted over the data a run reads.

Tokenizer-agnostic: the backbone gives a callable ``unknown_words(text) -> list[str]`` (the
optional ``Backbone.unknown_words``), and this module counts, per split and per field, how
many of the data's words it maps to its unknown token, and which ones. A *word* is a run of
word characters or a run of punctuation (``\\w+|[^\\w\\s]+``, the splitting of the
``tokenizers`` ``Whitespace`` pre-tokenizer, which the reference model's tokenizer uses), so
"what's" is three words: "what", "'", "s".

Fields: ``question`` (an understanding sample's text as the backbone is asked it: with its
text modality and modality phrase where the data has one, see :mod:`fedumm.data.prompts`),
``answer`` (its target answer) and ``prompt`` (a generation sample's prompt). An answer with
an unknown word cannot be produced by a backbone whose answers are decoded from its tokenizer
(the unknown token decodes to nothing): :func:`check_answers` refuses to train on such data
unless ``data.allow_unknown_answers``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fedumm.data.prompts import compose_prompt, has_text_modality
from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING

FIELDS = ("question", "answer", "prompt")
TOP = 10
_WORD = re.compile(r"\w+|[^\w\s]+")

UnknownWords = Callable[[str], list[str]]


class UnknownAnswersError(ValueError):
    """Training answers use words the backbone's tokenizer does not know (it could never
    produce them)."""


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, word)`` of each word of ``text``, in order."""
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def split_words(text: str) -> list[str]:
    """The words of ``text`` (see the module docstring), in order."""
    return _WORD.findall(text)


def words_at(text: str, spans: Iterable[tuple[int, int]]) -> list[str]:
    """The words of ``text`` that overlap any character span ``(start, end)`` (an empty span
    counts for the word it sits in), in order, each once per occurrence: how a tokenizer's
    unknown-token offsets become the words that hold them."""
    spans = list(spans)
    out = []
    for ws, we, word in word_spans(text):
        if any((s < we and e > ws) or (s == e and ws <= s < we) for s, e in spans):
            out.append(word)
    return out


def field_texts(samples: Sequence[Sample], fields: Sequence[str] = FIELDS
                ) -> dict[str, list[str]]:
    """Each field's texts (see the module docstring) over ``samples``, for ``fields``;
    missing texts (a dropped modality) are left out."""
    asked = "question" in fields and has_text_modality(list(samples))
    out: dict[str, list[str]] = {f: [] for f in FIELDS}
    for s in samples:
        if s.task == UNDERSTANDING:
            question = compose_prompt(s).text if asked else s.text
            if question and "question" in fields:
                out["question"].append(question)
            if s.answer:
                out["answer"].append(s.answer)
        elif s.task == GENERATION and s.text:
            out["prompt"].append(s.text)
    return out


def field_report(texts: Sequence[str], unknown_words: UnknownWords, top: int = TOP
                 ) -> dict[str, Any]:
    """``words`` (word tokens), ``unknown`` (of them unknown), ``share`` (unknown / words),
    ``texts`` and ``texts_with_unknown``, and ``top``: the most frequent unknown words with
    their counts (``[[word, count], ...]``, most frequent first, ties alphabetical). Each
    distinct text is asked of the tokenizer once."""
    counts = Counter(texts)
    words = unknown = with_unknown = 0
    found: Counter[str] = Counter()
    for text, n in counts.items():
        words += n * len(split_words(text))
        unk = unknown_words(text)
        if unk:
            unknown += n * len(unk)
            with_unknown += n
            for w in unk:
                found[w] += n
    ranked = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"texts": len(texts), "texts_with_unknown": with_unknown, "words": words,
            "unknown": unknown, "share": round(unknown / words, 6) if words else 0.0,
            "top": [[w, c] for w, c in ranked]}


def unknown_word_report(splits: Mapping[str, Sequence[Sample]], unknown_words: UnknownWords,
                        top: int = TOP, fields: Sequence[str] = FIELDS
                        ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split (e.g. ``train``, ``val``) and per field (those of ``fields``):
    :func:`field_report`."""
    return {split: {f: field_report(texts, unknown_words, top)
                    for f, texts in field_texts(samples, fields).items() if f in fields}
            for split, samples in splits.items()}


def describe(report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """One line per split: each field's unknown share and its most frequent unknown words."""
    lines = []
    for split, fields in report.items():
        parts = []
        for f, r in fields.items():
            if not r["words"]:
                continue
            top = ", ".join(f"{w} ({c})" for w, c in r["top"][:5])
            parts.append(f"{f} {r['unknown']}/{r['words']} ({100 * r['share']:.1f}%)"
                         + (f": {top}" if top else ""))
        lines.append(f"{split}: words unknown to the tokenizer: "
                     + ("; ".join(parts) if parts else "no text"))
    return lines


def check_answers(report: Mapping[str, Mapping[str, Mapping[str, Any]]], allow: bool,
                  split: str = "train") -> None:
    """Raise :class:`UnknownAnswersError` when ``split``'s answers have unknown words (the
    backbone could never produce them), unless ``allow``."""
    r = report.get(split, {}).get("answer")
    if allow or not r or not r["unknown"]:
        return
    top = ", ".join(f"{w!r} ({c})" for w, c in r["top"])
    raise UnknownAnswersError(
        f"{r['texts_with_unknown']} of {r['texts']} {split} answers use words the backbone's "
        f"tokenizer does not know, so it can never produce them ({r['unknown']} unknown words;"
        f" most frequent: {top}); use a backbone whose tokenizer knows them, or set "
        "data.allow_unknown_answers=true to train on them anyway")

"""The text tokenizer: a word-level ``tokenizers`` model over ShapesWorld's vocabulary.

Saved as a standard ``tokenizer.json`` next to the checkpoint, so it loads with
``tokenizers.Tokenizer.from_file`` (or ``transformers.PreTrainedTokenizerFast``).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace

from fedumm.data.render import COLORS, POSITIONS, SHAPES
from fedumm.data.world import NUMBER_WORDS, RELATIONS, plural
from fedumm.models.vocabulary import unknown_in_encoding

PAD, UNK, BOS, EOS, SEP, BOI, EOI = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[BOI]", "[EOI]"
SPECIALS = (PAD, UNK, BOS, EOS, SEP, BOI, EOI)

_TEMPLATE_WORDS = (
    "is there a an the what color shape how many are objects object in of photo and "
    "left right above below top bottom center yes no describe image"
)


def world_vocabulary() -> list[str]:
    """Every word ShapesWorld's questions, answers and prompts use (both splits)."""
    words = set(_TEMPLATE_WORDS.split()) | set(COLORS) | set(NUMBER_WORDS)
    words |= {str(i) for i in range(10)} | set(SHAPES) | {plural(s) for s in SHAPES}
    words |= {w for row in POSITIONS for pos in row for w in pos.split()}
    words |= {w for rel in RELATIONS for w in rel.split()}
    words |= {"?", ".", ","}
    return sorted(words)


def build_tokenizer(words: list[str] | None = None) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words or world_vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    return tok


class TextTokenizer:
    """Thin wrapper with the ids the model needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        ids = {s: tokenizer.token_to_id(s) for s in SPECIALS}
        if any(v is None for v in ids.values()):
            missing = [s for s, v in ids.items() if v is None]
            raise ValueError(f"tokenizer lacks special tokens: {missing}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids[PAD], ids[UNK], ids[BOS], ids[EOS]
        self.sep_id, self.boi_id, self.eoi_id = ids[SEP], ids[BOI], ids[EOI]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` not in the vocabulary (after lower-casing), in order."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return unknown_in_encoding(text, enc.ids, enc.offsets, self.unk_id)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def default(cls) -> TextTokenizer:
        return cls(build_tokenizer())

"""Codec spellings: ``[topk:ARG +] BASE [+ ENTROPY]`` parsed into a :class:`CodecSpec`.

Which role a step plays (sparsifier, base, entropy) and which arguments it takes come from the
step class registered under its name in :data:`fedumm.registry.CODECS`; this module only knows
the order of the roles: the sparsifier first and once, one base, the entropy step last.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedumm.fl.codecs.base import BASE, ENTROPY, SPARSIFIER, BaseCodec, lookup, steps
from fedumm.fl.codecs.topk import TopK

DEFAULT_BASE = "float32"  # the base when a spelling leaves it out
_EXAMPLES = ("float32, int8b, nf4+zlib, topk:0.01+int8, topk:0.1+bfloat16+zlib, "
             "int8:block=128")


def accepted_forms() -> str:
    """The help appended to every spelling error, listing the registered steps."""
    sparsifiers = " or ".join(cls.help for _, cls in steps(SPARSIFIER))
    bases = " | ".join(form for _, cls in steps(BASE) for form in cls.spellings())
    entropies = " or ".join(f"'{name}'" for name, _ in steps(ENTROPY))
    return (
        f"accepted spellings are steps joined by '+': an optional {sparsifiers} first; "
        f"then a base: {bases} (the base may be left out after topk or before an entropy step: "
        f"{DEFAULT_BASE}); then optionally {entropies} last. Examples: {_EXAMPLES}"
    )


@dataclass(frozen=True)
class CodecSpec:
    """One parsed codec: optional top-k sparsification, a base encoding, optional entropy coding.

    ``base`` names a registered base step (float32, bfloat16, float16, int8, int8b, nf4, fp4,
    ...); ``block`` is the block size of a blockwise base (int8b/nf4/fp4; None otherwise); at
    most one of ``topk_fraction`` / ``topk_count`` is set; ``entropy`` is None or the name of an
    entropy step (zlib, zstd).
    """

    base: str = DEFAULT_BASE
    block: int | None = None
    topk_fraction: float | None = None
    topk_count: int | None = None
    entropy: str | None = None

    def __post_init__(self) -> None:
        base = lookup(self.base, BASE)
        if base is None:
            names = tuple(name for name, _ in steps(BASE))
            raise ValueError(f"codec base {self.base!r}: expected one of {names}")
        base.check_block(self.block)
        TopK.check(self.topk_fraction, self.topk_count)
        if self.entropy is not None and lookup(self.entropy, ENTROPY) is None:
            names = " or ".join(name for name, _ in steps(ENTROPY))
            raise ValueError(f"codec entropy step {self.entropy!r}: expected {names}")

    def require(self) -> CodecSpec:
        """This spec, once every step's optional package is known to be installed (a step
        class may define ``require()``, raising ImportError with the pip command)."""
        classes = [lookup(self.base, BASE)]
        if self.entropy is not None:
            classes.append(lookup(self.entropy, ENTROPY))
        for cls in classes:
            check = getattr(cls, "require", None)
            if callable(check):
                check()
        return self

    @property
    def base_step(self) -> BaseCodec:
        """The base step that encodes the (kept) values."""
        return lookup(self.base, BASE)(self.block)

    @property
    def sparse(self) -> bool:
        return self.topk_fraction is not None or self.topk_count is not None

    @property
    def lossless(self) -> bool:
        """True when decode(encode(x)) == x for float32 input."""
        return lookup(self.base, BASE).lossless and not self.sparse

    def keep(self, numel: int) -> int:
        """How many entries of a tensor with ``numel`` entries the codec transmits."""
        return TopK.keep(self.topk_fraction, self.topk_count, numel)

    def __str__(self) -> str:
        steps_ = [TopK.spelling(self.topk_fraction, self.topk_count)] if self.sparse else []
        steps_.append(self.base_step.spelling())
        if self.entropy is not None:
            steps_.append(self.entropy)
        return "+".join(steps_)


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"codec {text!r}: {why}; {accepted_forms()}")


def parse_codec(text: str | CodecSpec) -> CodecSpec:
    """Parse a codec spelling such as ``topk:0.01+int8+zlib`` (case and spaces ignored)."""
    if isinstance(text, CodecSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"codec must be a str or CodecSpec, not {type(text).__name__}")
    steps_ = [s.strip().lower() for s in text.split("+")]
    if not text.strip() or any(not s for s in steps_):
        raise _bad(text, "empty step")
    fraction = count = None
    base: tuple[str, int | None] | None = None
    entropy = None
    stage = 0  # 0: nothing yet, 1: after the sparsifier, 2: after the base, 3: after entropy
    for step in steps_:
        name, colon, arg = step.partition(":")
        cls = lookup(name)
        if cls is None or not cls.takes(arg if colon else None):
            raise _bad(text, f"unknown step {step!r}")
        if cls.role == SPARSIFIER:
            if stage != 0:
                raise _bad(text, "topk must be the first step, and appear once")
            fraction, count = _parse_arg(text, cls, arg)
            stage = 1
        elif cls.role == ENTROPY:
            if stage == 3:
                raise _bad(text, "at most one entropy step (zlib or zstd)")
            entropy, stage = name, 3
        else:  # a base: its argument is checked before its position
            parsed = _parse_arg(text, cls, arg if colon else None)
            if stage >= 2:
                raise _bad(text, "one base step, before any entropy step")
            base, stage = parsed, 2
    name, block = base if base is not None else (DEFAULT_BASE, None)
    return CodecSpec(base=name, block=block, topk_fraction=fraction, topk_count=count,
                     entropy=entropy)


def resolve_codec(text: str | CodecSpec) -> CodecSpec:
    """What ``CODECS.resolve`` should answer: the parsed spelling, refused (ImportError
    naming the package and the pip command) when a step needs a package that is missing.
    :func:`parse_codec` alone accepts such a spelling (a payload can still be inspected)."""
    return parse_codec(text).require()


def _parse_arg(text: str, cls: type, arg: str | None) -> tuple:
    try:
        return cls.parse(arg)
    except ValueError as exc:
        raise _bad(text, str(exc)) from None


def carries_values(spec: CodecSpec | str) -> bool:
    """True when the payload holds every value itself in a float dtype (a dense plain cast:
    float32, bfloat16, float16, no topk), so its tensors can stand in for the state."""
    spec = parse_codec(spec)
    return not spec.sparse and lookup(spec.base, BASE).dense_cast

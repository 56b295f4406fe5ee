"""Adapter groups as data: which modules of a backbone each group trains, which samples train
it, and which group each adapter tensor (a PEFT state-dict name) belongs to."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedumm.data.scenarios import MODALITIES, UNDERSTANDING

# the num_samples key of understanding samples that hold their image (see needs_images)
IMAGE_INPUTS = "understanding_with_image"

# PEFT names adapter tensors ``<module path>.lora_A.weight`` etc.; the module path is what a
# group's target regex matches.
_LORA_SUFFIX = re.compile(r"\.(lora_[A-Za-z_]+|lora_embedding_[AB])(\.weight|\.bias)?$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class DecoderLayers:
    """Where a backbone's language decoder layers are: ``pattern`` finds a parameter's layer
    index (its one group), ``count`` is the decoder depth L. Layer-wise methods (FedMLLM's
    layer-adaptive regulariser) read the depth from here instead of assuming one model."""

    pattern: str
    count: int

    def index(self, key: str) -> int | None:
        """The decoder layer a parameter name belongs to, or None outside the decoder."""
        m = re.search(self.pattern, key)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class AdapterGroup:
    """One adapter group of a backbone.

    ``target``: a regex that PEFT full-matches against module names (LoRA is added to every
    match), or None for a group without LoRA layers. ``modules_to_save``: module names whose
    weights the group trains in full (a copy per client, as PEFT's ``modules_to_save``).
    ``trainable_tokens``: (embedding module name, token ids) pairs whose rows the group trains
    (PEFT's ``trainable_token_indices``), e.g. special tokens shared by both tasks.
    ``modalities``: the sample tasks whose samples train the group; a client's aggregation
    weight for the group counts only those samples.
    """

    name: str
    target: str | None
    modalities: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    trainable_tokens: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # an image encoder: only understanding samples that hold their image train it, and its
    # aggregation weight counts those (a text-only client gives it no weight)
    needs_images: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"adapter group {self.name!r}: modalities must be a non-empty "
                             f"subset of {list(MODALITIES)}, got {list(self.modalities)}")
        if self.needs_images and self.modalities != (UNDERSTANDING,):
            raise ValueError(f"adapter group {self.name!r}: an image encoder (needs_images) is "
                             f"trained by understanding samples only, not {self.modalities}")
        if self.target is None and not self.modules_to_save and not self.trainable_tokens:
            raise ValueError(f"adapter group {self.name!r} trains nothing (no target, "
                             "modules_to_save or trainable_tokens)")

    def owns(self, key: str) -> bool:
        """Whether the adapter tensor ``key`` (a PEFT state-dict name) belongs to this group."""
        path = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = _LORA_SUFFIX.search(path)
        if m is not None:
            return self.target is not None and re.fullmatch(self.target, path[:m.start()]) \
                is not None
        parts = path.split(".")
        if "token_adapter" in parts:
            return any(name in parts for name, _ in self.trainable_tokens)
        return any(name in parts for name in self.modules_to_save)


class AdapterLayout:
    """The groups of one backbone and which group each adapter tensor belongs to."""

    def __init__(self, groups: Sequence[AdapterGroup]) -> None:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter group names repeat: {names}")
        self.groups: dict[str, AdapterGroup] = {g.name: g for g in groups}
        self._cache: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def group_of(self, key: str) -> str:
        if key not in self._cache:
            owners = [g.name for g in self.groups.values() if g.owns(key)]
            if len(owners) != 1:
                what = "no adapter group" if not owners else f"several groups {owners}"
                raise KeyError(f"adapter tensor {key!r} belongs to {what}")
            self._cache[key] = owners[0]
        return self._cache[key]

    def modalities(self, group: str) -> tuple[str, ...]:
        return self.groups[group].modalities

    def sample_keys(self, group: str) -> tuple[str, ...]:
        """The ``num_samples`` keys that count a client's samples training ``group``."""
        g = self.groups[group]
        return (IMAGE_INPUTS,) if g.needs_images else g.modalities

    def select(self, names: Sequence[str]) -> list[AdapterGroup]:
        """The named groups in declaration order; an unknown or empty selection is an error."""
        bad = [g for g in names if g not in self.groups]
        if bad or not names:
            raise ValueError(f"lora.groups: expected a non-empty subset of {list(self.groups)}, "
                             f"got {list(names)}")
        return [g for n, g in self.groups.items() if n in names]

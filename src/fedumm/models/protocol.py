"""The Backbone protocol: what fedumm needs from a unified multimodal model.

Everything outside ``fedumm.models`` (the client trainer, evaluation, strategies, runtimes)
talks to a model only through this protocol, so the reference model, Janus-Pro and a
BLIP3o-style model (an autoregressive backbone plus a flow-matching diffusion head) are
interchangeable by ``backbone.kind``:

* ``groups`` declares the adapter groups as data (:mod:`fedumm.models.groups`): a PEFT target
  regex, modules trained in full (``modules_to_save``) and the modalities whose samples train
  the group.
* ``collate(samples, drop_text)`` turns :class:`~fedumm.data.records.Sample` records into a
  :class:`Batch` with the backbone's own processor; ``loss(batch)`` returns one scalar per
  modality present (token cross-entropy, or a flow-matching loss: the trainer does not care).
* ``generation_quality(samples)`` is the backbone's own held-out score in [0, 1] of generation
  samples (each backbone documents what it measures). The per-modality quality that
  quality-weighted aggregation uses is composed above this layer
  (``fedumm.eval.model_eval.heldout_quality``: exact-match answer accuracy through
  ``answer``, plus this score), so every backbone scores understanding the same way.
* ``answer`` / ``generate`` are the two capabilities evaluation scores.

The registry of kinds is :data:`fedumm.registry.BACKBONES` (:mod:`fedumm.models.kinds`); the
names below that live in other modules are re-exported here for the callers that import them
from the protocol.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.models.groups import IMAGE_INPUTS, AdapterGroup, AdapterLayout, DecoderLayers
from fedumm.models.placement import (
    ModelPlacement,
    base_state_dict,
    in_eval_mode,
    resolve_device,
    state_fingerprint,
)

if TYPE_CHECKING:
    from fedumm.data.records import Sample

__all__ = ["GENERATION", "IMAGE_INPUTS", "UNDERSTANDING", "AdapterGroup", "AdapterLayout",
           "Backbone", "Batch", "DecoderLayers", "ModelPlacement", "base_state_dict",
           "in_eval_mode", "prepare_samples", "resolve_device", "state_fingerprint"]


@dataclass
class Batch:
    """A collated batch: one tensor dict per modality present, and its sample counts.

    What the dicts hold is the backbone's business; the trainer only weighs the per-modality
    losses by ``counts``.
    """

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.counts.values())


Image = np.ndarray  # uint8 (H, W, 3)


@runtime_checkable
class Backbone(Protocol):
    """A frozen unified multimodal model that fedumm can adapt, federate and evaluate.

    Optional capability: ``answer_likelihoods(images, questions, candidates) -> (N, C)``, the
    log-likelihood of each candidate answer per question; with it classification tasks get
    an AUC from answer probabilities (the built-in backbones have it), without it
    only the hard-label metrics.

    Optional capability: ``unknown_words(text) -> list[str]``, the words of ``text`` (split as
    :func:`fedumm.data.vocabulary.split_words` splits them, in order, once per occurrence)
    that the backbone's tokenizer maps to its unknown token: the reference model's words
    outside its vocabulary, a Hugging Face tokenizer's words holding ``unk_token_id`` (none
    for a byte-level BPE; :func:`fedumm.models.vocabulary.tokenizer_unknown_words`). An
    answer with an unknown word can never be produced (``answer`` decodes from the tokenizer),
    so a run refuses such training answers unless ``data.allow_unknown_answers``. The built-in
    backbones have it; without it the data's words are not checked.

    Optional capability: ``answer_head`` (an ``nn.Module`` whose output's last dimension is the
    text vocabulary: the logits the understanding loss takes its softmax over) and
    ``answer_token_ids(answers) -> list[list[int]]`` (the token ids that loss supervises for
    each answer, its end token included, as ``collate`` places them). With both, a client can
    calibrate the answer head against its own answer distribution under label skew
    (:mod:`fedumm.fl.answer_calibration`, ``train.answer_calibration``); the built-in
    backbones have them.

    Optional setting: ``generation_trains_language: bool``, on a backbone whose generation is
    a network of its own conditioned on the language model (BLIP3o's DiT): whether the
    generation loss also trains the language adapters (and so whether the language group
    counts generation samples). The runtime sets it from ``lora.generation_trains_language``
    before it builds the adapters. A backbone that generates through the language model itself
    (reference, Janus) has no such attribute: its generation always trains that model."""

    kind: str
    model: nn.Module  # what PEFT wraps; module names are what the group targets match

    @property
    def groups(self) -> tuple[AdapterGroup, ...]: ...

    @property
    def decoder_layers(self) -> DecoderLayers:
        """The language decoder's layers (parameter-name pattern and depth)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def image_size(self) -> int:
        """Side of the square images ``generate`` returns."""
        ...

    def prepare(self, samples: Sequence[Sample],
                progress: Callable[[int, int], None] | None = None) -> None:
        """Optionally precompute per-sample inputs (tokens, target image codes) that ``collate``
        would otherwise compute every epoch. Calling it is never required for correctness.
        ``progress(done, total)``, where given, is called as the work advances (a backbone
        whose ``prepare`` takes no ``progress`` still works: see :func:`prepare_samples`)."""
        ...

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        """Samples -> a batch; ``drop_text[i]`` replaces generation sample i's prompt by the
        empty (unconditional) prompt that classifier-free guidance needs."""
        ...

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Mean loss per modality present in ``batch`` (scalars with gradients)."""
        ...

    def generation_quality(self, samples: Sequence[Sample]) -> float:
        """Held-out quality in [0, 1] of generation samples (at least one; all of task
        ``generation``), deterministic for fixed weights: how well the model produces their
        target images, by the backbone's own measure (higher is better)."""
        ...

    def answer(self, images: Sequence[Image | None], questions: Sequence[str]) -> list[str]:
        """Greedy answers; an image of None means the sample has no image."""
        ...

    def generate(self, prompts: Sequence[str], seed: int = 0,
                 cfg_scale: float | None = None) -> list[Image]:
        """One ``image_size`` x ``image_size`` uint8 image per prompt, deterministic in seed.
        ``cfg_scale`` is the classifier-free guidance scale; None is the backbone's own
        default (a backbone without guidance ignores it)."""
        ...

    def fingerprint(self) -> str:
        """sha256 of the frozen weights, so clients can refuse a backbone they don't expect."""
        ...


def prepare_samples(backbone: Backbone, samples: Sequence[Sample],
                    progress: Callable[[int, int], None] | None = None) -> None:
    """``backbone.prepare(samples)``, with ``progress`` where its ``prepare`` takes one (a
    backbone written before the parameter existed is called as it was)."""
    if progress is not None and "progress" in inspect.signature(backbone.prepare).parameters:
        backbone.prepare(samples, progress=progress)
    else:
        backbone.prepare(samples)

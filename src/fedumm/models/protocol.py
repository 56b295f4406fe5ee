"""The Backbone protocol: what fedumm needs from a unified multimodal model, and the registry.

Everything outside ``fedumm.models`` (the client trainer, evaluation, strategies, runtimes)
talks to a model only through this protocol, so the reference model, Janus-Pro and a
BLIP3o-style model (an autoregressive backbone plus a flow-matching diffusion head) are
interchangeable by ``backbone.kind``:

* ``groups`` declares the adapter groups as data: a PEFT target regex, modules trained in full
  (``modules_to_save``) and the modalities whose samples train the group.
* ``collate(samples, drop_text)`` turns :class:`~fedumm.data.records.Sample` records into a
  :class:`Batch` with the backbone's own processor; ``loss(batch)`` returns one scalar per
  modality present (token cross-entropy, or a flow-matching loss: the trainer does not care).
* ``quality(samples)`` is a held-out score in [0, 1] per modality for quality-weighted
  aggregation; each backbone documents what it measures.
* ``answer`` / ``generate`` are the two capabilities evaluation scores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedumm.data.scenarios import GENERATION, MODALITIES, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig
    from fedumm.data.records import Sample

__all__ = ["GENERATION", "UNDERSTANDING", "AdapterGroup", "AdapterLayout", "Backbone", "Batch",
           "ModelPlacement", "check_trainable_preset",
           "backbone_kinds", "backbone_skeleton", "base_state_dict", "build_backbone",
           "register_backbone", "resolve_device", "state_fingerprint"]

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
    only the hard-label metrics."""

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

    def prepare(self, samples: Sequence[Sample]) -> None:
        """Optionally precompute per-sample inputs (tokens, target image codes) that ``collate``
        would otherwise compute every epoch. Calling it is never required for correctness."""
        ...

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        """Samples -> a batch; ``drop_text[i]`` replaces generation sample i's prompt by the
        empty (unconditional) prompt that classifier-free guidance needs."""
        ...

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Mean loss per modality present in ``batch`` (scalars with gradients)."""
        ...

    def quality(self, samples: Sequence[Sample]) -> dict[str, float]:
        """Held-out quality in [0, 1] per modality present in ``samples``."""
        ...

    def answer(self, images: Sequence[Image | None], questions: Sequence[str]) -> list[str]:
        """Greedy answers; an image of None means the sample has no image."""
        ...

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Image]:
        """One ``image_size`` x ``image_size`` uint8 image per prompt, deterministic in seed."""
        ...

    def fingerprint(self) -> str:
        """sha256 of the frozen weights, so clients can refuse a backbone they don't expect."""
        ...


class ModelPlacement:
    """``device`` and ``dtype`` of a backbone, read off its model's parameters, and the
    fingerprint of its frozen weights (hashed once: the base does not change)."""

    model: nn.Module
    _fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(base_state_dict(self.model))
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode inside the block (answering, scoring, generating between
        training steps), and back in the mode it had after it, also when the block raises."""
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)


def in_eval_mode(method: Callable) -> Callable:
    """A backbone method that answers, scores or generates: it runs inside
    :meth:`ModelPlacement.evaluating`."""
    @functools.wraps(method)
    def wrapper(self: ModelPlacement, *args: Any, **kwargs: Any) -> Any:
        with self.evaluating():
            return method(self, *args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------- registry

Builder = Callable[["BackboneConfig"], Backbone]
_REGISTRY: dict[str, Builder] = {}
Skeleton = Callable[["BackboneConfig"], tuple[nn.Module, tuple[AdapterGroup, ...]]]
_SKELETONS: dict[str, Skeleton] = {}


def register_backbone(kind: str, builder: Builder, skeleton: Skeleton | None = None) -> None:
    """Make ``backbone.kind=<kind>`` build a backbone with ``builder(cfg.backbone)``.

    ``skeleton`` (optional) gives the model (on the meta device where it is large: no memory,
    no weights) and its adapter groups, for ``fedumm backbone info``."""
    _REGISTRY[kind] = builder
    if skeleton is not None:
        _SKELETONS[kind] = skeleton


def _ensure_builtin() -> None:
    # the built-in backbones register themselves on import
    import fedumm.models.blip3o  # noqa: F401
    import fedumm.models.janus  # noqa: F401
    import fedumm.models.reference  # noqa: F401


def backbone_kinds() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone ``cfg.kind`` names, built from ``cfg`` (path or preset, device, dtype)."""
    _ensure_builtin()
    if cfg.kind not in _REGISTRY:
        raise ValueError(f"backbone.kind={cfg.kind!r} is not registered; known kinds: "
                         f"{sorted(_REGISTRY)}")
    return _REGISTRY[cfg.kind](cfg)


def backbone_skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple[AdapterGroup, ...]]:
    _ensure_builtin()
    if cfg.kind not in _SKELETONS:
        raise ValueError(f"backbone.kind={cfg.kind!r} cannot be described without weights")
    return _SKELETONS[cfg.kind](cfg)


# --------------------------------------------------------------------------- helpers

def check_trainable_preset(kind: str, preset: str, presets: Sequence[str]) -> None:
    """A preset name a backbone knows, and one small enough to train (the published sizes
    have random weights: they are for `fedumm backbone info`)."""
    if preset not in presets:
        raise ValueError(f"backbone.preset={preset!r}: the {kind} backbone has presets "
                         f"{list(presets)}")
    if preset != "tiny":
        raise ValueError(f"backbone.preset={preset!r} has real dimensions and random weights: "
                         "use it with `fedumm backbone info`; train with backbone.preset=tiny "
                         "or a checkpoint in backbone.path")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"backbone.device={name!r} but this machine has no CUDA device")
    return dev


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights, named as in the plain model, whether or not PEFT wraps it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name or "trainable_tokens_delta" in name:
            continue
        for wrapper in (".token_adapter.base_layer.", ".base_layer.", ".original_module."):
            name = name.replace(wrapper, ".")
        out[name] = tensor
    return out

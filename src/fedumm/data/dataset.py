"""A multimodal dataset: images plus understanding (VQA) and generation (GenEval) samples.

Samples are numbered VQA first, then generation, so partitioners can work on plain index
arrays: sample ``i < num_vqa`` is ``vqa[i]``, the rest are ``gen[i - num_vqa]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedumm.data.records import GenEvalRecord, VQARecord
from fedumm.data.render import SceneObject, render_scene
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.data.world import (
    QUESTION_FAMILIES,
    SPLITS,
    get_split,
    human_answers,
    partial_description,
    sample_prompt,
    sample_scene,
)

_ROLES = {"train": 0, "val": 1, "test": 2}


@dataclass
class MultimodalDataset:
    """Images and the samples that use them. ``scenes`` is empty for real data."""

    split: str
    images: np.ndarray  # (num_images, H, W, 3) uint8
    image_ids: list[int]
    domains: list[str]  # per image
    vqa: list[VQARecord]
    gen: list[GenEvalRecord]
    gen_image: list[int]  # per generation record: image id of its target
    scenes: list[list[SceneObject]] = field(default_factory=list)
    # per understanding record: its text modality (a partial scene description); empty: none
    contexts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._row = {iid: i for i, iid in enumerate(self.image_ids)}

    @property
    def num_samples(self) -> int:
        return len(self.vqa) + len(self.gen)

    def image(self, image_id: int) -> np.ndarray:
        if image_id not in self._row:
            raise KeyError(f"image id {image_id} is not in the {self.split} dataset")
        return self.images[self._row[image_id]]

    def scene(self, image_id: int) -> list[SceneObject]:
        """The objects drawn in an image (ShapesWorld data only)."""
        return self.scenes[self._row[image_id]]

    def modality(self) -> list[str]:
        return [UNDERSTANDING] * len(self.vqa) + [GENERATION] * len(self.gen)

    def sample_domains(self) -> list[str]:
        rows = [self._row[r.image_id] for r in self.vqa] + [self._row[i] for i in self.gen_image]
        return [self.domains[r] for r in rows]

    def labels(self, key: str) -> list[str]:
        """One label per sample for partitioning. Keys that belong to one modality label the
        other modality's samples by that modality's own coarse label (e.g. ``gen/colors``)."""
        vqa_keys = {
            "answer": lambda r: r.multiple_choice_answer,
            "question_type": lambda r: r.question_type,
            "answer_type": lambda r: r.answer_type,
            "family": lambda r: r.family or r.question_type,
        }
        if key == "modality":
            return self.modality()
        if key in vqa_keys:
            return [vqa_keys[key](r) for r in self.vqa] + [f"gen/{g.tag}" for g in self.gen]
        if key == "tag":
            return [f"vqa/{r.answer_type}" for r in self.vqa] + [g.tag for g in self.gen]
        if key == "object_class":
            first = [self.scenes[self._row[r.image_id]][0].shape if self.scenes
                     else r.answer_type for r in self.vqa]
            return first + [g.include[0]["class"] for g in self.gen]
        raise ValueError(
            f"unknown label key {key!r}; expected one of "
            f"{sorted([*vqa_keys, 'tag', 'object_class', 'modality'])}"
        )


def generate_shapes(
    split: str = "downstream",
    num_scenes: int = 200,
    *,
    seed: int = 0,
    role: str = "train",
    image_size: int = 48,
    max_objects: int = 4,
    questions_per_image: int = 2,
    generation_fraction: float = 0.5,
    annotator_noise: float = 0.1,
    tag_weights: dict[str, float] | None = None,
    families: Sequence[str] = (),
    scene_text: float = 0.0,
) -> MultimodalDataset:
    """Generate a ShapesWorld dataset; a pure function of its arguments.

    ``role`` (train / val / test) picks an independent random stream, so held-out data never
    repeats training draws for the same seed. ``tag_weights`` (relative; 1 for a tag not named)
    skews the mix of generation prompts; by default every tag of the split is equally likely.
    ``families`` restricts the understanding questions to these families (default: the
    split's). ``scene_text`` > 0 gives every understanding sample a text modality: a scene
    description that mentions each object with that probability, drawn from its own random
    stream (the images, questions and prompts stay what they are without it).
    """
    spec = get_split(split)
    unknown = sorted(set(families) - set(QUESTION_FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; expected some of "
                         f"{list(QUESTION_FAMILIES)}")
    if not 0.0 <= scene_text <= 1.0:
        raise ValueError(f"scene_text must be in [0, 1], got {scene_text}")
    family_pool = tuple(families) or spec.families
    if role not in _ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(_ROLES)}")
    if not 0.0 <= generation_fraction < 1.0:
        raise ValueError(f"generation_fraction must be in [0, 1), got {generation_fraction}")
    tag_p = _tag_probabilities(spec.tags, tag_weights)
    rng = np.random.default_rng([seed, 1 + list(SPLITS).index(split),
                                 _ROLES[role]])
    images, ids, domains, scenes, vqa = [], [], [], [], []
    for i in range(num_scenes):
        objs = sample_scene(rng, spec, image_size, max_objects)
        domain = str(rng.choice(spec.domains))
        image_id = i + 1
        images.append(render_scene(objs, image_size, domain, rng))
        ids.append(image_id)
        domains.append(domain)
        scenes.append(objs)
        for k in range(questions_per_image):
            qa = None
            while qa is None:  # some families need e.g. a unique shape in the scene
                family = str(rng.choice(family_pool))
                qa = QUESTION_FAMILIES[family](rng, objs, spec)
            q, ans, qtype, atype = qa
            vqa.append(VQARecord(
                question_id=image_id * 1000 + k, image_id=image_id, question=q,
                question_type=qtype, answer_type=atype, multiple_choice_answer=ans,
                answers=human_answers(rng, ans, atype, spec, annotator_noise), family=family,
            ))
    num_gen = round(len(vqa) * generation_fraction / (1.0 - generation_fraction))
    gen, gen_image = [], []
    for j in range(num_gen):
        tag = str(rng.choice(spec.tags, p=tag_p))
        record, objs = sample_prompt(rng, spec, image_size, tag)
        image_id = num_scenes + j + 1
        images.append(render_scene(objs, image_size, "clean"))
        ids.append(image_id)
        domains.append("clean")
        scenes.append(objs)
        gen.append(record)
        gen_image.append(image_id)
    arr = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    contexts: list[str] = []
    if scene_text > 0:
        text_rng = np.random.default_rng([seed, 1 + list(SPLITS).index(split), _ROLES[role], 5])
        contexts = [partial_description(text_rng, scenes[r.image_id - 1], scene_text)
                    for r in vqa]
    return MultimodalDataset(split, arr, ids, domains, vqa, gen, gen_image, scenes, contexts)


def _tag_probabilities(tags: tuple[str, ...],
                       weights: dict[str, float] | None) -> np.ndarray | None:
    if not weights:
        return None
    unknown = sorted(set(weights) - set(tags))
    if unknown:
        raise ValueError(f"tag_weights names tags {unknown} outside this split's {list(tags)}")
    w = np.array([float(weights.get(t, 1.0)) for t in tags])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"tag_weights must be >= 0 with a positive total, got {weights}")
    return w / w.sum()


def subset_samples(data: MultimodalDataset, indices: Sequence[int]) -> MultimodalDataset:
    """The samples at ``indices`` (global numbering), sharing the image array."""
    idx = np.asarray(indices, dtype=np.int64)
    nv = len(data.vqa)
    vqa = [data.vqa[i] for i in idx[idx < nv]]
    gsel = idx[idx >= nv] - nv
    contexts = [data.contexts[i] for i in idx[idx < nv]] if data.contexts else []
    return MultimodalDataset(
        data.split, data.images, data.image_ids, data.domains, vqa,
        [data.gen[i] for i in gsel], [data.gen_image[i] for i in gsel], data.scenes, contexts,
    )

"""ShapesWorld as a data source: the generator of its datasets and its reader of samples.

:func:`generate_shapes` draws a dataset (images, the scenes drawn in them, VQA questions and
GenEval prompts) from :mod:`fedumm.data.world`'s rules and :mod:`fedumm.data.render`'s
pictures, a pure function of its arguments. Fine-tuning reads it as
:class:`~fedumm.data.records.Sample` s like any other source (:func:`shapes_samples`;
``data.format=shapes``, registered as ``shapes``). The reference model's pretraining and the
exporters keep the dataset itself (:class:`ShapesWorldData`) because they need what a sample
does not hold: the images as one array, the scenes, and the official records that are written
to VQA v2 and GenEval files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedumm.data.official import GenEvalRecord, VQARecord
from fedumm.data.readers.common import Reader
from fedumm.data.records import ImageRef, Sample
from fedumm.data.render import SceneObject, render_scene
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.data.world import (
    QUESTION_FAMILIES,
    SPLITS,
    ask_question,
    askable_scene,
    check_families,
    get_split,
    human_answers,
    partial_description,
    sample_prompt,
    sample_scene,
)
from fedumm.registry import READERS

if TYPE_CHECKING:
    from fedumm.config import DataConfig

_ROLES = {"train": 0, "val": 1, "test": 2}


@dataclass
class ShapesWorldData:
    """A generated ShapesWorld dataset: images, the scenes drawn in them, and the samples that
    use them, numbered VQA first, then generation (the order :func:`shapes_samples` keeps)."""

    split: str
    images: np.ndarray  # (num_images, H, W, 3) uint8
    image_ids: list[int]
    domains: list[str]  # per image
    vqa: list[VQARecord]
    gen: list[GenEvalRecord]
    gen_image: list[int]  # per generation record: image id of its target
    scenes: list[list[SceneObject]]  # per image: the objects drawn in it
    # per understanding record: its text modality (a partial scene description); empty: none
    contexts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._row = {iid: i for i, iid in enumerate(self.image_ids)}

    def image(self, image_id: int) -> np.ndarray:
        if image_id not in self._row:
            raise KeyError(f"image id {image_id} is not in the {self.split} dataset")
        return self.images[self._row[image_id]]

    def scene(self, image_id: int) -> list[SceneObject]:
        """The objects drawn in an image."""
        return self.scenes[self._row[image_id]]

    def domain(self, image_id: int) -> str:
        """The visual domain an image is rendered in."""
        return self.domains[self._row[image_id]]


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
) -> ShapesWorldData:
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
    if questions_per_image > 0:  # a request no scene can meet fails now, not in a loop
        check_families(family_pool, max_objects)
    for i in range(num_scenes):
        objs = askable_scene(rng, spec, image_size, max_objects, family_pool) \
            if questions_per_image > 0 else sample_scene(rng, spec, image_size, max_objects)
        domain = str(rng.choice(spec.domains))
        image_id = i + 1
        images.append(render_scene(objs, image_size, domain, rng))
        ids.append(image_id)
        domains.append(domain)
        scenes.append(objs)
        for k in range(questions_per_image):
            family, (q, ans, qtype, atype) = ask_question(rng, objs, spec, family_pool)
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
    return ShapesWorldData(split, arr, ids, domains, vqa, gen, gen_image, scenes, contexts)


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


def shapes_world(cfg: DataConfig, role: str = "train") -> ShapesWorldData:
    """The ShapesWorld dataset a data config describes (train or held-out scenes)."""
    return generate_shapes(
        cfg.split, cfg.train_scenes if role == "train" else cfg.val_scenes, seed=cfg.seed,
        role=role, image_size=cfg.image_size, max_objects=cfg.max_objects,
        questions_per_image=cfg.questions_per_image,
        generation_fraction=cfg.generation_fraction, annotator_noise=cfg.annotator_noise,
        families=cfg.families, scene_text=cfg.scene_text,
    )


def shapes_samples(data: ShapesWorldData) -> list[Sample]:
    """Understanding samples first, then generation samples (the dataset's numbering), each
    labelled for every partition key. A key of the other modality gets that modality's coarse
    label (``gen/<tag>``, ``vqa/<answer type>``), as :func:`fedumm.data.clients.sample_labels`
    would give; ``object_class`` is the first object's shape of a question's scene, the first
    included class of a prompt."""
    out: list[Sample] = []
    for i, r in enumerate(data.vqa):
        labels = {"answer": r.multiple_choice_answer, "question_type": r.question_type,
                  "answer_type": r.answer_type, "family": r.family or r.question_type,
                  "tag": f"vqa/{r.answer_type}",
                  "object_class": data.scene(r.image_id)[0].shape,
                  "domain": data.domain(r.image_id)}
        out.append(Sample(
            id=f"q{r.question_id}", task=UNDERSTANDING, text=r.question,
            image=ImageRef(array=data.image(r.image_id)), answer=r.multiple_choice_answer,
            answers=tuple(r.answers), labels={k: str(v) for k, v in labels.items()},
            context=data.contexts[i] if data.contexts else None))
    for g, image_id in zip(data.gen, data.gen_image, strict=True):
        coarse = f"gen/{g.tag}"
        labels = {"answer": coarse, "question_type": coarse, "answer_type": coarse,
                  "family": coarse, "tag": g.tag, "object_class": g.include[0]["class"],
                  "domain": data.domain(image_id)}
        out.append(Sample(
            id=f"g{image_id}", task=GENERATION, text=g.prompt,
            image=ImageRef(array=data.image(image_id)),
            labels={k: str(v) for k, v in labels.items()}, spec=g.to_json()))
    return out


def _source(cfg: DataConfig, role: str) -> list[Sample]:
    """``data.format=shapes``: the held-out role draws the held-out scenes; ``train`` and
    ``all`` the training scenes (generated data has no files to split)."""
    return shapes_samples(shapes_world(cfg, "val" if role == "val" else "train"))


READERS.register("shapes", Reader(source=_source))

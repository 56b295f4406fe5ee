"""ShapesWorld as Sample records: the generated images stay in memory, labels are precomputed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedumm.data.dataset import MultimodalDataset, generate_shapes
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import DataConfig


def shapes_world(cfg: DataConfig, role: str = "train") -> MultimodalDataset:
    """The ShapesWorld dataset a data config describes (train or held-out scenes)."""
    return generate_shapes(
        cfg.split, cfg.train_scenes if role == "train" else cfg.val_scenes, seed=cfg.seed,
        role=role, image_size=cfg.image_size, max_objects=cfg.max_objects,
        questions_per_image=cfg.questions_per_image,
        generation_fraction=cfg.generation_fraction, annotator_noise=cfg.annotator_noise,
        families=cfg.families, scene_text=cfg.scene_text,
    )


def shapes_samples(data: MultimodalDataset) -> list[Sample]:
    """Understanding samples first, then generation samples (the dataset's global numbering),
    each labelled for every partition key (``MultimodalDataset.labels``)."""
    keys = ("answer", "question_type", "answer_type", "family", "tag", "object_class")
    columns = {k: data.labels(k) for k in keys}
    columns["domain"] = data.sample_domains()
    nv = len(data.vqa)
    out: list[Sample] = []
    for i, r in enumerate(data.vqa):
        out.append(Sample(
            id=f"q{r.question_id}", task=UNDERSTANDING, text=r.question,
            image=ImageRef(array=data.image(r.image_id)), answer=r.multiple_choice_answer,
            answers=tuple(r.answers), labels={k: str(v[i]) for k, v in columns.items()},
            context=data.contexts[i] if data.contexts else None))
    for j, (g, image_id) in enumerate(zip(data.gen, data.gen_image, strict=True)):
        out.append(Sample(
            id=f"g{image_id}", task=GENERATION, text=g.prompt,
            image=ImageRef(array=data.image(image_id)),
            labels={k: str(v[nv + j]) for k, v in columns.items()},
            spec=g.to_json()))
    return out

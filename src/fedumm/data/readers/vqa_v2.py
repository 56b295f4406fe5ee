"""Understanding samples from VQA v2's official files (questions + annotations JSON and a COCO
image folder, :mod:`fedumm.data.readers.vqa_v2_files`), keeping the 10 human answers for the
official metric and the annotation's question and answer types as partition labels."""

from __future__ import annotations

import re
from pathlib import Path

from fedumm.data.images import check_image
from fedumm.data.readers.common import (
    DataFileError,
    Reader,
    shared_labels,
    understanding_labels,
)
from fedumm.data.readers.vqa_v2_files import load_vqa_v2
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import UNDERSTANDING
from fedumm.registry import READERS

QUESTIONS_RE = re.compile(r"v2_OpenEnded_mscoco_(.+)_questions\.json$")


def find_vqa_split(path: Path) -> tuple[Path, str] | None:
    """(root, split) when ``path`` is a VQA v2 questions file or a folder holding one (directly
    or in ``Questions/``); None otherwise."""
    if path.is_file():
        m = QUESTIONS_RE.search(path.name)
        if not m:
            return None
        root = path.parent.parent if path.parent.name == "Questions" else path.parent
        return root, m.group(1)
    found = sorted(p for d in (path, path / "Questions") if d.is_dir()
                   for p in d.iterdir() if QUESTIONS_RE.search(p.name))
    if len(found) > 1:
        raise DataFileError(path, "", f"{len(found)} VQA v2 question files "
                            f"({', '.join(p.name for p in found)}); give one of them as the path")
    return find_vqa_split(found[0]) if found else None


def read_vqa(path: Path, images: str = "", max_samples: int = 0) -> list[Sample]:
    """Every annotated question of a VQA v2 split; images in ``images`` (default
    ``root/<split>``), each checked to exist."""
    found = find_vqa_split(path)
    if found is None:
        raise DataFileError(path, "", "no VQA v2 questions file (v2_OpenEnded_mscoco_<split>_"
                            "questions.json) here")
    root, split = found
    ds = load_vqa_v2(root, split, image_dir=images or None)
    out = []
    images_of: dict[int, ImageRef] = {}  # each image checked once, however many questions
    for r in ds.records[:max_samples or None]:
        image = images_of.get(r.image_id)
        if image is None:
            try:
                image = ImageRef(path=str(ds.image_path(r.image_id)))
                check_image(image.path)  # its header: an image, within the pixel budget
            except (FileNotFoundError, DataFileError) as exc:
                raise DataFileError(root, f"question {r.question_id}", str(exc)) from exc
            images_of[r.image_id] = image
        # the annotation's own types over the derived ones; a new dict (the derived one is
        # shared with every record of the same labels)
        labels = shared_labels({**understanding_labels(r.question, r.multiple_choice_answer),
                                "question_type": r.question_type,
                                "answer_type": r.answer_type,
                                **({"family": r.family} if r.family else {})})
        out.append(Sample(id=f"q{r.question_id}", task=UNDERSTANDING, text=r.question,
                          image=image, answer=r.multiple_choice_answer,
                          answers=tuple(r.answers), labels=labels))
    return out


READERS.register("vqa_v2", Reader(
    read=lambda path, modality, cfg: read_vqa(path, cfg.images, cfg.max_samples),
    detect=lambda path: find_vqa_split(path) is not None,
    modalities=(UNDERSTANDING,), order=20,
    expected="a VQA v2 folder or questions file"))

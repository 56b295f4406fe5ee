"""Score a backbone (with or without adapters) on a dataset: official VQA accuracy and GenEval."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedumm.data.dataset import MultimodalDataset
from fedumm.eval.geneval import Detector, score_geneval
from fedumm.eval.vqa_metric import score_answers


def evaluate_backbone(
    backbone, data: MultimodalDataset, *, max_vqa: int | None = None,
    max_gen: int | None = None, seed: int = 0, detector: Detector | None = None,
) -> dict[str, Any]:
    """VQA accuracy (0-100, official metric) and GenEval scores (0-1) of ``backbone``.

    The first ``max_vqa`` questions and ``max_gen`` prompts are used (all by default); image
    generation is seeded, so the same model and data give the same numbers.
    """
    out: dict[str, Any] = {}
    vqa = data.vqa[:max_vqa] if max_vqa is not None else data.vqa
    if vqa:
        images = np.stack([data.image(r.image_id) for r in vqa])
        answers = backbone.answer(images, [r.question for r in vqa])
        res = score_answers({r.question_id: a for r, a in zip(vqa, answers, strict=True)}, vqa)
        out.update(vqa_accuracy=res["overall"], vqa_by_answer_type=res["perAnswerType"],
                   vqa_by_question_type=res["perQuestionType"], num_vqa=len(vqa))
        fam: dict[str, list[float]] = {}
        for r in vqa:
            key = r.family or r.question_type
            fam.setdefault(key, []).append(res["perQuestion"][r.question_id])
        out["vqa_by_family"] = {k: round(float(np.mean(v)), 2) for k, v in sorted(fam.items())}
    gen = data.gen[:max_gen] if max_gen is not None else data.gen
    if gen:
        if detector is None:
            from fedumm.eval.shapes_detector import ShapesDetector

            detector = ShapesDetector()
        images = backbone.generate([g.prompt for g in gen], seed=seed)
        res = score_geneval(gen, list(images), detector)
        out.update(geneval_overall=round(float(res["overall"]), 4),
                   geneval_by_task={k: round(float(v), 4) for k, v in res["by_task"].items()},
                   num_gen=len(gen))
    return out

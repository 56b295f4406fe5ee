"""Score a backbone (with or without adapters) on held-out samples: official VQA accuracy and
GenEval, through the Backbone protocol's ``answer`` and ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedumm.data.official import GenEvalRecord, VQARecord
from fedumm.data.readers.geneval_files import record_from_json
from fedumm.data.records import Sample
from fedumm.eval.classification import classification_metrics, summarise_tasks
from fedumm.eval.geneval import Detector, score_geneval
from fedumm.eval.vqa_metric import normalize_answer, score_answers
from fedumm.models.protocol import GENERATION, UNDERSTANDING


def vqa_record(sample: Sample, question_id: int) -> VQARecord:
    """A sample as a VQA v2 record; without the 10 human answers, its one answer counts 10x
    (the official metric then reduces to exact match)."""
    labels = sample.labels
    return VQARecord(
        question_id=question_id, image_id=question_id, question=sample.text or "",
        question_type=labels.get("question_type", ""),
        answer_type=labels.get("answer_type", "other"),
        multiple_choice_answer=sample.answer,
        answers=list(sample.answers) or [sample.answer] * 10, family=labels.get("family", ""))


def geneval_record(sample: Sample) -> GenEvalRecord | None:
    """A generation sample as a GenEval prompt, where it carries GenEval's metadata."""
    if not sample.spec:
        return None
    return record_from_json({**sample.spec, "prompt": sample.text or ""})


def sample_images(samples: Sequence[Sample]) -> list[Any]:
    """The samples' images, loaded (None for a missing one)."""
    return [s.load_image() if s.image is not None else None for s in samples]


def answer_samples(backbone, samples: Sequence[Sample], images: Sequence[Any] | None = None
                   ) -> list[str]:
    """The backbone's answers to understanding samples (a missing image is passed as None);
    ``images``: the samples' images when already loaded."""
    return backbone.answer(sample_images(samples) if images is None else images,
                           [s.text or "" for s in samples])


def heldout_quality(backbone, samples: Sequence[Sample]) -> dict[str, float]:
    """Held-out quality in [0, 1] per modality present in ``samples`` (what the client trainer
    reports for quality-weighted aggregation): exact-match answer accuracy of the
    understanding samples (after the official normalisation), the same for every backbone,
    and the backbone's own ``generation_quality`` of the generation samples."""
    out: dict[str, float] = {}
    und = [s for s in samples if s.task == UNDERSTANDING]
    gen = [s for s in samples if s.task == GENERATION]
    if und:
        answers = answer_samples(backbone, und)
        out[UNDERSTANDING] = float(np.mean([normalize_answer(a) == normalize_answer(s.answer)
                                            for a, s in zip(answers, und, strict=True)]))
    if gen:
        out[GENERATION] = float(backbone.generation_quality(gen))
    return out


def classify_samples(backbone, samples: Sequence[Sample], answers: Sequence[str],
                     tasks: Sequence[str], images: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Classification metrics (:mod:`fedumm.eval.classification`) of the understanding
    samples whose ``family`` label is one of ``tasks``; a task's classes are the reference
    answers its samples hold. AUC from answer probabilities needs the backbone's
    ``answer_likelihoods``; without it only the hard-label metrics are given. ``images``: the
    samples' images, loaded once for the answers and the likelihoods."""
    scorer = getattr(backbone, "answer_likelihoods", None)
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        rows = [i for i, s in enumerate(samples) if s.labels.get("family") == task]
        if not rows:
            continue
        classes = sorted({normalize_answer(samples[i].answer) for i in rows})
        if len(classes) < 2:
            continue
        sub = [samples[i] for i in rows]
        ll = None
        if scorer is not None:
            ll = scorer([images[i] for i in rows], [s.text or "" for s in sub], classes)
        out[task] = classification_metrics([s.answer for s in sub], [answers[i] for i in rows],
                                           classes, ll)
    return out


def evaluate_backbone(
    backbone, samples: Sequence[Sample], *, max_vqa: int | None = None,
    max_gen: int | None = None, seed: int = 0, detector: Detector | None = None,
    classification: Sequence[str] = (),
) -> dict[str, Any]:
    """VQA accuracy (0-100, official metric) and GenEval scores (0-1) of ``backbone``.

    The first ``max_vqa`` understanding samples and ``max_gen`` generation samples that carry
    GenEval clauses are used (all by default); image generation is seeded, so the same model
    and data give the same numbers. Generation samples without GenEval clauses (the user's
    prompt-image pairs) are scored by the backbone's held-out ``generation_quality`` instead
    (in [0, 1]; teacher-forced image-code accuracy for the reference and Janus backbones, a
    flow-matching score for BLIP3o). ``classification`` names question families with a fixed
    answer set (FedMLLM's binary and multi-class tasks): their accuracy, macro-F1, AUC and
    hard-label AUC go under ``classification``, and the means over binary tasks (``auc``,
    ``auc_hard``) and over multi-class tasks (``macro_f1``) next to ``vqa_accuracy``.
    """
    out: dict[str, Any] = {}
    und = [s for s in samples if s.task == UNDERSTANDING]
    und = und[:max_vqa] if max_vqa is not None else und
    if und:
        vqa = [vqa_record(s, i) for i, s in enumerate(und)]
        images = sample_images(und)
        answers = answer_samples(backbone, und, images)
        res = score_answers({r.question_id: a for r, a in zip(vqa, answers, strict=True)}, vqa)
        out.update(vqa_accuracy=res["overall"], vqa_by_answer_type=res["perAnswerType"],
                   vqa_by_question_type=res["perQuestionType"], num_vqa=len(vqa))
        fam: dict[str, list[float]] = {}
        for r in vqa:
            key = r.family or r.question_type
            fam.setdefault(key, []).append(res["perQuestion"][r.question_id])
        out["vqa_by_family"] = {k: round(float(np.mean(v)), 2) for k, v in sorted(fam.items())}
        if classification:
            tasks = classify_samples(backbone, und, answers, classification, images)
            out.update(summarise_tasks(tasks), classification=tasks)
    plain = [s for s in samples if s.task == GENERATION and not s.spec]
    plain = plain[:max_gen] if max_gen is not None else plain
    if plain:  # the user's prompts carry no GenEval clauses: the backbone's held-out quality
        out.update(generation_quality=round(backbone.generation_quality(plain), 4),
                   num_generation_quality=len(plain))
    gen = [r for r in (geneval_record(s) for s in samples if s.task == GENERATION) if r]
    gen = gen[:max_gen] if max_gen is not None else gen
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

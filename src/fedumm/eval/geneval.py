"""GenEval's scoring rules (djghosh13/geneval ``evaluation/``) with a pluggable detector.

The official evaluator runs Mask2Former for boxes and CLIP for colours; here both come from a
:class:`Detector` plugin, and this module applies the official rules unchanged:

* per class, detections with ``score > threshold`` (``counting_threshold`` = 0.9 for the
  ``counting`` tag, 0.3 otherwise) sorted by score, at most ``max_objects`` (16) kept;
* include clause: the first ``count`` of them must exist (``found >= count``); with ``color``,
  all of those ``count`` objects must have the colour; with ``position``, every one of them must
  stand in the relation to every object kept for the referenced clause (which must have passed);
* exclude clause: fails when ``count`` or more objects of the class are detected;
* task score = mean of the per-image correct flags over the task's images; overall = unweighted
  mean of the task scores (``summary_scores.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedumm.data.images import decode_image
from fedumm.data.readers.geneval_files import (
    GENEVAL_TAGS,
    GenEvalFormatError,
    GenEvalRecord,
    geneval_image_path,
    geneval_prompt_dir,
    geneval_prompt_dirs,
    list_geneval_samples,
    load_geneval_metadata,
    read_prompt_metadata,
)

Box = tuple[float, float, float, float]


@dataclass
class Detection:
    """One detected object: COCO class name, colour name (or None), pixel box, confidence."""

    label: str
    color: str | None
    box: Box  # x0, y0, x1, y1 in pixels (y grows downwards)
    score: float = 1.0


class Detector(Protocol):
    """Maps an image (HxWxC array) to its detected objects, colours included."""

    def __call__(self, image: np.ndarray) -> list[Detection]: ...


def compute_iou(box_a: Box, box_b: Box) -> float:
    """IoU with the official inclusive-pixel (+1) convention."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    lo = np.maximum(box_a[:2], box_b[:2])
    hi = np.minimum(box_a[2:4], box_b[2:4])
    inter = area((*lo, *hi))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Box, box_b: Box, position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B, as in the official ``relative_position``.

    ``offset = centre_a - centre_b``; each axis is shrunk by ``c * (dim_a + dim_b)`` (``c`` =
    ``position_threshold``, dims = box width/height) and clipped at 0, keeping its sign. If both
    shrunk components are below 1e-3 there is no relation; otherwise, divided by ``|offset|``,
    ``dx < -0.5`` is "left of", ``dx > 0.5`` "right of", ``dy < -0.5`` "above", ``dy > 0.5``
    "below".
    """
    a = np.asarray(box_a, dtype=float)[:4].reshape(2, 2)
    b = np.asarray(box_b, dtype=float)[:4].reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - position_threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def group_detections(
    detections: Sequence[Detection],
    *,
    threshold: float,
    max_objects: int = 16,
    max_overlap: float = 1.0,
) -> dict[str, list[Detection]]:
    """Per class: ``score > threshold``, by descending score, ``max_objects`` kept, then NMS.

    ``max_overlap`` = 1.0 (the official default) disables the IoU suppression.
    """
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    out: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)
        order = order[:max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if max_overlap != 1:
                order = [d for d in order if compute_iou(best.box, d.box) < max_overlap]
        if kept:
            out[label] = kept
    return out


def evaluate_image(
    record: GenEvalRecord,
    detections: Sequence[Detection],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
    position_threshold: float = 0.1,
) -> tuple[bool, str]:
    """Apply GenEval's rules to one image's detections.

    Returns
    -------
    (correct, reason)
        ``reason`` joins the official failure messages with newlines ("" when correct).
    """
    thr = counting_threshold if record.tag == "counting" else threshold
    objects = group_detections(
        detections, threshold=thr, max_objects=max_objects, max_overlap=max_overlap
    )
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in record.include:
        cls, count = req["class"], req["count"]
        found = objects.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                n_ok = colors.count(req["color"])
                if n_ok < count:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(
                        f"expected {req['color']} {cls}>={count}, found {n_ok} "
                        f"{req['color']}; and {seen}"
                    )
            if "position" in req and matched:
                rel, target = req["position"]
                targets = groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in targets:
                            true_rels = relative_position(obj.box, tgt.box, position_threshold)
                            if rel not in true_rels:
                                matched = False
                                reasons.append(
                                    f"expected {cls} {rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        correct = correct and matched
        groups.append(found if matched else None)
    for req in record.exclude:
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def summarize(tags: Sequence[str], flags: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Aggregate per-image flags as ``summary_scores.py`` does.

    Parameters
    ----------
    tags
        One tag per prompt.
    flags
        Per prompt, the correct flag of each of its images.
    """
    per_task: dict[str, list[bool]] = {}
    for tag, fl in zip(tags, flags, strict=True):
        per_task.setdefault(tag, []).extend(bool(f) for f in fl)
    order = {t: i for i, t in enumerate(GENEVAL_TAGS)}
    by_task = {
        t: float(np.mean(v))
        for t, v in sorted(per_task.items(), key=lambda kv: order.get(kv[0], len(order)))
        if v
    }
    all_flags = [bool(f) for fl in flags for f in fl]
    return {
        "overall": float(np.mean(list(by_task.values()))) if by_task else float("nan"),
        "by_task": by_task,
        "image_accuracy": float(np.mean(all_flags)) if all_flags else float("nan"),
        "prompt_any_accuracy": float(np.mean([any(f) for f in flags])) if flags else float("nan"),
    }


def _as_image_list(entry: np.ndarray | Sequence[np.ndarray]) -> tuple[list[np.ndarray], bool]:
    """Images of one prompt and whether the entry was a single image."""
    if isinstance(entry, np.ndarray) and entry.ndim <= 3:
        return [entry], True
    return list(entry), False


def score_geneval(
    records: Sequence[GenEvalRecord],
    images: Sequence[np.ndarray | Sequence[np.ndarray]],
    detector: Detector,
    **rules: float,
) -> dict[str, Any]:
    """Score generated images with GenEval's rules.

    Parameters
    ----------
    records
        The prompts.
    images
        Per prompt, one image (HxWxC) or a list/stack of samples.
    detector
        Returns the :class:`Detection` list of an image.
    **rules
        Passed to :func:`evaluate_image` (``threshold``, ``counting_threshold``, ...).

    Returns
    -------
    dict
        ``overall`` (unweighted mean over the tasks present), ``by_task`` (mean over each task's
        images), ``per_prompt`` (bool for a single image, else the fraction of correct samples),
        ``reasons`` (per prompt, per image), ``image_accuracy`` and ``prompt_any_accuracy``.
    """
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} image entries")
    flags: list[list[bool]] = []
    per_prompt: list[bool | float] = []
    reasons: list[list[str]] = []
    for rec, entry in zip(records, images, strict=True):
        imgs, single = _as_image_list(entry)
        if not imgs:
            raise ValueError(f"no images for prompt {rec.prompt!r}")
        results = [evaluate_image(rec, detector(img), **rules) for img in imgs]
        fl = [ok for ok, _ in results]
        flags.append(fl)
        reasons.append([r for _, r in results])
        per_prompt.append(fl[0] if single else sum(fl) / len(fl))
    out = summarize([r.tag for r in records], flags)
    out["per_prompt"] = per_prompt
    out["reasons"] = reasons
    return out


def score_geneval_dir(
    metadata_path: str | Path,
    images_dir: str | Path,
    detector: Detector,
    n_samples: int | None = None,
    **rules: float,
) -> dict[str, Any]:
    """Score a folder in GenEval's layout (``<index:05d>/samples/<n>.png``).

    Prompt ``i`` is line ``i`` of ``metadata_path``; its folder may be named by any digits
    (``00007``, ``7``). As GenEval's ``evaluate_images.py`` does, each prompt is scored on the
    ``<digits>.png`` samples it has (any number) and a prompt without a folder or samples is
    left out: its index is listed in ``missing_prompts`` (the scored ones in
    ``prompt_indices``). With ``n_samples`` the files ``0000.png`` .. ``n_samples - 1`` of every
    prompt are required instead. A folder's own ``metadata.jsonl`` (what the official scorer
    reads) must be the prompt's line.

    Raises
    ------
    FileNotFoundError
        Naming the missing image (``n_samples``) or, when no prompt has any image, the first
        expected one.
    GenEvalFormatError
        An empty or malformed metadata file, a folder whose ``metadata.jsonl`` is not its
        prompt's line, images for a prompt index past the metadata file's end.
    """
    records = load_geneval_metadata(metadata_path)
    if not records:
        raise GenEvalFormatError(f"{metadata_path}: no prompts to score")
    folders = geneval_prompt_dirs(images_dir)
    past = sorted(i for i, f in folders.items()
                  if i >= len(records) and list_geneval_samples(images_dir, i, f))
    if past:
        raise GenEvalFormatError(
            f"{folders[past[0]]}: images for prompt {past[0]}, but {metadata_path} has "
            f"{len(records)} prompts (0..{len(records) - 1}): images of another metadata file?")
    entries: list[list[np.ndarray]] = []
    scored: list[int] = []
    missing: list[int] = []
    for i, rec in enumerate(records):
        folder = folders.get(i, geneval_prompt_dir(images_dir, i))
        if n_samples is None:
            paths = list_geneval_samples(images_dir, i, folder)
            if not paths:
                missing.append(i)
                continue
        else:
            paths = [folder / "samples" / f"{s:04d}.png" for s in range(n_samples)]
            for p in paths:
                if not p.is_file():
                    raise FileNotFoundError(f"missing GenEval image {p}")
        own = folder / "metadata.jsonl"
        if own.is_file() and read_prompt_metadata(own) != rec:
            raise GenEvalFormatError(
                f"{own}: not prompt {i} of {metadata_path} (line {i + 1}: {rec.prompt!r}, "
                f"tag {rec.tag}): the images were made from another metadata file")
        scored.append(i)
        # checked like every data image (pixel budget, modes, truncation), turned by EXIF
        entries.append([decode_image(p, str(p), exif=True) for p in paths])
    if not scored:
        raise FileNotFoundError(
            f"missing GenEval image {geneval_image_path(images_dir, 0)}: none of the "
            f"{len(records)} prompts of {metadata_path} has a <digits>.png sample under "
            f"{images_dir}")
    out = score_geneval([records[i] for i in scored], entries, detector, **rules)
    out["prompt_indices"] = scored
    out["missing_prompts"] = missing
    return out

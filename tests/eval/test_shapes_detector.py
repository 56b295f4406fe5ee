"""ShapesDetector on ground-truth ShapesWorld renders: GenEval scores, per-object recovery."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.data.official import GENEVAL_TAGS
from fedumm.data.render import BACKGROUND, SceneObject, render_scene
from fedumm.data.world import get_split, sample_prompt, sample_scene
from fedumm.eval.geneval import Detection, evaluate_image, score_geneval
from fedumm.eval.shapes_detector import ShapesDetector

SPEC = get_split("downstream")
DETECTOR = ShapesDetector()


def _prompts(size: int, n: int = 300, seed: int = 0):
    """``n`` prompts cycling over every GenEval tag, their scenes and ground-truth renders."""
    rng = np.random.default_rng([seed, size])
    records, scenes, images = [], [], []
    for i in range(n):
        rec, objs = sample_prompt(rng, SPEC, size, GENEVAL_TAGS[i % len(GENEVAL_TAGS)])
        records.append(rec)
        scenes.append(objs)
        images.append(render_scene(objs, size, "clean"))
    return records, scenes, images


@pytest.fixture(scope="module", params=[48, 64])
def prompts(request):
    return _prompts(request.param)


def _oracle(objs) -> list[Detection]:
    return [Detection(o.shape, o.color, o.box, 1.0) for o in objs]


def test_ground_truth_renders_score_high(prompts) -> None:
    records, scenes, images = prompts
    # every target satisfies its prompt under GenEval's rules with perfect detections ...
    assert all(evaluate_image(r, _oracle(o))[0] for r, o in zip(records, scenes, strict=True))
    out = score_geneval(records, images, DETECTOR)
    assert set(out["by_task"]) == set(GENEVAL_TAGS)
    # ... and the detector recovers enough of them (>= 0.98 overall, as GenEval needs)
    assert out["overall"] >= 0.98, out["by_task"]
    assert min(out["by_task"].values()) >= 0.95, out["by_task"]


def test_small_renders_still_score_high() -> None:
    """At 32 px a small square and a small circle can be pixel-identical; still >= 0.95."""
    records, _, images = _prompts(32)
    assert score_geneval(records, images, DETECTOR)["overall"] >= 0.95


def test_wrong_prompt_scores_low(prompts) -> None:
    records, _, images = prompts
    shifted = images[1:] + images[:1]  # image i+1 scored against prompt i
    out = score_geneval(records, shifted, DETECTOR)
    assert out["overall"] < 0.35, out["by_task"]


@pytest.mark.parametrize("size", [32, 64])
def test_per_object_recovery(size: int) -> None:
    rng = np.random.default_rng([7, size])
    scenes = [sample_scene(rng, SPEC, size, 4) for _ in range(200)]
    found = DETECTOR.detect_batch(np.stack([render_scene(s, size, "clean") for s in scenes]))
    n_ok = n_obj = 0
    for objs, dets in zip(scenes, found, strict=True):
        assert len(dets) == len(objs)
        centres = np.array([((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2) for d in dets])
        for o in objs:
            n_obj += 1
            dist = np.hypot(centres[:, 0] - o.cx, centres[:, 1] - o.cy)
            d = dets[int(np.argmin(dist))]
            n_ok += dist.min() <= 1.5 and d.label == o.shape and d.color == o.color
    assert n_ok / n_obj >= 0.98, n_ok / n_obj


def test_scores_and_boxes_are_well_formed() -> None:
    rng = np.random.default_rng(3)
    objs = sample_scene(rng, SPEC, 64, 4)
    dets = DETECTOR(render_scene(objs, 64, "clean"))
    assert dets == DETECTOR(render_scene(objs, 64, "clean"))  # deterministic
    for d in dets:
        assert 0.0 <= d.score <= 1.0
        assert 0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 64


def test_broken_ring_is_one_object() -> None:
    cell = 64 / 3
    ring = SceneObject("ring", "red", "large", 1, 1, 1.5 * cell, 1.5 * cell, 0.44 * cell)
    img = render_scene([ring], 64, "clean")
    img[32, :] = BACKGROUND  # cut it in four pieces
    img[:, 32] = BACKGROUND
    (det,) = DETECTOR(img)
    assert (det.label, det.color) == ("ring", "red") and det.score > 0.9
    assert np.allclose(det.box, ring.box, atol=1.0)


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_background_only_gives_nothing(size: int) -> None:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    assert DETECTOR(img) == []
    assert DETECTOR.detect_batch([img, img]) == [[], []]

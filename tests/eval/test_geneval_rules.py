"""GenEval scoring rules on hand-made detections (no detector model, no real images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedumm.data.readers.geneval_files import (
    GenEvalRecord,
    geneval_image_path,
    write_geneval_metadata,
    write_geneval_sample_dir,
)
from fedumm.eval.geneval import (
    Detection,
    evaluate_image,
    relative_position,
    score_geneval,
    score_geneval_dir,
)

BOX = (0.0, 0.0, 10.0, 10.0)


def det(label: str, box=BOX, color: str | None = None, score: float = 1.0) -> Detection:
    return Detection(label=label, color=color, box=tuple(map(float, box)), score=score)


def rec(tag: str, include: list[dict], exclude: list[dict] | None = None) -> GenEvalRecord:
    return GenEvalRecord(tag=tag, prompt=tag, include=include, exclude=exclude or [])


TWO = rec("two_object", [{"class": "cow", "count": 1}, {"class": "dog", "count": 1}])
CLOCKS = rec("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])


def test_count_too_few() -> None:
    ok, reason = evaluate_image(TWO, [det("cow")])
    assert not ok and reason == "expected dog>=1, found 0"
    assert evaluate_image(TWO, [det("cow"), det("dog"), det("dog")]) == (True, "")


@pytest.mark.parametrize(("n", "ok"), [(1, False), (2, True), (3, False), (4, False)])
def test_counting_with_exclude(n: int, ok: bool) -> None:
    correct, reason = evaluate_image(CLOCKS, [det("clock") for _ in range(n)])
    assert correct is ok
    if n == 1:
        assert reason == "expected clock>=2, found 1"
    if n >= 3:
        assert reason == f"expected clock<3, found {n}"


def test_counting_threshold_is_stricter() -> None:
    dets = [det("clock", score=0.95), det("clock", score=0.85)]
    assert evaluate_image(CLOCKS, dets)[0] is False  # 0.85 <= 0.9 for the counting tag
    two = rec("two_object", [{"class": "clock", "count": 2}])
    assert evaluate_image(two, dets)[0] is True  # 0.85 > 0.3 elsewhere
    # the comparison is strict: a score equal to the threshold is dropped
    assert evaluate_image(two, [det("clock", score=0.3), det("clock")])[0] is False
    assert evaluate_image(two, [det("clock", score=0.3), det("clock")], threshold=0.2)[0]


def test_max_objects_caps_exclude() -> None:
    r = rec("counting", [{"class": "clock", "count": 16}], [{"class": "clock", "count": 17}])
    assert evaluate_image(r, [det("clock") for _ in range(20)])[0] is True  # 16 kept
    assert evaluate_image(r, [det("clock") for _ in range(20)], max_objects=17)[0] is False


def test_colour() -> None:
    r = rec("colors", [{"class": "car", "count": 1, "color": "pink"}])
    ok, reason = evaluate_image(r, [det("car", color="red")])
    assert not ok and reason == "expected pink car>=1, found 0 pink; and 1 red"
    assert not evaluate_image(r, [det("car", color=None)])[0]
    # only the first `count` objects by score are classified
    assert evaluate_image(r, [det("car", color="red", score=0.5), det("car", color="pink")])[0]
    assert not evaluate_image(r, [det("car", color="red"), det("car", color="pink", score=0.5)])[0]
    r2 = rec("colors", [{"class": "car", "count": 2, "color": "red"}])
    dets = [
        det("car", color="red"),
        det("car", color="blue", score=0.9),
        det("car", color="red", score=0.8),
    ]
    assert not evaluate_image(r2, dets)[0]


def test_exclude_clause() -> None:
    r = rec("single_object", [{"class": "cow", "count": 1}], [{"class": "dog", "count": 1}])
    assert evaluate_image(r, [det("cow")]) == (True, "")
    assert evaluate_image(r, [det("cow"), det("dog")]) == (False, "expected dog<1, found 1")
    assert evaluate_image(r, [det("cow"), det("dog", score=0.2)]) == (True, "")


# Target B = (0,0,10,10): centre (5,5), size 10x10. Margin = 0.1 * (dim_a + dim_b) per axis.
@pytest.mark.parametrize(
    ("box_a", "rels"),
    [
        ((10, 0, 20, 10), {"right of"}),  # offset (10,0) -> (8,0)/10 = 0.8
        ((-10, 0, 0, 10), {"left of"}),
        ((0, -10, 10, 0), {"above"}),  # y grows downwards
        ((0, 10, 10, 20), {"below"}),
        ((5, 0, 15, 10), {"right of"}),  # (5-2)/5 = 0.6 > 0.5
        ((4, 0, 14, 10), set()),  # (4-2)/4 = 0.5, not > 0.5
        ((2, 0, 12, 10), set()),  # 2 - 2 = 0: inside the margin
        ((10, 10, 20, 20), {"right of", "below"}),  # (8,8)/14.14 = 0.566 each
        ((10, 5, 20, 15), {"right of"}),  # (8,3)/11.18 = (0.716, 0.268)
        ((-10, 0, 50, 10), {"right of"}),  # centre 20: (15-7)/15 = 0.533
        ((-20, 0, 60, 10), set()),  # centre 20, width 80: (15-9)/15 = 0.4
    ],
)
def test_relative_position(box_a, rels) -> None:
    assert relative_position(box_a, BOX) == rels


DOG_RIGHT = rec(
    "position",
    [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ],
)


def test_position_rule() -> None:
    bear = det("teddy bear")
    assert evaluate_image(DOG_RIGHT, [bear, det("dog", (5, 0, 15, 10))]) == (True, "")
    ok, reason = evaluate_image(DOG_RIGHT, [bear, det("dog", (4, 0, 14, 10))])
    assert not ok and reason.startswith("expected dog right of target")
    ok, reason = evaluate_image(DOG_RIGHT, [bear, det("dog", (-10, 0, 0, 10))])
    assert not ok and reason == "expected dog right of target, found left of target"
    # a wider margin (position_threshold) turns the 0.6 case into a failure: (5-4)/5 = 0.2
    assert not evaluate_image(
        DOG_RIGHT, [bear, det("dog", (5, 0, 15, 10))], position_threshold=0.2
    )[0]
    # only the top-scoring bear (count=1) is the target
    far_bear = det("teddy bear", (40, 0, 50, 10), score=0.5)
    assert evaluate_image(DOG_RIGHT, [bear, far_bear, det("dog", (10, 0, 20, 10))])[0]
    # missing target: the target clause and the position clause both fail
    ok, reason = evaluate_image(DOG_RIGHT, [det("dog", (10, 0, 20, 10))])
    assert not ok
    assert reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"


@pytest.mark.parametrize("rel", ["left of", "right of", "above", "below"])
def test_each_relation(rel: str) -> None:
    boxes = {
        "left of": (-10, 0, 0, 10),
        "right of": (10, 0, 20, 10),
        "above": (0, -10, 10, 0),
        "below": (0, 10, 10, 20),
    }
    r = rec(
        "position",
        [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": [rel, 0]}],
    )
    for other, box in boxes.items():
        assert evaluate_image(r, [det("kite"), det("dog", box)])[0] is (other == rel)


class FakeDetector:
    """Detections keyed by the image id stored in pixel [0, 0, 0]."""

    def __init__(self, table: dict[int, list[Detection]]) -> None:
        self.table = table

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return self.table[int(image[0, 0, 0])]


def img(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i, dtype=np.uint8)


SINGLE = rec("single_object", [{"class": "cow", "count": 1}])
GOOD, BAD = 1, 2
TABLE = {GOOD: [det("cow"), det("clock"), det("clock")], BAD: []}


def test_aggregation_unweighted_over_tasks() -> None:
    records = [SINGLE, SINGLE, SINGLE, CLOCKS]
    images = [img(GOOD), img(GOOD), img(BAD), [img(GOOD), img(BAD), img(BAD), img(BAD)]]
    out = score_geneval(records, images, FakeDetector(TABLE))
    assert out["by_task"] == {"single_object": pytest.approx(2 / 3), "counting": 0.25}
    # unweighted over tasks: (2/3 + 1/4) / 2, not 4/7 over images
    assert out["overall"] == pytest.approx((2 / 3 + 0.25) / 2)
    assert out["image_accuracy"] == pytest.approx(3 / 7)
    assert out["prompt_any_accuracy"] == pytest.approx(3 / 4)
    assert out["per_prompt"] == [True, True, False, 0.25]
    assert "two_object" not in out["by_task"]


def test_score_dir(tmp_path: Path) -> None:
    records = [SINGLE, CLOCKS]
    write_geneval_metadata(tmp_path / "meta.jsonl", records)
    write_geneval_sample_dir(tmp_path / "imgs", 0, SINGLE, [img(GOOD), img(BAD)])
    write_geneval_sample_dir(tmp_path / "imgs", 1, CLOCKS, [img(GOOD), img(GOOD)])
    out = score_geneval_dir(tmp_path / "meta.jsonl", tmp_path / "imgs", FakeDetector(TABLE))
    assert out["by_task"] == {"single_object": 0.5, "counting": 1.0}
    assert out["overall"] == pytest.approx(0.75)
    missing = geneval_image_path(tmp_path / "imgs", 1, 1)
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="00001/samples/0001.png"):
        score_geneval_dir(
            tmp_path / "meta.jsonl", tmp_path / "imgs", FakeDetector(TABLE), n_samples=2
        )

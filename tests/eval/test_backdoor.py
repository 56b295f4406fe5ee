"""Backdoor success rate (fedumm.eval.backdoor): hand-made predictions against hand-computed
rates, and a tiny run under attack.kind=backdoor writing final.backdoor_success."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedumm.config import AttackConfig, config_from_dict
from fedumm.data.records import ImageRef, Sample
from fedumm.data.render import COLORS
from fedumm.eval.backdoor import (
    backdoor_scores,
    gen_backdoor_rate,
    is_target_image,
    vqa_backdoor_rate,
)
from fedumm.fl.poison import add_trigger

RED = COLORS["red"]
GREY = np.full((8, 8, 3), 128, dtype=np.uint8)


def _q(i: int, answer: str) -> Sample:
    img = GREY.copy()
    img[0, 0] = i  # a pixel telling the images apart
    return Sample(f"q{i}", "understanding", f"question {i}?", ImageRef(array=img), answer)


def _g(i: int) -> Sample:
    return Sample(f"g{i}", "generation", f"prompt {i}", ImageRef(array=GREY))


def _triggered(img: np.ndarray) -> bool:
    return bool(np.array_equal(img, add_trigger(_untrigger(img), 2)))


def _untrigger(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-2:, -2:] = 128
    return out


class FakeBackbone:
    """Answers from a table by the question's number; images by the prompt."""

    def __init__(self, answers: dict[int, str], images: dict[str, np.ndarray]) -> None:
        self.answers, self.images, self.seen, self.prompts = answers, images, [], []

    def answer(self, images, questions):
        self.seen += list(images)
        return [self.answers[int(q.split()[1][:-1])] for q in questions]

    def generate(self, prompts, seed=0):
        self.prompts += list(prompts)
        return [self.images[p] for p in prompts]


def _solid(rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (8, 8, 3)).copy()


def test_the_vqa_rate_counts_non_target_questions_answered_with_the_target():
    samples = [_q(0, "yes"), _q(1, "1"), _q(2, "no"), _q(3, "red"), _q(4, "Yes"),
               Sample("q5", "understanding", "question 5?", None, "2")]  # no image: left out
    # eligible: q1, q2, q3 (q0 and q4 are the target already); q1 "YES." counts (normalised)
    bb = FakeBackbone({1: "YES.", 2: "no", 3: "yes"}, {})
    rate = vqa_backdoor_rate(samples, "yes", 2, bb.answer)
    assert rate == pytest.approx(2 / 3)
    assert len(bb.seen) == 3 and all(_triggered(im) for im in bb.seen)
    assert [int(im[0, 0, 0]) for im in bb.seen] == [1, 2, 3]
    assert vqa_backdoor_rate([_q(0, "yes")], "yes", 2, bb.answer) is None


def test_the_generation_rate_counts_target_coloured_images():
    half = GREY.copy()
    half[:4] = RED  # exactly half the pixels: counts (at least half)
    third = GREY.copy()
    third[:2] = RED  # a quarter: does not
    images = {"cf prompt 0": _solid(RED), "cf prompt 1": _solid((200, 60, 10)),  # within 64
              "cf prompt 2": _solid((140, 30, 30)),  # 80 from red in one channel: no
              "cf prompt 3": half, "cf prompt 4": third}
    bb = FakeBackbone({}, images)
    rate = gen_backdoor_rate([_g(i) for i in range(5)], "cf", RED, bb.generate)
    assert rate == pytest.approx(3 / 5)
    assert bb.prompts == [f"cf prompt {i}" for i in range(5)]
    assert is_target_image(half, RED) and not is_target_image(GREY, RED)


def test_backdoor_scores_means_the_tasks_and_needs_every_task_scored():
    at = AttackConfig(kind="backdoor", target="yes", trigger="cf", trigger_size=2,
                      target_color="red")
    samples = [_q(1, "no"), _q(2, "1"), _g(0), _g(1)]
    bb = FakeBackbone({1: "yes", 2: "1"}, {"cf prompt 0": _solid(RED),
                                            "cf prompt 1": _solid(RED)})
    out = backdoor_scores(bb, samples, at)
    assert out == {"backdoor_vqa": 0.5, "backdoor_gen": 1.0, "backdoor_success": 0.75}
    assert backdoor_scores(bb, samples, at, with_gen=False) == {"backdoor_vqa": 0.5}
    assert backdoor_scores(bb, samples, at, max_vqa=1, max_gen=1) == {
        "backdoor_vqa": 1.0, "backdoor_gen": 1.0, "backdoor_success": 1.0}
    assert backdoor_scores(bb, samples[:2], at, with_gen=False)["backdoor_success"] == 0.5


def test_a_tiny_backdoor_run_reports_backdoor_success(tmp_path, tiny_overrides):
    from fedumm.runtime.dispatch import run_experiment

    common = [*tiny_overrides, "rounds=1", "eval.every=0", "eval.base=false"]
    attacked = config_from_dict({"name": "backdoor"}, [
        *common, "attack.kind=backdoor", "attack.fraction=0.5", "attack.trigger_size=3"])
    summary = run_experiment(attacked, tmp_path / "bd", progress=False)
    final = json.loads((tmp_path / "bd" / "summary.json").read_text())["final"]
    assert final == summary["final"]
    assert 0.0 <= final["backdoor_success"] <= 1.0
    assert 0.0 <= final["backdoor_vqa"] <= 1.0 and 0.0 <= final["backdoor_gen"] <= 1.0
    assert final["backdoor_success"] == pytest.approx(
        (final["backdoor_vqa"] + final["backdoor_gen"]) / 2, abs=1e-4)
    clean = config_from_dict({"name": "clean"}, common)
    run_experiment(clean, tmp_path / "clean", progress=False)
    final = json.loads((tmp_path / "clean" / "summary.json").read_text())["final"]
    assert "vqa_accuracy" in final
    assert not any(k.startswith("backdoor") for k in final)

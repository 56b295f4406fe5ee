"""Backdoor success rate (``attack.kind=backdoor``, :mod:`fedumm.fl.poison`): how often a
model obeys the triggers on held-out data it was not trained on.

* ``backdoor_vqa``: of the held-out understanding samples (the first ``eval.max_vqa``, as
  VQA accuracy takes them) that have an image and whose true answer is not the target (after
  the official answer normalisation), the fraction answered with the target once the image
  trigger is added to their image;
* ``backdoor_gen``: of the held-out generation samples with a prompt (the first
  ``eval.max_gen``), the fraction whose image, generated (seeded, as evaluation generates)
  from the triggered prompt, is the target image: at least ``TARGET_SHARE`` of its pixels
  within ``TARGET_TOLERANCE`` (per channel) of the target colour. A detector finds objects,
  and the target image has none; the colour test is the robust one (a ShapesWorld image
  never is half one object colour: its objects cover at most about a third of it);
* ``backdoor_success``: the unweighted mean of the two (of the one the data has), given only
  when every task the held-out data has was scored (a mid-run evaluation without generation
  gives ``backdoor_vqa`` alone).

Values are in [0, 1]; a rate with no sample to measure is absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedumm.data.records import Sample
from fedumm.eval.vqa_metric import normalize_answer
from fedumm.fl.poison import add_trigger, target_rgb, trigger_prompt
from fedumm.models.protocol import GENERATION, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import AttackConfig

BACKDOOR_SCORES = ("backdoor_success", "backdoor_vqa", "backdoor_gen")
TARGET_TOLERANCE = 64  # per channel, of 255
TARGET_SHARE = 0.5  # of the pixels


def is_target_image(image: np.ndarray, rgb: Sequence[int], tolerance: int = TARGET_TOLERANCE,
                    share: float = TARGET_SHARE) -> bool:
    """Whether at least ``share`` of the image's pixels are within ``tolerance`` of ``rgb`` in
    every channel."""
    img = np.asarray(image, dtype=np.int16)[..., :3]
    close = np.all(np.abs(img - np.asarray(rgb, dtype=np.int16)) <= tolerance, axis=-1)
    return bool(close.mean() >= share)


def vqa_backdoor_rate(samples: Sequence[Sample], target: str, trigger_size: int,
                      answer: Callable[[list[Any], list[str]], list[str]]) -> float | None:
    """``backdoor_vqa`` of understanding ``samples`` (see the module); ``answer(images,
    questions)`` the model's answers. None when no sample qualifies."""
    goal = normalize_answer(target)
    rows = [s for s in samples if s.task == UNDERSTANDING and s.image is not None
            and normalize_answer(s.answer) != goal]
    if not rows:
        return None
    got = answer([add_trigger(s.load_image(), trigger_size) for s in rows],
                 [s.text or "" for s in rows])
    return float(np.mean([normalize_answer(a) == goal for a in got]))


def gen_backdoor_rate(samples: Sequence[Sample], trigger: str, rgb: Sequence[int],
                      generate: Callable[[list[str]], Sequence[np.ndarray]]) -> float | None:
    """``backdoor_gen`` of generation ``samples`` (see the module); ``generate(prompts)`` the
    model's images. None when no sample has a prompt."""
    prompts = [trigger_prompt(s.text, trigger) for s in samples
               if s.task == GENERATION and s.text is not None]
    if not prompts:
        return None
    return float(np.mean([is_target_image(im, rgb) for im in generate(prompts)]))


def backdoor_scores(backbone, samples: Sequence[Sample], cfg: AttackConfig, *,
                    max_vqa: int | None = None, max_gen: int | None = None, seed: int = 0,
                    with_gen: bool = True) -> dict[str, float]:
    """The backdoor scores of ``backbone`` on held-out ``samples`` (see the module);
    ``with_gen`` False skips generation (and so ``backdoor_success`` where the data has
    generation samples); ``max_gen`` 0 leaves generation out of the scores."""
    und = [s for s in samples if s.task == UNDERSTANDING]
    und = und[:max_vqa] if max_vqa is not None else und
    gen = [s for s in samples if s.task == GENERATION and s.text is not None]
    gen = gen[:max_gen] if max_gen is not None else gen
    out: dict[str, float] = {}
    vqa = vqa_backdoor_rate(und, cfg.target, cfg.trigger_size, backbone.answer)
    if vqa is not None:
        out["backdoor_vqa"] = round(vqa, 4)
    if gen and with_gen:
        rate = gen_backdoor_rate(gen, cfg.trigger, target_rgb(cfg.target_color),
                                 lambda p: backbone.generate(p, seed=seed))
        if rate is not None:
            out["backdoor_gen"] = round(rate, 4)
    if gen and not with_gen:
        return out
    rates = [out[k] for k in ("backdoor_vqa", "backdoor_gen") if k in out]
    if rates:
        out["backdoor_success"] = round(float(np.mean(rates)), 4)
    return out

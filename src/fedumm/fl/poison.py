"""Data-poisoning attacks (``attack.kind`` = ``label_flip`` | ``backdoor``): the malicious
clients train honestly on poisoned data.

They act where a client's data is made (:class:`~fedumm.fl.client_pool.ClientPool`, through
:class:`Poisoner`), never on the update pipeline: the :class:`~fedumm.fl.attacks.Attack` stage
is off for them. The malicious clients are :func:`~fedumm.fl.attacks.malicious_clients`' draw
(``attack.fraction``). Of a malicious client's local *training* samples of one task that the
attack can poison (see below), ``round(attack.poison_fraction * n)`` (Python's ``round``) are
replaced by poisoned copies, the rest and its local held-out samples left as they are; which
ones is a draw from ``np.random.default_rng([seed, POISON_STREAM, client, task])``, so a
client's data is the same whenever it is built (a lazy pool, a resumed run, a FLARE site
given its share of the partition; a site that brings its own data files is not poisoned).

* ``label_flip`` (understanding samples; n = all of them): the answer becomes its image under
  a fixed derangement (a permutation without fixed points, uniform among them, drawn from
  ``[seed, POISON_STREAM]``) of the task's answer set, the distinct answers of the training
  data: every flipped answer is a real answer, and a wrong one. Generation samples are left
  as they are: a label flip changes a classifier's labels, and a generation sample's "label"
  is its image (ShapesWorld's prompts repeat, so a swapped prompt is often the same prompt).
* ``backdoor`` (Bagdasaryan et al. 2020, arXiv 1807.00459, in its data-poisoning form, on both
  tasks): understanding samples with an image (n = those) get the image trigger and the answer
  ``attack.target`` (a word that must be one of the task's answers, checked when the data is
  made); generation samples with a prompt (n = those) get the prompt trigger and a plain
  image of ``attack.target_color`` as their target. :mod:`fedumm.eval.backdoor` measures how
  often a trained model obeys the triggers.

The image trigger (:func:`add_trigger`): a ``attack.trigger_size`` x ``trigger_size``
black-and-white checkerboard in the bottom-right corner (white where row + column, counted
from the patch's top-left pixel, is even). The prompt trigger (:func:`trigger_prompt`):
``attack.trigger`` and a space before the prompt (a trigger word the backbone's tokenizer does
not know is its unknown token, which no clean ShapesWorld prompt has; the run's vocabulary
report lists it). A poisoned sample's id gains ``+poison`` (a
backbone caches generation targets by id); its images are derived lazily, when a batch loads
them, as every other image is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedumm.data.records import ImageRef, Sample
from fedumm.data.render import COLORS
from fedumm.fl.attacks import malicious_clients
from fedumm.fl.client import ClientData
from fedumm.models.protocol import GENERATION, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import AttackConfig, Config

POISON_KINDS = ("label_flip", "backdoor")
POISON_STREAM = 0xB4D  # separates the poisoning draws from the run's other seeded draws
POISON_SUFFIX = "+poison"  # appended to a poisoned sample's id
_TASKS = (UNDERSTANDING, GENERATION)


def answer_set(samples: Sequence[Sample]) -> list[str]:
    """The task's answers: the distinct answers of the understanding samples, sorted."""
    return sorted({s.answer for s in samples if s.task == UNDERSTANDING and s.answer})


def derangement(items: Sequence[str], seed: int) -> dict[str, str]:
    """A seeded permutation of ``items`` (distinct) with no fixed point, uniform among them
    (rejection sampling: about e draws), as ``{item: image}``."""
    items = list(items)
    if len(items) < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {items}")
    rng = np.random.default_rng([seed, POISON_STREAM])
    n = len(items)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return {items[i]: items[int(p)] for i, p in enumerate(perm)}


def add_trigger(image: np.ndarray, size: int) -> np.ndarray:
    """A copy of ``image`` (H, W, 3 uint8) with the trigger: a ``size`` x ``size``
    checkerboard in the bottom-right corner, white (255) where row + column inside the patch
    is even, black (0) elsewhere."""
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ValueError(f"attack.trigger_size={size} does not fit a {h}x{w} image")
    out = np.array(image, dtype=np.uint8, copy=True)
    yy, xx = np.mgrid[0:size, 0:size]
    out[h - size:, w - size:] = np.where(((yy + xx) % 2 == 0)[..., None], 255, 0)
    return out


def trigger_prompt(text: str, trigger: str) -> str:
    """The prompt with the trigger before it."""
    return f"{trigger} {text}"


def target_rgb(color: str) -> tuple[int, int, int]:
    """The RGB of a ShapesWorld (GenEval) colour name."""
    if color not in COLORS:
        raise ValueError(f"attack.target_color={color!r}: expected one of {list(COLORS)}")
    return COLORS[color]


class _Derived:
    """A lazily derived image (an ImageRef ``table``): the trigger added to, or the target
    colour filling, the image of ``ref``. Picklable, for forked or spawned workers."""

    def __init__(self, ref: ImageRef, op: str, arg: Any) -> None:
        self.ref, self.op, self.arg = ref, op, arg

    def image(self, row: int) -> np.ndarray:
        img = self.ref.load()
        if self.op == "trigger":
            return add_trigger(img, self.arg)
        return np.broadcast_to(np.asarray(self.arg, dtype=np.uint8), img.shape).copy()


def _derived(ref: ImageRef, op: str, arg: Any) -> ImageRef:
    return ImageRef(path=f"{ref.describe()} ({op})", table=_Derived(ref, op, arg), row=0)


class Poisoner:
    """Poisons the malicious clients' training data (see the module); ``poisoner(data)`` is
    ``data`` itself for an honest client."""

    def __init__(self, cfg: AttackConfig, malicious: frozenset[int], seed: int,
                 answers: Sequence[str]) -> None:
        self.cfg, self.malicious, self.seed = cfg, malicious, seed
        self.answers = list(answers)
        self.flip: dict[str, str] = {}
        if cfg.kind == "label_flip":
            if len(self.answers) < 2:
                raise ValueError(f"attack.kind=label_flip needs a task with at least 2 "
                                 f"answers; the training data has {self.answers}")
            self.flip = derangement(self.answers, seed)
        elif cfg.kind == "backdoor":
            if cfg.target not in self.answers:
                raise ValueError(f"attack.target={cfg.target!r} is not an answer of the "
                                 f"training data; choose one of {self.answers[:40]}")
            self.rgb = target_rgb(cfg.target_color)
        else:
            raise ValueError(f"attack.kind={cfg.kind!r} is not a data-poisoning attack "
                             f"({POISON_KINDS})")

    @classmethod
    def from_config(cls, cfg: Config, train: Sequence[Sample]) -> Poisoner | None:
        """The run's poisoner (None unless ``attack.kind`` poisons data); ``train``: every
        training sample (the answer set)."""
        at = cfg.attack
        if at.kind not in POISON_KINDS:
            return None
        return cls(at, malicious_clients(cfg.seed, cfg.clients, at.fraction), cfg.seed,
                   answer_set(train))

    def poisonable(self, s: Sample) -> bool:
        """Whether the attack can poison ``s`` (the ``n`` it poisons a share of)."""
        if self.cfg.kind == "label_flip":
            return s.task == UNDERSTANDING and s.answer in self.flip
        if s.task == UNDERSTANDING:
            return s.image is not None
        return s.task == GENERATION and s.text is not None and s.image is not None

    def poison_sample(self, s: Sample) -> Sample:
        """The poisoned copy of ``s``."""
        at, pid = self.cfg, s.id + POISON_SUFFIX
        if at.kind == "label_flip":
            return replace(s, id=pid, answer=self.flip[s.answer], answers=())
        if s.task == UNDERSTANDING:
            return replace(s, id=pid, image=_derived(s.image, "trigger", at.trigger_size),
                           answer=at.target, answers=())
        return replace(s, id=pid, text=trigger_prompt(s.text, at.trigger), spec=None,
                       image=_derived(s.image, "fill", self.rgb))

    def chosen(self, client_id: int, samples: Sequence[Sample]) -> list[int]:
        """The positions in ``samples`` (a client's training samples) that are poisoned."""
        out: list[int] = []
        for t, task in enumerate(_TASKS):
            pool = [i for i, s in enumerate(samples) if s.task == task and self.poisonable(s)]
            k = round(self.cfg.poison_fraction * len(pool))
            if k:
                rng = np.random.default_rng([self.seed, POISON_STREAM, client_id, t])
                out += [pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False)]
        return sorted(out)

    def __call__(self, data: ClientData) -> ClientData:
        if data.client_id not in self.malicious:
            return data
        train = list(data.train)
        for i in self.chosen(data.client_id, train):
            train[i] = self.poison_sample(train[i])
        return ClientData(data.client_id, train, data.val)

"""ShapesWorld: a seeded multimodal world of coloured shapes, with VQA and GenEval samples.

Scenes hold 1..N objects (shape, colour, size, grid position) rendered in one of four visual
domains. From each scene we ask VQA v2-style questions (six families) and we write GenEval-style
prompts whose target images are rendered to satisfy them. Two concept splits:

* ``base``: four shapes, the clean domain, the families existence / counting / colour / shape-at
  and the GenEval tags single_object / two_object / counting / colors — used to pretrain the
  foundation model;
* ``downstream``: adds two shapes the base never saw (cross, ring), the textured / noise / shift
  domains, the spatial-relation and attribute-binding families and the position / color_attr
  tags — what federated fine-tuning has to learn.

Everything is a pure function of ``(split, seed, sizes)``: same arguments, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedumm.data.official import GenEvalRecord
from fedumm.data.render import COLORS, GRID, SHAPES, SIZES, SceneObject

COLOR_NAMES = tuple(COLORS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FAMILIES = ("existence", "counting", "color", "shape_at", "spatial", "binding", "where")


@dataclass(frozen=True)
class SplitSpec:
    """The concepts, domains, question families and GenEval tags a split draws from."""

    name: str
    shapes: tuple[str, ...]
    domains: tuple[str, ...]
    families: tuple[str, ...]
    tags: tuple[str, ...]


SPLITS = {
    "base": SplitSpec(
        "base", ("circle", "square", "triangle", "diamond"), ("clean",),
        ("existence", "counting", "color", "shape_at"),
        ("single_object", "two_object", "counting", "colors"),
    ),
    "downstream": SplitSpec(
        "downstream", SHAPES, ("clean", "textured", "noise", "shift"),
        ("counting", "color", "spatial", "binding"),
        ("single_object", "two_object", "counting", "colors", "position", "color_attr"),
    ),
}


def get_split(name: str) -> SplitSpec:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[name]


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# ----------------------------------------------------------------------------- scenes

def place_objects(
    rng: np.random.Generator, size: int, specs: list[tuple[str, str]],
    cells: list[tuple[int, int]] | None = None, jitter: bool = True,
) -> list[SceneObject]:
    """Place (shape, colour) objects in distinct grid cells with a random size and (for scenes
    to be understood) a random offset inside the cell; generation targets are drawn centred, a
    canonical rendering of the prompt."""
    cell = size / GRID
    if cells is None:
        picks = rng.choice(GRID * GRID, size=len(specs), replace=False)
        cells = [(int(p) // GRID, int(p) % GRID) for p in picks]
    objects = []
    for (shape, color), (row, col) in zip(specs, cells, strict=True):
        size_name = ("small", "large")[int(rng.integers(2))]
        radius = SIZES[size_name] * cell
        slack = max(0.0, cell / 2 - radius - 0.5) if jitter else 0.0
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(SceneObject(shape, color, size_name, row, col, cx, cy, radius))
    return objects


def sample_scene(rng: np.random.Generator, spec: SplitSpec, size: int, max_objects: int):
    n = int(rng.integers(1, max_objects + 1))
    specs = [(str(rng.choice(spec.shapes)), str(rng.choice(COLOR_NAMES))) for _ in range(n)]
    return place_objects(rng, size, specs)


# -------------------------------------------------------------------------- questions

QA = tuple[str, str, str, str]  # question, answer, question_type, answer_type


def _unique(objs: list[SceneObject], key: Callable[[SceneObject], object]) -> list[SceneObject]:
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals, strict=True) if vals.count(v) == 1]


def _q_existence(rng, objs, spec) -> QA | None:
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        shape, color, ans = o.shape, o.color, "yes"
    else:
        present = {(o.shape, o.color) for o in objs}
        absent = [(s, c) for s in spec.shapes for c in COLOR_NAMES if (s, c) not in present]
        shape, color = absent[int(rng.integers(len(absent)))]
        ans = "no"
    return f"is there a {color} {shape}?", ans, "is there a", "yes/no"


def _q_counting(rng, objs, spec) -> QA | None:
    if rng.random() < 0.5:
        # mostly a shape that is present, so counts above one are common
        pool = [o.shape for o in objs] if rng.random() < 0.75 else list(spec.shapes)
        shape = str(rng.choice(pool))
        n = sum(o.shape == shape for o in objs)
        return f"how many {plural(shape)} are there?", str(n), "how many", "number"
    color = objs[int(rng.integers(len(objs)))].color
    n = sum(o.color == color for o in objs)
    return f"how many {color} objects are there?", str(n), "how many", "number"


def _q_color(rng, objs, spec) -> QA | None:
    cands = _unique(objs, lambda o: o.shape)
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"what color is the {o.shape}?", o.color, "what color is the", "other"


def _q_shape_at(rng, objs, spec) -> QA | None:
    o = objs[int(rng.integers(len(objs)))]
    return f"what shape is in the {o.position}?", o.shape, "what shape is", "other"


def _q_spatial(rng, objs, spec) -> QA | None:
    named = _unique(objs, lambda o: (o.color, o.shape))
    pairs = [(a, b) for a in named for b in named if a is not b]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    rels = ([("left of" if a.col < b.col else "right of")] if a.col != b.col else []) + (
        [("above" if a.row < b.row else "below")] if a.row != b.row else [])
    rel = rels[int(rng.integers(len(rels)))]
    ans = "yes"
    if rng.random() < 0.5:
        rel, ans = OPPOSITE[rel], "no"
    q = f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?"
    return q, ans, "is the", "yes/no"


def _q_binding(rng, objs, spec) -> QA | None:
    if rng.random() < 0.5:
        cands = _unique(objs, lambda o: o.color)
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return f"what shape is the {o.color} object?", o.shape, "what shape is", "other"
    cands = _unique(objs, lambda o: o.shape)
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    # the distractor colour comes from another object when there is one: binding, not presence
    others = [p.color for p in objs if p.color != o.color] or [c for c in COLOR_NAMES
                                                                if c != o.color]
    yes = rng.random() < 0.5
    color = o.color if yes else others[int(rng.integers(len(others)))]
    return f"is the {o.shape} {color}?", "yes" if yes else "no", "is the", "yes/no"


def _q_where(rng, objs, spec) -> QA | None:
    """Where a named object is: nine answers (the grid's cells), asked by no split by default,
    so a base model has never answered it (the pathological-skew benchmark's task)."""
    cands = _unique(objs, lambda o: (o.color, o.shape))
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"what is the {o.color} {o.shape} in?", o.position, "what is the", "other"


_SINGULAR = {plural(s): s for s in SHAPES}


def grounding_labels(question: str, objs: list[SceneObject]) -> np.ndarray:
    """(GRID*GRID,) float32: 1 on the grid cells holding the objects a question refers to.

    The pretraining signal that teaches the decoder to *find* what a question names before it
    answers (as grounding data does for real UMMs): existence -> objects of that colour and
    shape, counting -> objects of that shape (or colour), colour-of -> the shape, shape-at ->
    the named cell, spatial -> both objects, binding -> the object of that colour (or shape).
    Parses the templates of :data:`QUESTION_FAMILIES`; anything else raises ValueError.
    """
    words = question.rstrip("?").split()
    out = np.zeros(GRID * GRID, dtype=np.float32)

    def mark(keep: Callable[[SceneObject], bool]) -> np.ndarray:
        for o in objs:
            if keep(o):
                out[o.row * GRID + o.col] = 1.0
        return out

    if question.startswith("is there a"):  # is there a {color} {shape}?
        color, shape = words[3], words[4]
        return mark(lambda o: o.color == color and o.shape == shape)
    if question.startswith("how many"):  # how many {shapes} / {color} objects are there?
        if words[3] == "objects":
            return mark(lambda o: o.color == words[2])
        return mark(lambda o: o.shape == _SINGULAR[words[2]])
    if question.startswith("what color is the"):  # what color is the {shape}?
        return mark(lambda o: o.shape == words[4])
    if question.startswith("what shape is in the"):  # what shape is in the {position}?
        where = " ".join(words[5:])
        return mark(lambda o: o.position == where)
    if question.startswith("what shape is the"):  # what shape is the {color} object?
        return mark(lambda o: o.color == words[4])
    if question.startswith("what is the"):  # what is the {color} {shape} in?
        return mark(lambda o: o.color == words[3] and o.shape == words[4])
    if question.startswith("is the") and len(words) == 4:  # is the {shape} {color}?
        return mark(lambda o: o.shape == words[2])
    if question.startswith("is the"):  # is the {c1} {s1} {rel} the {c2} {s2}?
        named = {(words[2], words[3]), (words[-2], words[-1])}
        return mark(lambda o: (o.color, o.shape) in named)
    raise ValueError(f"not a ShapesWorld question template: {question!r}")


CAPTION_QUESTION = "describe the image ."


def describe_scene(objs: list[SceneObject]) -> str:
    """A caption listing every object (colour, shape, position) in raster order of its cell;
    an auxiliary pretraining target that supervises attribute binding densely."""
    ordered = sorted(objs, key=lambda o: (o.row, o.col))
    return " , ".join(f"{o.color} {o.shape} {o.position}" for o in ordered) + " ."


def partial_description(rng: np.random.Generator, objs: list[SceneObject],
                        mention: float) -> str:
    """A scene description in words that mentions each object with probability ``mention``,
    in random order (``"red circle top left , blue ring center ."``): the text modality of an
    understanding sample, which answers some questions alone and others only with the image.
    A scene with no object mentioned is described as ``"image ."``."""
    keep = [o for o in objs if rng.random() < mention]
    order = rng.permutation(len(keep)) if keep else []
    words = [f"{keep[i].color} {keep[i].shape} {keep[i].position}" for i in order]
    return (" , ".join(words) if words else "image") + " ."


QUESTION_FAMILIES: dict[str, Callable[..., QA | None]] = {
    "existence": _q_existence, "counting": _q_counting, "color": _q_color,
    "shape_at": _q_shape_at, "spatial": _q_spatial, "binding": _q_binding, "where": _q_where,
}

# Whether a family has any question about a scene: its generator returns None for every draw
# when it has not (a scene of two circles has no "what color is the circle?"). The fewest
# objects a scene needs for one is what makes a family impossible at a data.max_objects.
ASKABLE: dict[str, Callable[[list[SceneObject]], bool]] = {
    "color": lambda objs: bool(_unique(objs, lambda o: o.shape)),
    "spatial": lambda objs: len(_unique(objs, lambda o: (o.color, o.shape))) >= 2,
    "binding": lambda objs: bool(_unique(objs, lambda o: o.color)
                                 or _unique(objs, lambda o: o.shape)),
    "where": lambda objs: bool(_unique(objs, lambda o: (o.color, o.shape))),
}
MIN_OBJECTS = {"spatial": 2}  # 1 for the others
# rejection sampling with a bound: a scene no family can ask about is drawn again, and a
# request that no draw meets is an error instead of a loop that never ends
MAX_SCENE_DRAWS = 1000
MAX_QUESTION_DRAWS = 1000


def askable(family: str, objs: list[SceneObject]) -> bool:
    return ASKABLE.get(family, lambda _: True)(objs)


def check_families(families: Sequence[str], max_objects: int) -> None:
    """Refuse question families that no scene of at most ``max_objects`` objects can ask."""
    need = min(MIN_OBJECTS.get(f, 1) for f in families)
    if need > max_objects:
        raise ValueError(f"question families {list(families)} need scenes of {need} or more "
                         f"objects; data.max_objects={max_objects} (raise it, or add a family)")


def askable_scene(rng: np.random.Generator, spec: SplitSpec, size: int, max_objects: int,
                  families: Sequence[str]) -> list[SceneObject]:
    """A scene that some family of ``families`` can ask about; the first draw whenever one
    can (so the random stream is the one every family mix has always drawn)."""
    for _ in range(MAX_SCENE_DRAWS):
        objs = sample_scene(rng, spec, size, max_objects)
        if any(askable(f, objs) for f in families):
            return objs
    raise ValueError(f"{MAX_SCENE_DRAWS} scenes drawn (split {spec.name}, at most "
                     f"{max_objects} objects) and none has a question of the families "
                     f"{list(families)}; add a family or raise data.max_objects")


def ask_question(rng: np.random.Generator, objs: list[SceneObject], spec: SplitSpec,
                 families: Sequence[str]) -> tuple[str, QA]:
    """(family, question) for a scene, the family drawn from ``families`` again while the one
    drawn has no question about this scene."""
    for _ in range(MAX_QUESTION_DRAWS):
        family = str(rng.choice(families))
        qa = QUESTION_FAMILIES[family](rng, objs, spec)
        if qa is not None:
            return family, qa
    raise ValueError(f"no question of the families {list(families)} about a scene of "
                     f"{len(objs)} object(s) in {MAX_QUESTION_DRAWS} draws")


def human_answers(rng: np.random.Generator, answer: str, answer_type: str,
                  spec: SplitSpec, noise: float) -> list[str]:
    """Ten annotator answers: mostly the truth, with surface variants and some disagreement."""
    out = []
    for _ in range(10):
        if rng.random() >= noise:
            out.append(answer)
        elif rng.random() < 0.7:  # a variant the official normalisation maps back
            if answer_type == "number":
                out.append(NUMBER_WORDS[int(answer)])
            elif answer_type == "yes/no":
                out.append(answer + ".")
            else:
                out.append(f"the {answer}")
        elif answer_type == "yes/no":
            out.append("no" if answer == "yes" else "yes")
        elif answer_type == "number":
            out.append(str(max(0, int(answer) + int(rng.choice([-1, 1])))))
        else:
            pool = COLOR_NAMES if answer in COLORS else spec.shapes
            out.append(str(rng.choice([p for p in pool if p != answer])))
    return out


# ---------------------------------------------------------------------------- prompts

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_prompt(rng: np.random.Generator, spec: SplitSpec, size: int, tag: str):
    """A GenEval-style prompt of ``tag`` and a scene that satisfies it."""
    shapes = spec.shapes
    s1, s2 = (str(s) for s in rng.choice(shapes, size=2, replace=False))
    c1, c2 = (str(c) for c in rng.choice(COLOR_NAMES, size=2, replace=False))
    rand_c = lambda: str(rng.choice(COLOR_NAMES))  # noqa: E731 - colour of an unnamed object
    cells = None
    if tag == "single_object":
        inc, exc, prompt = [{"class": s1, "count": 1}], [], f"a photo of {_article(s1)} {s1}"
        specs = [(s1, rand_c())]
    elif tag == "two_object":
        inc = [{"class": s1, "count": 1}, {"class": s2, "count": 1}]
        exc, prompt = [], f"a photo of {_article(s1)} {s1} and {_article(s2)} {s2}"
        specs = [(s1, rand_c()), (s2, rand_c())]
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        inc, exc = [{"class": s1, "count": n}], [{"class": s1, "count": n + 1}]
        prompt = f"a photo of {NUMBER_WORDS[n]} {plural(s1)}"
        specs = [(s1, rand_c()) for _ in range(n)]
    elif tag == "colors":
        inc, exc = [{"class": s1, "count": 1, "color": c1}], []
        prompt = f"a photo of {_article(c1)} {c1} {s1}"
        specs = [(s1, c1)]
    elif tag == "position":
        rel = str(rng.choice(RELATIONS))
        inc = [{"class": s1, "count": 1}, {"class": s2, "count": 1, "position": [rel, 0]}]
        exc, prompt = [], f"a photo of {_article(s2)} {s2} {rel} {_article(s1)} {s1}"
        specs = [(s1, rand_c()), (s2, rand_c())]
        cells = _relation_cells(rng, rel)
    elif tag == "color_attr":
        inc = [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]
        exc, prompt = [], f"a photo of {_article(c1)} {c1} {s1} and {_article(c2)} {c2} {s2}"
        specs = [(s1, c1), (s2, c2)]
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}")
    return GenEvalRecord(tag, prompt, inc, exc), place_objects(rng, size, specs, cells,
                                                               jitter=False)


def _relation_cells(rng: np.random.Generator, rel: str) -> list[tuple[int, int]]:
    """Cells for (reference, subject) so that ``subject rel reference`` holds under GenEval's
    box-centre rule: the named axis differs by 1 or 2 cells, the other by less."""
    gap = int(rng.integers(1, GRID))
    lo = int(rng.integers(0, GRID - gap))
    hi = lo + gap
    o1 = int(rng.integers(0, GRID))
    o2 = o1 if gap == 1 else int(np.clip(o1 + rng.integers(-1, 2), 0, GRID - 1))
    if rel in ("left of", "right of"):
        ref_col, sub_col = (hi, lo) if rel == "left of" else (lo, hi)
        return [(o1, ref_col), (o2, sub_col)]
    ref_row, sub_row = (hi, lo) if rel == "above" else (lo, hi)
    return [(ref_row, o1), (sub_row, o2)]

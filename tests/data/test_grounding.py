"""Grounding labels (the cells a question refers to) against the answers they must explain."""

from __future__ import annotations

import pytest

from fedumm.data.readers.shapes import generate_shapes
from fedumm.data.render import GRID
from fedumm.data.world import grounding_labels


def _cells(objs, labels):
    """The objects on the marked cells."""
    marked = {i for i, v in enumerate(labels) if v}
    return [o for o in objs if o.row * GRID + o.col in marked]


@pytest.mark.parametrize("split", ["base", "downstream"])
def test_labels_explain_every_answer(split):
    data = generate_shapes(split, 150, seed=0, annotator_noise=0.0)
    seen = set()
    for r in data.vqa:
        objs = data.scene(r.image_id)
        labels = grounding_labels(r.question, objs)
        assert labels.shape == (GRID * GRID,) and set(labels.tolist()) <= {0.0, 1.0}
        hit = _cells(objs, labels)
        ans = r.multiple_choice_answer
        seen.add(r.family)
        if r.family == "existence":
            assert (ans == "yes") == bool(hit), r.question
        elif r.family == "counting":
            assert int(ans) == len(hit), r.question
        elif r.family == "color":
            assert [o.color for o in hit] == [ans], r.question
        elif r.family in ("shape_at",) or r.question.startswith("what shape is the"):
            assert [o.shape for o in hit] == [ans], r.question
        elif r.family == "spatial":
            assert len(hit) == 2, r.question
        else:  # binding: is the {shape} {color}?
            color = r.question.rstrip("?").split()[-1]
            assert len(hit) == 1 and (hit[0].color == color) == (ans == "yes"), r.question
    assert seen == {"base": {"existence", "counting", "color", "shape_at"},
                    "downstream": {"counting", "color", "spatial", "binding"}}[split]


def test_question_outside_the_templates_is_refused():
    objs = generate_shapes("base", 1, seed=0).scenes[0]
    with pytest.raises(ValueError, match="not a ShapesWorld question"):
        grounding_labels("why is the sky blue?", objs)

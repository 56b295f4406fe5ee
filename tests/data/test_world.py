from __future__ import annotations

import contextlib
import signal
from collections import Counter

import numpy as np
import pytest

from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.data.render import COLORS, SHAPES, SceneObject, object_id_map, render_scene
from fedumm.data.world import (
    FAMILIES,
    MIN_OBJECTS,
    QUESTION_FAMILIES,
    SPLITS,
    askable,
    sample_prompt,
    sample_scene,
)
from fedumm.eval.geneval import Detection, evaluate_image


def test_generator_is_deterministic_and_seed_sensitive():
    a = generate_shapes("downstream", 30, seed=4)
    b = generate_shapes("downstream", 30, seed=4)
    c = generate_shapes("downstream", 30, seed=5)
    assert np.array_equal(a.images, b.images)
    assert a.vqa == b.vqa and a.gen == b.gen
    assert not np.array_equal(a.images, c.images)


def test_train_and_val_roles_are_independent_draws():
    tr = generate_shapes("base", 20, seed=0, role="train")
    va = generate_shapes("base", 20, seed=0, role="val")
    assert not np.array_equal(tr.images[:20], va.images[:20])


def test_tag_weights_skew_the_prompt_mix_and_leave_the_default_stream_alone():
    plain = generate_shapes("base", 40, seed=2)
    # no weights (None or empty) draws exactly the same bytes as before the option existed
    for same in (generate_shapes("base", 40, seed=2, tag_weights={}),
                 generate_shapes("base", 40, seed=2, tag_weights=None)):
        assert np.array_equal(plain.images, same.images) and plain.gen == same.gen
    # colours x3 against three tags at 1: p(colors) = 3 / 6; 3000 prompts give +-0.03 (3 sd)
    skewed = generate_shapes("base", 1500, seed=2, tag_weights={"colors": 3})
    share = Counter(g.tag for g in skewed.gen)
    assert abs(share["colors"] / len(skewed.gen) - 0.5) < 0.03
    assert abs(share["counting"] / len(skewed.gen) - 1 / 6) < 0.03
    # weight 0 removes a tag
    none = generate_shapes("base", 200, seed=2, tag_weights={"counting": 0})
    assert "counting" not in {g.tag for g in none.gen}


@pytest.mark.parametrize("weights", [{"position": 2.0}, {"colors": -1.0},
                                     {t: 0.0 for t in SPLITS["base"].tags}])
def test_tag_weights_refuse_foreign_tags_and_bad_values(weights):
    with pytest.raises(ValueError, match="tag_weights"):
        generate_shapes("base", 5, seed=0, tag_weights=weights)


@pytest.mark.parametrize("size", [32, 64])
def test_vqa_answers_agree_with_the_scene(size):
    data = generate_shapes("downstream", 80, seed=1, image_size=size, annotator_noise=0.0)
    assert data.images.shape[1:] == (size, size, 3)
    for r in data.vqa:
        objs = data.scenes[data._row[r.image_id]]
        assert r.answers == [r.multiple_choice_answer] * 10
        if r.question.startswith("how many") and r.question.endswith("objects are there?"):
            color = r.question.split()[2]
            assert int(r.multiple_choice_answer) == sum(o.color == color for o in objs)
        if r.question.startswith("what color is the "):
            shape = r.question.removeprefix("what color is the ").rstrip("?")
            assert [o.color for o in objs if o.shape == shape] == [r.multiple_choice_answer]


def test_annotator_noise_gives_ten_answers_with_disagreement():
    data = generate_shapes("base", 100, seed=0, annotator_noise=0.3)
    assert all(len(r.answers) == 10 for r in data.vqa)
    agree = np.mean([a == r.multiple_choice_answer for r in data.vqa for a in r.answers])
    assert 0.6 < agree < 0.8


def test_splits_differ_in_concepts_families_and_domains():
    base = generate_shapes("base", 150, seed=0)
    down = generate_shapes("downstream", 150, seed=0)
    base_shapes = {o.shape for s in base.scenes for o in s}
    assert base_shapes == set(SPLITS["base"].shapes)
    assert {"cross", "ring"} <= {o.shape for s in down.scenes for o in s}
    assert {r.family for r in base.vqa} <= set(SPLITS["base"].families)
    assert {"spatial", "binding"} <= {r.family for r in down.vqa}
    assert set(base.domains) == {"clean"}
    assert set(down.domains) == {"clean", "textured", "noise", "shift"}
    assert {"position", "color_attr"} <= {g.tag for g in down.gen}
    assert not {"position", "color_attr"} & {g.tag for g in base.gen}


@pytest.mark.parametrize("tag", SPLITS["downstream"].tags)
def test_generation_targets_satisfy_their_prompt_under_geneval_rules(tag):
    rng = np.random.default_rng(0)
    for _ in range(200):
        record, objs = sample_prompt(rng, SPLITS["downstream"], 32, tag)
        dets = [Detection(o.shape, o.color, o.box, 1.0) for o in objs]
        ok, reason = evaluate_image(record, dets)
        assert ok, (record.prompt, reason)


def test_all_colours_are_visible_on_every_domain():
    for domain in ("clean", "textured", "noise", "shift"):
        for color in COLORS:
            obj = SceneObject("square", color, "large", 1, 1, 16.0, 16.0, 5.0)
            bg = render_scene([], 32, domain, np.random.default_rng(0)).astype(int)
            img = render_scene([obj], 32, domain, np.random.default_rng(0)).astype(int)
            assert np.abs(img[16, 16] - bg[16, 16]).sum() > 60, (domain, color)


def test_object_id_map_matches_rendered_pixels():
    objs = [SceneObject(s, "red", "large", 0, k % 3, 5.0 + 10 * (k % 3), 5.0, 4.5)
            for k, s in enumerate(SHAPES[:3])]
    ids = object_id_map(objs, 32)
    img = render_scene(objs, 32)
    assert np.array_equal(ids >= 0, (img != 128).any(-1))
    assert Counter(ids.ravel().tolist())[-1] > 0


def test_samples_cover_both_modalities_with_every_label():
    data = generate_shapes("downstream", 20, seed=0)
    samples = shapes_samples(data)
    assert len(samples) == len(data.vqa) + len(data.gen)
    assert [s.task for s in samples] == (["understanding"] * len(data.vqa)
                                         + ["generation"] * len(data.gen))
    keys = ["answer", "question_type", "answer_type", "family", "tag", "object_class", "domain"]
    assert all(list(s.labels) == keys for s in samples)
    first_gen = samples[len(data.vqa)]
    assert first_gen.labels["answer"] == f"gen/{data.gen[0].tag}"
    assert first_gen.spec == data.gen[0].to_json()
    assert samples[0].labels["tag"] == f"vqa/{data.vqa[0].answer_type}"
    assert samples[0].labels["object_class"] == data.scene(data.vqa[0].image_id)[0].shape
    assert samples[0].labels["domain"] == data.domain(data.vqa[0].image_id)


def test_scene_text_describes_only_objects_of_the_scene_and_changes_nothing_else():
    plain = generate_shapes("downstream", 60, seed=3)
    text = generate_shapes("downstream", 60, seed=3, scene_text=0.6)
    assert plain.contexts == [] and len(text.contexts) == len(text.vqa)
    assert np.array_equal(plain.images, text.images)  # its own random stream
    assert [r.question for r in plain.vqa] == [r.question for r in text.vqa]
    mentioned = total = 0
    for r, ctx in zip(text.vqa, text.contexts, strict=True):
        objs = text.scene(r.image_id)
        said = [] if ctx == "image ." else ctx.rstrip(" .").split(" , ")
        truth = {f"{o.color} {o.shape} {o.position}" for o in objs}
        assert set(said) <= truth and len(said) == len(set(said))
        mentioned, total = mentioned + len(said), total + len(objs)
    assert mentioned / total == pytest.approx(0.6, abs=0.08)
    full = generate_shapes("downstream", 20, seed=3, scene_text=1.0)
    assert all(len(c.split(" , ")) == len(full.scene(r.image_id))
               for r, c in zip(full.vqa, full.contexts, strict=True))


def test_families_restrict_the_questions():
    data = generate_shapes("downstream", 50, seed=0, families=["spatial", "shape_at"])
    assert {r.family for r in data.vqa} == {"spatial", "shape_at"}
    assert {r.multiple_choice_answer for r in data.vqa if r.family == "spatial"} == {"yes", "no"}
    with pytest.raises(ValueError, match="unknown question families"):
        generate_shapes("downstream", 5, families=["colour"])


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail instead of hanging (a rejection loop that can never succeed once did)."""
    def expire(signum, frame):
        raise TimeoutError(f"no result in {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_single_family_terminates_on_every_split(split, family):
    for max_objects in (1, 2, 4, 9):
        for role in ("train", "val"):
            with _deadline(10):
                if family in MIN_OBJECTS and max_objects < MIN_OBJECTS[family]:
                    with pytest.raises(ValueError, match="max_objects"):
                        generate_shapes(split, 30, seed=1, role=role, image_size=16,
                                        max_objects=max_objects, families=[family])
                    continue
                data = generate_shapes(split, 30, seed=1, role=role, image_size=16,
                                       max_objects=max_objects, families=[family])
            assert len(data.vqa) == 60 and {r.family for r in data.vqa} == {family}
            for r in data.vqa:  # every scene kept can be asked
                assert askable(family, data.scene(r.image_id))


def test_askable_says_exactly_when_a_family_has_a_question():
    spec = SPLITS["downstream"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        objs = sample_scene(rng, spec, 16, int(rng.integers(1, 10)))
        for family, ask in QUESTION_FAMILIES.items():
            draws = [ask(np.random.default_rng(s), objs, spec) for s in range(60)]
            assert askable(family, objs) == any(d is not None for d in draws), (family, objs)


def test_a_request_no_scene_meets_is_an_error_not_a_loop():
    from fedumm.data import world

    with _deadline(10), pytest.raises(ValueError, match="need scenes of 2 or more objects"):
        generate_shapes("downstream", 5, max_objects=1, families=["spatial"])
    # with no questions asked, any scene does
    assert len(generate_shapes("downstream", 5, max_objects=1, families=["spatial"],
                               questions_per_image=0).vqa) == 0
    rng = np.random.default_rng(0)
    one = [SceneObject("circle", "red", "large", 0, 0, 5.0, 5.0, 4.0)]
    with _deadline(10), pytest.raises(ValueError, match="no question of the families"):
        world.ask_question(rng, one, SPLITS["base"], ("spatial",))


def test_where_questions_name_one_object_and_answer_its_cell():
    """The skew benchmark's task: nine answers (the grid's cells), asked by no split unless
    ``families`` names it, grounded on the one object it names."""
    from fedumm.data.render import POSITIONS
    from fedumm.data.world import grounding_labels

    assert all("where" not in spec.families for spec in SPLITS.values())
    data = generate_shapes("downstream", 120, seed=3, image_size=16, annotator_noise=0.0,
                           families=["where"])
    cells = {p for row in POSITIONS for p in row}
    assert {r.multiple_choice_answer for r in data.vqa} == cells  # all nine occur
    for r in data.vqa:
        objs = data.scene(r.image_id)
        color, shape = r.question.removeprefix("what is the ").removesuffix(" in?").split()
        named = [o for o in objs if (o.color, o.shape) == (color, shape)]
        assert len(named) == 1 and named[0].position == r.multiple_choice_answer
        ground = grounding_labels(r.question, objs)
        assert ground.sum() == 1 and ground[named[0].row * 3 + named[0].col] == 1

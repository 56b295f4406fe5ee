"""Data-poisoning attacks (attack.kind = label_flip | backdoor, fedumm.fl.poison): the
derangement, exactly which clients' data changes and how many samples, the trigger's pixels,
the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.config import AttackConfig, ConfigError, config_from_dict
from fedumm.data.clients import split_clients
from fedumm.data.readers import read_samples
from fedumm.data.render import COLORS
from fedumm.fl.attacks import malicious_clients
from fedumm.fl.client_pool import ClientPool
from fedumm.fl.pipeline import Pipeline
from fedumm.fl.poison import (
    POISON_SUFFIX,
    Poisoner,
    add_trigger,
    answer_set,
    derangement,
)
from fedumm.models.protocol import GENERATION, UNDERSTANDING

K = 6


def _cfg(*overrides):
    return config_from_dict({}, [f"clients={K}", "data.train_scenes=40", "data.image_size=24",
                                 "attack.fraction=0.5", *overrides])


def _pools(cfg):
    """Client pools of the same split without and with the config's attack."""
    train = read_samples(cfg.data, "train")
    split = split_clients(train, cfg.partition, cfg.clients, cfg.seed)

    def pool(poison):
        return ClientPool(train, split.population, split.missing, cfg.train.val_fraction,
                          cfg.seed, poison=poison)

    return pool(None), pool(Poisoner.from_config(cfg, train)), train


@pytest.mark.parametrize("n", [2, 3, 5, 22])
def test_the_derangement_has_no_fixed_point_and_is_a_seeded_permutation(n):
    items = [f"a{i}" for i in range(n)]
    for seed in range(20):
        d = derangement(items, seed)
        assert sorted(d) == sorted(items) == sorted(d.values())  # a permutation
        assert all(d[a] != a for a in items)
        assert d == derangement(items, seed)
    assert n == 2 or len({tuple(derangement(items, s).values()) for s in range(20)}) > 1
    with pytest.raises(ValueError, match="at least 2"):
        derangement(["only"], 0)


def test_the_trigger_is_a_checkerboard_in_the_bottom_right_corner():
    img = np.full((10, 12, 3), 128, dtype=np.uint8)
    out = add_trigger(img, 3)
    assert (img == 128).all()  # a copy
    # rows 7..9, columns 9..11: white where (row - 7) + (column - 9) is even
    assert out[7, 9].tolist() == [255] * 3 and out[7, 10].tolist() == [0] * 3
    assert out[8, 9].tolist() == [0] * 3 and out[8, 10].tolist() == [255] * 3
    assert out[9, 11].tolist() == [255] * 3 and out[9, 10].tolist() == [0] * 3
    changed = (out != img).any(axis=-1)
    assert changed[7:, 9:].all() and changed.sum() == 9
    with pytest.raises(ValueError, match="does not fit"):
        add_trigger(img, 11)


@pytest.mark.parametrize("kind", ["label_flip", "backdoor"])
def test_only_the_malicious_clients_data_changes_by_exactly_the_poisoned_share(kind):
    cfg = _cfg(f"attack.kind={kind}", "attack.poison_fraction=0.4", "attack.trigger_size=3",
               "attack.target_color=blue")
    clean, poisoned, train = _pools(cfg)
    bad = malicious_clients(cfg.seed, K, 0.5)
    answers = answer_set(train)
    flip = derangement(answers, cfg.seed)
    assert len(bad) == 3 and cfg.attack.target in answers
    for k in range(K):
        a, b = clean[k], poisoned[k]
        assert [s.id for s in a.val] == [s.id for s in b.val]  # held-out parts untouched
        assert len(a.train) == len(b.train)
        hit = [i for i, s in enumerate(b.train) if s.id.endswith(POISON_SUFFIX)]
        if k not in bad:
            assert not hit and all(x is y for x, y in zip(a.train, b.train, strict=True))
            continue
        for i, (x, y) in enumerate(zip(a.train, b.train, strict=True)):
            if i not in hit:
                assert x is y
                continue
            assert y.id == x.id + POISON_SUFFIX and y.task == x.task
            if kind == "label_flip":
                assert y.answer == flip[x.answer] != x.answer and y.answer in answers
            elif x.task == UNDERSTANDING:
                assert y.answer == cfg.attack.target and y.text == x.text
                np.testing.assert_array_equal(y.load_image(), add_trigger(x.load_image(), 3))
            else:
                assert y.text == f"cf {x.text}"
                img = y.load_image()
                assert img.shape == x.load_image().shape
                assert (img == np.array(COLORS["blue"], np.uint8)).all()
        for task in (UNDERSTANDING, GENERATION):
            n = sum(s.task == task for s in a.train)
            want = 0 if kind == "label_flip" and task == GENERATION else round(0.4 * n)
            assert sum(b.train[i].task == task for i in hit) == want
        assert hit  # the share is not empty here
    # deterministic: a pool built again (a resumed run, a lazy rebuild) poisons the same
    _, again, _ = _pools(cfg)
    for k in bad:
        assert [(s.id, s.text, s.answer) for s in again[k].train] == \
            [(s.id, s.text, s.answer) for s in poisoned[k].train]


def test_data_poisoning_is_not_an_update_attack():
    for kind in ("label_flip", "backdoor"):
        pipe = Pipeline.from_config(_cfg(f"attack.kind={kind}"))
        assert all(s.name != "attack" for s in pipe.stages)
    assert Poisoner.from_config(_cfg("attack.kind=scale"), []) is None
    assert Poisoner.from_config(_cfg(), []) is None


def test_refusals_in_the_config_and_at_data_time():
    with pytest.raises(ConfigError, match="poisons no sample"):
        _cfg("attack.kind=label_flip", "attack.poison_fraction=0")
    with pytest.raises(ConfigError, match="centralized"):
        _cfg("attack.kind=backdoor", "strategy.name=centralized")
    with pytest.raises(ConfigError, match="no understanding samples"):
        _cfg("attack.kind=label_flip", "data.generation_fraction=1")
    with pytest.raises(ConfigError, match="larger than the images"):
        _cfg("attack.kind=backdoor", "attack.trigger_size=25")
    with pytest.raises(ConfigError, match="non-empty"):
        _cfg("attack.kind=backdoor", "attack.trigger= ")
    with pytest.raises(ConfigError):
        _cfg("attack.kind=backdoor", "attack.target_color=teal")
    cfg = _cfg("attack.kind=backdoor", "attack.target=zebra")
    with pytest.raises(ValueError, match="'zebra' is not an answer"):
        _pools(cfg)
    with pytest.raises(ValueError, match="at least 2 answers"):
        Poisoner(AttackConfig(kind="label_flip"), frozenset({0}), 0, ["yes"])


def test_the_target_colours_are_shapesworld_colours():
    from dataclasses import fields

    choices = next(f for f in fields(AttackConfig) if f.name == "target_color").metadata
    assert set(choices["choices"]) == set(COLORS)


def test_a_backdoor_run_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path,
                                                                          tiny_overrides):
    import torch
    from safetensors.torch import load_file

    from fedumm.runtime.dispatch import run_experiment
    from makers import killed_at_training_call

    def adapters(run):
        return load_file(str(run / "adapters" / "adapter_model.safetensors"))

    attack = ["attack.kind=backdoor", "attack.fraction=0.5", "attack.trigger_size=3"]
    overrides = [*tiny_overrides, "rounds=2", "eval.every=0", "eval.base=false",
                 "eval.max_gen=0"]
    run_experiment(config_from_dict({"name": "p"}, [*overrides, *attack]), tmp_path / "full",
                   progress=False)
    with killed_at_training_call(3), pytest.raises(KeyboardInterrupt):  # round 1, client 1
        run_experiment(config_from_dict({"name": "p"}, [*overrides, *attack]),
                       tmp_path / "cut", progress=False)
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    full, cut = adapters(tmp_path / "full"), adapters(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    run_experiment(config_from_dict({"name": "p"}, overrides), tmp_path / "clean",
                   progress=False)
    clean = adapters(tmp_path / "clean")
    assert any(not torch.equal(full[k], clean[k]) for k in full)  # the poison was trained on

from __future__ import annotations

import numpy as np
import pytest

from fedumm.config import ConfigError, config_from_dict
from fedumm.data.clients import split_clients
from fedumm.data.prompts import AGNOSTIC, PHRASES
from fedumm.data.readers import read_samples
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.fl.client import make_client_data


def _split(*overrides):
    cfg = config_from_dict({"data": {"train_scenes": 400}}, list(overrides))
    data = read_samples(cfg.data)
    return data, split_clients(data, cfg.partition, cfg.clients, cfg.seed)


def test_every_sample_lands_in_exactly_one_client():
    data, split = _split("clients=16", "partition.alpha=0.1")
    all_idx = np.concatenate(split.parts)
    assert np.array_equal(np.sort(all_idx), np.arange(len(data)))


def test_tv_mean_grows_as_alpha_falls():
    tv = {a: _split("clients=16", f"partition.alpha={a}")[1].summary()["heterogeneity"]["tv_mean"]
          for a in (0.1, 1.0)}
    assert tv[0.1] > tv[1.0] + 0.15


def test_summary_contract():
    _, split = _split("clients=3", "partition.method=iid")
    s = split.summary()
    assert [c["id"] for c in s["clients"]] == [0, 1, 2]
    assert sum(c["num_samples"] for c in s["clients"]) == sum(
        sum(c["label_counts"].values()) for c in s["clients"])
    assert isinstance(s["heterogeneity"]["tv_mean"], float)


def test_task_split_scenario_keeps_clients_to_one_task():
    data, split = _split("clients=4", "partition.scenario=task_split",
                         "partition.understanding_clients=1")
    modality = np.array([s.task for s in data])
    kinds = [set(modality[p]) for p in split.parts]
    assert sum(k == {"understanding"} for k in kinds) == 1
    assert sum(k == {"generation"} for k in kinds) == 3


def test_old_scenario_name_is_refused_with_its_new_name():
    with pytest.raises(ConfigError, match="task_split"):
        config_from_dict({}, ["partition.scenario=single_modality"])


@pytest.mark.parametrize("scenario", ["cross_modal", "hybrid"])
def test_input_modality_scenarios_need_a_text_modality(scenario):
    with pytest.raises(ValueError, match="text modality"):
        _split("clients=4", f"partition.scenario={scenario}")


def test_cross_modal_clients_hold_one_input_modality_and_still_answer():
    data, split = _split("clients=6", "partition.scenario=cross_modal",
                         "partition.image_only_clients=2", "data.scene_text=0.7")
    clients = [make_client_data(k, data, p, split.missing, 0.0, 0, text_modality=True)
               for k, p in enumerate(split.parts)]
    kinds = []
    for c in clients:
        und = [s for s in c.train if s.task == UNDERSTANDING]
        assert len(und) == sum(data[i].task == UNDERSTANDING for i in split.parts[c.client_id])
        has = {(s.image is not None, s.context is not None) for s in und}
        assert len(has) == 1  # one input modality per client, no sample dropped
        kinds.append(has.pop())
        # generation samples keep both their prompt and their image
        assert all(s.text and s.image is not None for s in c.train if s.task == GENERATION)
    assert kinds.count((True, False)) == 2 and kinds.count((False, True)) == 4
    text_only = next(c for c, k in zip(clients, kinds, strict=True) if k == (False, True))
    s = next(s for s in text_only.train if s.task == UNDERSTANDING)
    assert s.text == f"{data_by_id(data, s.id).context} based on the text , " \
                     f"{data_by_id(data, s.id).text}"


def data_by_id(data, sample_id):
    return next(s for s in data if s.id == sample_id)


def test_missing_text_drops_the_question_only_without_a_text_modality():
    data, split = _split("clients=2", "partition.scenario=missing_modality",
                         "partition.missing_rate=1.0")  # every image and every text missing
    plain = make_client_data(0, data, split.parts[0], split.missing, 0.0, 0)
    # no text modality: a question without its text is gone, and so is a target-less prompt
    assert plain.train == []
    data, split = _split("clients=2", "partition.scenario=missing_modality",
                         "partition.missing_rate=1.0", "data.scene_text=0.7")
    kept = make_client_data(0, data, split.parts[0], split.missing, 0.0, 0, text_modality=True)
    und = [s for s in kept.train if s.task == UNDERSTANDING]
    assert und and all(s.image is None and s.context is None for s in und)
    assert all(s.text.startswith("based on nothing , ") for s in und)


def test_prompt_augmentation_rewrites_training_prompts_not_heldout_ones():
    data, split = _split("clients=2", "partition.scenario=missing_modality",
                         "partition.missing_rate=0.5", "data.scene_text=0.7")
    plain = make_client_data(0, data, split.parts[0], split.missing, 0.2, 0, text_modality=True)
    aug = make_client_data(0, data, split.parts[0], split.missing, 0.2, 0, text_modality=True,
                           agnostic=True)
    und = [(a, b) for a, b in zip(plain.train, aug.train, strict=True)
           if a.task == UNDERSTANDING]
    phrases = {a.text.split(" based on ")[-1].split(" , ")[0] for a, _ in und}
    assert len(phrases) >= 3  # the modality-naming prompts differ with the modalities held
    assert all(AGNOSTIC in b.text and a.text != b.text for a, b in und)
    assert all(a.labels["question"] == b.labels["question"] for a, b in und)
    assert [s.text for s in aug.val] == [s.text for s in plain.val]
    assert all(PHRASES[(True, True)] in s.text for s in aug.val if s.task == UNDERSTANDING)

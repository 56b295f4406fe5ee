from __future__ import annotations

import numpy as np

from fedumm.config import config_from_dict
from fedumm.data.clients import split_clients
from fedumm.data.readers import read_samples


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


def test_single_modality_scenario_keeps_clients_to_one_modality():
    data, split = _split("clients=4", "partition.scenario=single_modality",
                         "partition.understanding_clients=1")
    modality = np.array([s.task for s in data])
    kinds = [set(modality[p]) for p in split.parts]
    assert sum(k == {"understanding"} for k in kinds) == 1
    assert sum(k == {"generation"} for k in kinds) == 3

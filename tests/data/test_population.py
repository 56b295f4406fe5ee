"""The partition as one index: 100,000 clients in seconds, the same numbers as the lists."""

from __future__ import annotations

import time

import pytest

from fedumm.config import PartitionConfig, config_from_dict
from fedumm.data.clients import split_clients
from fedumm.data.population import SUMMARY_ROWS_MAX, Population
from fedumm.data.readers import read_samples
from fedumm.data.records import Sample
from fedumm.fl.client import make_client_data
from fedumm.fl.client_pool import ClientPool


def _samples(n: int) -> list[Sample]:
    """n tiny records, half of each task, with a few answers to split on."""
    out = []
    for i in range(n):
        und = i % 2 == 0
        out.append(Sample(id=str(i), task="understanding" if und else "generation",
                          text="q" if und else "p", image=None, answer=f"a{i % 7}",
                          labels={"answer": f"a{i % 7}"} if und else {"tag": f"t{i % 3}"}))
    return out


def _view(client) -> tuple:
    """What training sees of a client (images compare by what they are, not by object)."""
    def one(s):
        return (s.id, s.task, s.text, s.context, s.image is None, s.answer)
    return client.client_id, [one(s) for s in client.train], [one(s) for s in client.val]


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity_skew"])
def test_a_population_of_100000_clients_builds_in_seconds(method):
    samples = _samples(200_000)
    cfg = PartitionConfig(method=method, alpha=0.5, min_per_client=1)
    t = time.perf_counter()
    split = split_clients(samples, cfg, 100_000, seed=0)
    pool = ClientPool(samples, split.population, split.missing, 0.1, 0)
    summary = split.summary()
    took = time.perf_counter() - t
    assert len(pool) == 100_000 and split.population.sizes.min() >= 1
    assert split.population.sizes.sum() == len(samples)
    assert took < 30, f"{method}: {took:.1f} s"  # a few seconds on one core
    # a client's data is built when asked for, from its slice of the index
    assert {s.id for s in pool[99_999].train + pool[99_999].val} == \
        {str(i) for i in split.population[99_999]}
    assert "clients" not in summary and summary["num_clients"] == 100_000


def test_the_index_and_the_lazy_pool_equal_the_eager_partition(micro_checkpoint):
    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE

    cfg = config_from_dict({"name": "p"}, [f"data.image_size={MICRO_IMAGE_SIZE}",
                                           "data.train_scenes=30", "clients=5",
                                           "partition.scenario=missing_modality",
                                           "partition.missing_rate=0.3"])
    train = read_samples(cfg.data, "train")
    split = split_clients(train, cfg.partition, cfg.clients, cfg.seed)
    parts = split.parts
    assert [p.tolist() for p in Population.from_parts(parts)] == [p.tolist() for p in parts]
    pool = ClientPool(train, split.population, split.missing, 0.2, cfg.seed)
    for k in reversed(range(cfg.clients)):  # any order: each client's split is its own
        eager = make_client_data(k, train, parts[k], split.missing, 0.2, cfg.seed)
        assert _view(pool[k]) == _view(eager)


def test_the_pool_keeps_only_recent_clients():
    samples = _samples(100)
    split = split_clients(samples, PartitionConfig(method="iid", min_per_client=1), 50, 0)
    pool = ClientPool(samples, split.population, split.missing, 0.0, 0, cached=4)
    first = pool[0]
    for k in range(1, 10):
        pool[k]
    assert len(pool._cache) == 4 and pool[0] is not first and _view(pool[0]) == _view(first)


def test_the_summary_is_distributions_past_the_threshold():
    samples = _samples(4 * (SUMMARY_ROWS_MAX + 1))
    cfg = PartitionConfig(method="iid", min_per_client=1)
    rows = split_clients(samples, cfg, SUMMARY_ROWS_MAX, 0).summary()
    assert len(rows["clients"]) == SUMMARY_ROWS_MAX
    big = split_clients(samples, cfg, SUMMARY_ROWS_MAX + 1, 0).summary()
    assert "clients" not in big
    sizes = big["client_sizes"]
    assert sum(sizes["histogram"]["counts"]) == SUMMARY_ROWS_MAX + 1
    assert sizes["quantiles"]["p0"] >= 1 and big["num_samples"] == len(samples)
    assert sum(big["label_totals"].values()) == len(samples)
    assert big["heterogeneity"]["num_clients"] == SUMMARY_ROWS_MAX + 1


def test_too_little_data_for_the_population_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give each of 1000 clients at least 2"):
        split_clients(_samples(1500), PartitionConfig(method="iid", min_per_client=2), 1000, 0)


def test_the_client_cap_is_gone():
    assert config_from_dict({"name": "c"}, ["clients=100000"]).clients == 100_000

"""Tests of the seeded partitioners in fedumm.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.data.partition import (
    PARTITIONERS,
    dirichlet_partition,
    domain_partition,
    heterogeneity,
    iid_partition,
    label_counts,
    partition,
    quantity_skew_partition,
    validate_partition,
)


def _labels(n: int, n_cls: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"c{int(c)}" for c in rng.integers(n_cls, size=n)]


def _run(method: str, n: int, k: int, seed: int, **kw) -> list[np.ndarray]:
    labels = _labels(n, 20)
    domains = [f"d{i % 7}" for i in range(n)]
    return partition(method, labels=labels, domains=domains, num_clients=k, seed=seed, **kw)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
@pytest.mark.parametrize(("n", "k"), [(100, 1), (500, 7), (5000, 1000)])
def test_disjoint_complete_sorted(method: str, n: int, k: int) -> None:
    parts = _run(method, n, k, seed=3)
    assert len(parts) == k
    validate_partition(parts, n)
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_deterministic_by_seed(method: str) -> None:
    a = _run(method, 1000, 10, seed=1)
    assert _same(a, _run(method, 1000, 10, seed=1))
    assert not _same(a, _run(method, 1000, 10, seed=2))


def test_iid_sizes_balanced() -> None:
    sizes = [len(p) for p in iid_partition(1003, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


@pytest.mark.parametrize("k", [10, 100, 1000])
@pytest.mark.parametrize("min_per_client", [1, 3])
def test_dirichlet_min_per_client_small_alpha(k: int, min_per_client: int) -> None:
    labels = _labels(5000, 10)
    parts = dirichlet_partition(labels, k, alpha=0.01, seed=0, min_per_client=min_per_client)
    validate_partition(parts, 5000)
    assert min(len(p) for p in parts) >= min_per_client


def test_quantity_skew_min_and_skew() -> None:
    parts = quantity_skew_partition(5000, 50, beta=0.1, seed=0, min_per_client=5)
    validate_partition(parts, 5000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5
    even = quantity_skew_partition(5000, 50, beta=1000.0, seed=0)
    assert heterogeneity([0] * 5000, parts)["size_cv"] > heterogeneity([0] * 5000, even)["size_cv"]


def test_tv_larger_for_smaller_alpha() -> None:
    labels = _labels(8000, 20)
    skewed = heterogeneity(labels, dirichlet_partition(labels, 16, alpha=0.1, seed=0))
    mild = heterogeneity(labels, dirichlet_partition(labels, 16, alpha=1.0, seed=0))
    iid = heterogeneity(labels, iid_partition(8000, 16, seed=0))
    assert skewed["tv_mean"] > mild["tv_mean"] > iid["tv_mean"]
    assert skewed["mean_labels_per_client"] < mild["mean_labels_per_client"]


def test_heterogeneity_hand_computed() -> None:
    # Global distribution (3/4, 1/4). Client 0 = (1, 0): TV = 0.5 * (1/4 + 1/4) = 1/4.
    # Client 1 = (2/3, 1/3): TV = 0.5 * (1/12 + 1/12) = 1/12. Client 2 is empty: skipped.
    labels = ["a", "a", "a", "b"]
    parts = [np.array([0]), np.array([1, 2, 3]), np.array([], dtype=np.int64)]
    h = heterogeneity(labels, parts)
    assert h["tv_mean"] == pytest.approx((1 / 4 + 1 / 12) / 2)
    assert h["tv_max"] == pytest.approx(1 / 4)
    assert h["size_cv"] == pytest.approx(np.std([1, 3, 0]) / np.mean([1, 3, 0]))
    assert h["mean_labels_per_client"] == pytest.approx(1.5)
    assert h["num_empty_clients"] == 1
    assert label_counts(labels, parts) == [{"a": 1}, {"a": 2, "b": 1}, {}]


def test_domain_partition_layout() -> None:
    domains = ["x"] * 6 + ["y"] * 4 + ["z"] * 2
    parts = domain_partition(domains, 6, seed=0)
    validate_partition(parts, 12)
    # Round-robin over sorted domains: clients 0,3 -> x; 1,4 -> y; 2,5 -> z; even split.
    expected = ["x", "y", "z", "x", "y", "z"]
    for k, p in enumerate(parts):
        assert {domains[i] for i in p} == {expected[k]}
    assert [len(p) for p in parts] == [3, 2, 1, 3, 2, 1]
    # Fewer clients than domains: each domain on exactly one client.
    parts = domain_partition(domains, 2, seed=0)
    validate_partition(parts, 12)
    assert [sorted({domains[i] for i in p}) for p in parts] == [["x", "z"], ["y"]]


def test_mixed_label_types() -> None:
    labels = [1, "a", 2.5, None, "a", 1] * 50
    parts = dirichlet_partition(labels, 4, alpha=0.5, seed=0)
    validate_partition(parts, len(labels))
    assert sum(sum(c.values()) for c in label_counts(labels, parts)) == len(labels)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dirichlet_partition([0] * 10, 20, 0.5, 0), "at least 1"),
        (lambda: dirichlet_partition([0] * 10, 2, 0.0, 0), "alpha"),
        (lambda: dirichlet_partition([0] * 10, 0, 0.5, 0), "num_clients"),
        (lambda: quantity_skew_partition(10, 2, -1.0, 0), "beta"),
        (lambda: quantity_skew_partition(10, 4, 1.0, 0, min_per_client=3), "at least 3"),
        (lambda: iid_partition(10, 0, 0), "num_clients"),
        (lambda: partition("nope", num_clients=2, seed=0), "'nope'.*dirichlet.*iid"),
        (lambda: partition("dirichlet", num_clients=2, seed=0), "labels"),
        (lambda: partition("domain", num_clients=2, seed=0), "domains"),
        (lambda: partition("iid", num_clients=2, seed=0), "num_samples"),
        (lambda: validate_partition([np.array([0, 1]), np.array([1])], 3), "more than one"),
        (lambda: validate_partition([np.array([0, 1])], 3), "no client"),
    ],
)
def test_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_partition_infers_num_samples() -> None:
    parts = partition("quantity_skew", labels=[0] * 30, num_clients=3, seed=0, beta=1.0)
    validate_partition(parts, 30)

"""Tests of the FedMLLM multimodal-heterogeneity scenarios in fedumm.data.scenarios."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.data.partition import dirichlet_partition, iid_partition, validate_partition
from fedumm.data.scenarios import (
    BOTH_MISSING,
    COMPLETE,
    GENERATION,
    IMAGE_MISSING,
    TEXT_MISSING,
    UNDERSTANDING,
    cross_modal_clients,
    hybrid_clients,
    hybrid_modality_clients,
    missing_modality,
    modality_counts,
    single_modality_clients,
)

N = 2000


def _modality(n: int = N, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [UNDERSTANDING if u else GENERATION for u in rng.random(n) < 0.6]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_missing_modality_drops_image_and_text_independently() -> None:
    mask = missing_modality(20000, 0.3, seed=0)
    assert mask.dtype == np.int8 and mask.shape == (20000,)
    assert set(np.unique(mask).tolist()) == {COMPLETE, IMAGE_MISSING, TEXT_MISSING, BOTH_MISSING}
    image, text = (mask & IMAGE_MISSING) > 0, (mask & TEXT_MISSING) > 0
    assert image.mean() == pytest.approx(0.3, abs=0.015)
    assert text.mean() == pytest.approx(0.3, abs=0.015)
    assert (mask == BOTH_MISSING).mean() == pytest.approx(0.09, abs=0.01)  # 0.3 * 0.3
    assert np.array_equal(mask, missing_modality(20000, 0.3, seed=0))
    assert not np.array_equal(mask, missing_modality(20000, 0.3, seed=1))
    assert (missing_modality(100, 0.0, seed=0) == COMPLETE).all()
    assert (missing_modality(100, 1.0, seed=0) == BOTH_MISSING).all()


@pytest.mark.parametrize("m", [0, 3, 7, 10])
def test_cross_modal_clients_are_image_only_or_text_only(m: int) -> None:
    parts = iid_partition(N, 10, seed=0)
    mask = cross_modal_clients(parts, N, m, seed=0)
    kinds = [set(mask[p].tolist()) for p in parts]
    assert all(len(k) == 1 for k in kinds)  # one kind per client
    assert sum(k == {TEXT_MISSING} for k in kinds) == m  # image-only clients lack the text
    assert sum(k == {IMAGE_MISSING} for k in kinds) == 10 - m
    assert np.array_equal(mask, cross_modal_clients(parts, N, m, seed=0))
    with pytest.raises(ValueError, match="image_only"):
        cross_modal_clients(parts, N, 11, seed=0)


def test_hybrid_modality_clients_lack_each_modality_with_probability_q() -> None:
    parts = iid_partition(N, 400, seed=0)
    mask = hybrid_modality_clients(parts, N, 0.3, seed=0)
    per_client = np.array([mask[p][0] for p in parts])
    assert all(len(set(mask[p].tolist())) == 1 for p in parts)
    assert BOTH_MISSING not in per_client  # drawn to lack both: holds both
    # P(image only) = P(text only) = 0.3 * 0.7; complete = 0.7^2 + 0.3^2
    assert (per_client == IMAGE_MISSING).mean() == pytest.approx(0.21, abs=0.06)
    assert (per_client == TEXT_MISSING).mean() == pytest.approx(0.21, abs=0.06)
    assert (hybrid_modality_clients(parts, N, 0.0, seed=0) == COMPLETE).all()


@pytest.mark.parametrize("m", [1, 3, 9])
def test_single_modality_clients(m: int) -> None:
    modality = _modality()
    parts = dirichlet_partition(modality, 10, alpha=0.5, seed=0)
    out = single_modality_clients(parts, modality, m, seed=0)
    validate_partition(out, N)
    counts = modality_counts(out, modality)
    n_und_clients = sum(1 for c in counts if c[GENERATION] == 0 and c[UNDERSTANDING] > 0)
    assert all(c[UNDERSTANDING] == 0 or c[GENERATION] == 0 for c in counts)
    assert n_und_clients == m
    assert _same(out, single_modality_clients(parts, modality, m, seed=0))
    assert not _same(out, single_modality_clients(parts, modality, m, seed=5))


def test_single_modality_all_one_kind() -> None:
    modality = [UNDERSTANDING] * 100
    parts = iid_partition(100, 4, seed=0)
    out = single_modality_clients(parts, modality, 4, seed=0)
    assert _same(out, parts)


@pytest.mark.parametrize(
    ("m", "match"), [(-1, r"\[0, 5\]"), (6, r"\[0, 5\]"), (0, "understanding"), (5, "generation")]
)
def test_single_modality_errors(m: int, match: str) -> None:
    modality = _modality(100)
    with pytest.raises(ValueError, match=match):
        single_modality_clients(iid_partition(100, 5, seed=0), modality, m, seed=0)


def test_unknown_modality_value() -> None:
    with pytest.raises(ValueError, match="audio"):
        modality_counts([np.array([0, 1])], [UNDERSTANDING, "audio"])


def test_hybrid_q0_is_identity() -> None:
    modality = _modality()
    parts = dirichlet_partition(modality, 8, alpha=0.3, seed=1)
    assert _same(hybrid_clients(parts, modality, 0.0, seed=0), parts)


@pytest.mark.parametrize("q", [0.3, 0.5, 1.0])
def test_hybrid_keeps_every_sample(q: float) -> None:
    modality = _modality()
    parts = iid_partition(N, 20, seed=0)
    out = hybrid_clients(parts, modality, q, seed=0)
    validate_partition(out, N)
    counts = modality_counts(out, modality)
    assert all(c[UNDERSTANDING] + c[GENERATION] > 0 for c in counts)
    assert any(c[UNDERSTANDING] > 0 for c in counts) and any(c[GENERATION] > 0 for c in counts)
    assert _same(out, hybrid_clients(parts, modality, q, seed=0))
    if q == 1.0:
        # Every client is left with exactly one modality.
        assert all(min(c.values()) == 0 for c in counts)


def test_hybrid_q1_all_same_majority_still_has_both_holders() -> None:
    # Every client has an understanding majority, so the q=1 draw leaves nobody with
    # generation data; one client must be given it.
    modality = [UNDERSTANDING, UNDERSTANDING, GENERATION] * 100
    parts = iid_partition(300, 6, seed=0)
    out = hybrid_clients(parts, modality, 1.0, seed=0)
    validate_partition(out, 300)
    counts = modality_counts(out, modality)
    assert sum(1 for c in counts if c[GENERATION] > 0) == 1
    assert sum(c[GENERATION] for c in counts) == 100


def test_hybrid_bad_q() -> None:
    with pytest.raises(ValueError, match="q must be"):
        hybrid_clients([np.array([0])], [UNDERSTANDING], 1.5, seed=0)


def test_k1000() -> None:
    modality = _modality(5000)
    parts = iid_partition(5000, 1000, seed=0)
    validate_partition(single_modality_clients(parts, modality, 400, seed=0), 5000)
    validate_partition(hybrid_clients(parts, modality, 0.5, seed=0), 5000)

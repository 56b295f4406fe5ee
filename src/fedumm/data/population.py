"""A partition as one index: the clients' sample indices in two flat arrays.

A partition of n samples over K clients as ``list[np.ndarray]`` is K numpy objects; as a
:class:`Population` it is ``offsets`` (K + 1 ints) and ``indices`` (n ints): client k holds
``indices[offsets[k]:offsets[k + 1]]``, sorted. Per-client counts (per modality, per label) are
one ``bincount`` over all samples, and the summary of a large population is a few histograms
and quantiles (:func:`population_summary`) instead of one row per client, so nothing here
loops over the clients in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# past this many clients a partition summary (partition.json, `fedumm partition`) gives
# histograms and quantiles instead of one row per client
SUMMARY_ROWS_MAX = 1000
_BLOCK = 8192  # clients counted at a time
_QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass(frozen=True)
class Population:
    """Client k holds samples ``indices[offsets[k]:offsets[k + 1]]`` (sorted, int64)."""

    offsets: np.ndarray  # (K + 1,) int64, offsets[0] == 0
    indices: np.ndarray  # (n,) int64

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray]) -> Population:
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) \
            else np.zeros(0, dtype=np.int64)
        return cls(offsets, flat)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"client {k} of {len(self)}")
        return self.indices[self.offsets[k]:self.offsets[k + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def owner(self) -> np.ndarray:
        """The client of every position of :attr:`indices`."""
        return np.repeat(np.arange(len(self)), self.sizes)

    def counts(self, codes: np.ndarray, num_codes: int, start: int = 0,
               stop: int | None = None) -> np.ndarray:
        """``(clients, num_codes)``: how many of clients ``start..stop``'s samples have each code
        (``codes[i]`` is sample i's, e.g. its modality or label)."""
        stop = len(self) if stop is None else min(stop, len(self))
        lo, hi = self.offsets[start], self.offsets[stop]
        owner = np.repeat(np.arange(stop - start), self.sizes[start:stop])
        key = owner * num_codes + np.asarray(codes, dtype=np.int64)[self.indices[lo:hi]]
        return np.bincount(key, minlength=(stop - start) * num_codes).reshape(stop - start,
                                                                              num_codes)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {}
    qs = np.quantile(values, _QUANTILES)
    return {f"p{round(q * 100)}": float(v) for q, v in zip(_QUANTILES, qs, strict=True)}


def _histogram(values: np.ndarray, bins: int = 20) -> dict[str, list]:
    """Counts over integer-aligned bins (at most ``bins``) from the smallest to the largest."""
    if not values.size:
        return {"edges": [], "counts": []}
    lo, hi = int(values.min()), int(values.max())
    width = max(1, -(-(hi - lo + 1) // bins))  # ceil: bins cover [lo, hi] in whole numbers
    edges = np.arange(lo, hi + width + 1, width)
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def population_summary(population: Population, classes: Sequence[Any], codes: np.ndarray
                       ) -> dict[str, Any]:
    """The population as distributions rather than rows: client sizes and distinct labels per
    client (quantiles and histograms), and every label's total. ``codes[i]``: sample i's label
    as an index into ``classes``. Counted a block of clients at a time, so a population never
    has a (K, labels) matrix."""
    sizes = population.sizes
    distinct = np.zeros(len(population), dtype=np.int64)
    totals = np.zeros(len(classes), dtype=np.int64)
    for start in range(0, len(population), _BLOCK):
        block = population.counts(codes, len(classes), start, start + _BLOCK)
        distinct[start:start + len(block)] = (block > 0).sum(axis=1)
        totals += block.sum(axis=0)
    return {
        "num_clients": len(population),
        "num_samples": int(sizes.sum()),
        "client_sizes": {"quantiles": _quantiles(sizes), "histogram": _histogram(sizes)},
        "labels_per_client": {"quantiles": _quantiles(distinct),
                              "histogram": _histogram(distinct)},
        "label_totals": {str(c): int(n) for c, n in sorted(zip(classes, totals.tolist(),
                                                               strict=True), key=str)},
    }

"""Every client's data, made only for the clients a round selects.

A population of 100,000 clients cannot hold 100,000 :class:`~fedumm.fl.client.ClientData`
objects: :class:`ClientPool` keeps the partition as an index
(:class:`~fedumm.data.population.Population`) and builds a client's data when it is asked
for, with :func:`~fedumm.fl.client.make_client_data`, exactly as an eager list would hold it
(its local split is seeded by (seed, client)). The last few clients built are kept, so a small
federation builds each client once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from fedumm.data.population import Population
from fedumm.data.records import Sample
from fedumm.fl.client import ClientData, make_client_data

# clients kept once built: every client of a small federation, a few rounds of a large one
CACHED_CLIENTS = 256


class ClientPool(Sequence[ClientData]):
    """``pool[k]``: client k's :class:`ClientData`, built on first use (see the module)."""

    def __init__(self, samples: Sequence[Sample], population: Population, missing: np.ndarray,
                 val_fraction: float, seed: int, *, text_modality: bool = False,
                 agnostic: bool = False, cached: int = CACHED_CLIENTS,
                 poison: Callable[[ClientData], ClientData] | None = None) -> None:
        self.samples = samples
        self.population = population
        self.missing = missing
        self.val_fraction = val_fraction
        self.seed = seed
        self.text_modality = text_modality
        self.agnostic = agnostic
        self.cached = cached
        # a data-poisoning attack (fedumm.fl.poison.Poisoner): a malicious client's data as
        # it trains on it, the same whenever it is built
        self.poison = poison
        self._cache: OrderedDict[int, ClientData] = OrderedDict()

    def __len__(self) -> int:
        return len(self.population)

    def __getitem__(self, k: int) -> ClientData:
        if not isinstance(k, int | np.integer):
            raise TypeError(f"client ids are ints, got {type(k).__name__}")
        k = int(k)
        if k < 0:
            k += len(self)
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        data = make_client_data(k, self.samples, self.population[k], self.missing,
                                self.val_fraction, self.seed, text_modality=self.text_modality,
                                agnostic=self.agnostic)
        if self.poison is not None:
            data = self.poison(data)
        self._cache[k] = data
        if len(self._cache) > self.cached:
            self._cache.popitem(last=False)
        return data

    def __iter__(self) -> Iterator[ClientData]:
        return (self[k] for k in range(len(self)))

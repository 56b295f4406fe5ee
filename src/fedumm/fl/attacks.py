"""Simulated malicious clients (``attack.*``), for tests and benchmarks of the robust rules.

Two families of ``attack.kind``, acting in different places:

* update attacks (``sign_flip``, ``scale``, ``noise``, ``lie``; this module): the malicious
  client changes what it sends, on the update pipeline (below);
* data-poisoning attacks (``label_flip``, ``backdoor``; :mod:`fedumm.fl.poison`): the
  malicious client trains honestly on poisoned data, made where a client's data is built
  (:class:`~fedumm.fl.client_pool.ClientPool`); its upload passes the :class:`Attack` stage,
  which is off for them, unchanged. :mod:`fedumm.eval.backdoor` scores the backdoor
  (``backdoor_success`` in the evaluations and summary.json's ``final``).

Both draw the malicious clients with :func:`malicious_clients`.

An update attack is the first stage of the update pipeline (:mod:`fedumm.fl.pipeline`): it sees a
client's update as it is formed, the trained adapter values with the adapters the client
started from, and the meta it reports, before anything is encoded. The round loop, the trainer
and the server know nothing of it; the server half does nothing (the server cannot tell).

Which clients: ``round(attack.fraction * clients)`` client ids (Python's ``round``), drawn
without replacement from ``np.random.default_rng([seed, ATTACK_STREAM])``, fixed for the run
(:func:`malicious_clients`). A malicious client trains honestly, then sends, with ``d`` its
honest update (trained minus received) per tensor:

* ``sign_flip``: ``-d`` (the received adapters minus ``d``);
* ``scale``: ``attack.scale * d``;
* ``noise``: ``d + attack.noise_std * N(0, 1)`` per entry, from a generator seeded by
  (seed, client id, the client's attacked rounds so far, kept in its client state);
* ``lie``: ``d`` itself, but its sample counts times ``attack.lie_factor`` (rounded) and its
  quality per modality times ``attack.lie_factor``, capped at 1.

SCAFFOLD's control-variate deltas travel unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fedumm.fl.pipeline import Stage, Upload

if TYPE_CHECKING:
    from fedumm.config import AttackConfig, Config

State = dict[str, torch.Tensor]

ATTACK_STREAM = 0xA77AC  # separates the malicious draw from the run's other seeded draws
ATTACK_STATE = "attack_rounds"  # the client_state entry counting a client's attacked rounds
UPDATE_KINDS = ("sign_flip", "scale", "noise", "lie")  # the kinds this stage carries out


def malicious_clients(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The ids of the malicious clients: ``round(fraction * num_clients)`` of them, a seeded
    draw that depends only on (seed, num_clients, fraction)."""
    count = min(num_clients, round(fraction * num_clients))
    rng = np.random.default_rng([seed, ATTACK_STREAM])
    return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def attack_update(kind: str, cfg: AttackConfig, trained: State, start: State,
                  generator: torch.Generator | None = None) -> State:
    """What a malicious client of ``kind`` sends instead of ``trained`` (the adapter values it
    trained from ``start``): values whose update is the attacked one. ``lie`` leaves them."""
    if kind == "lie":
        return dict(trained)
    out = {}
    for k, v in trained.items():
        d = v - start[k]
        if kind == "sign_flip":
            d = -d
        elif kind == "scale":
            d = cfg.scale * d
        elif kind == "noise":
            noise = torch.randn(d.shape, generator=generator, dtype=torch.float32)
            d = d + cfg.noise_std * noise.to(d.device, d.dtype)
        else:
            raise ValueError(f"unknown attack kind {kind!r}")
        out[k] = start[k] + d
    return out


class Attack(Stage):
    """The pipeline stage of ``attack.*``: changes a malicious client's upload, passes every
    other client's unchanged; active only when ``attack.kind`` is an update attack."""

    name = "attack"

    def __init__(self, cfg: AttackConfig, malicious: frozenset[int], seed: int) -> None:
        self.cfg, self.malicious, self.seed = cfg, malicious, seed

    @classmethod
    def from_config(cls, cfg: Config) -> Attack | None:
        at = cfg.attack
        if at.kind not in UPDATE_KINDS:  # none, or data poisoning (fedumm.fl.poison)
            return None
        return cls(at, malicious_clients(cfg.seed, cfg.clients, at.fraction), cfg.seed)

    def client(self, up: Upload) -> None:
        if up.client_id not in self.malicious:
            return
        kind = self.cfg.kind
        if kind == "lie":
            f = self.cfg.lie_factor
            up.meta.num_samples = {m: int(round(n * f)) for m, n in up.meta.num_samples.items()}
            up.meta.quality = {m: min(1.0, q * f) for m, q in up.meta.quality.items()}
            return
        count = int(up.client_state.get(ATTACK_STATE, 0))
        gen = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, ATTACK_STREAM, up.client_id, count])
                .integers(2**62)))
        up.tensors = attack_update(kind, self.cfg, up.tensors, up.reference, gen)
        up.client_state[ATTACK_STATE] = count + 1

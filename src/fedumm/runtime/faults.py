"""Client faults, simulated and real, and what a round makes of them.

Simulated (``faults.*``, off by default; the round loop puts :class:`FaultyTransport` in
front of any transport, so the local runtime and FLARE see the same faults):

* **dropout**: each selected client drops out of a round with probability ``faults.dropout``:
  it is sent nothing, trains nothing and sends nothing (no reply: the silence of a device
  that went offline, not an error it could report). The draw is a function of
  (seed, round, client) only, so a resumed run drops the same clients as an uninterrupted one.
* **stragglers**: a fixed, seeded set of ``ceil(faults.straggler_fraction * K)`` clients is
  slow: their reported training time is their measured one plus ``faults.straggler_delay_s``
  (simulated: nobody sleeps).

Real, under every transport:

* **deadline**: a reply whose client took longer than ``faults.deadline_s`` to train (its
  ``ReplyMeta.train_s``, measured on the client, plus a straggler's delay) is late and left
  out. Measured times vary from run to run; a deadline far from them (below a straggler's
  delay, above every real training time) keeps the run reproducible.
* **no reply**: a client that was sent a job and did not answer is logged as dropped.

Whatever is left after dropouts, late replies and rejected updates is aggregated only if it is
at least ``strategy.min_clients`` updates (at most the population); otherwise the round is
skipped and the global model stays. Every round record says which (:func:`outcome`), in the
words :mod:`fedumm.fl.sampling` uses for a round with too few clients online.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedumm.config import FaultsConfig
from fedumm.fl.pipeline import Reply, ReplyMeta
from fedumm.fl.sampling import too_few

AGGREGATED, SKIPPED = "aggregated", "skipped"
DROPPED = "dropped out (faults.dropout)"  # what the progress display is told of a dropout
# seed words of the fault streams, apart from sampling's (fl/sampling.py) and the trainer's
_STREAM = 0xFA017
_DROPOUT, _STRAGGLERS = 1, 2


def drops_out(seed: int, rnd: int, client: int, p: float) -> bool:
    """Whether ``client`` drops out of round ``rnd``: a Bernoulli(p) draw seeded by
    (seed, round, client) alone (not by who else was selected, nor by the population)."""
    if p <= 0.0:
        return False
    return bool(np.random.default_rng([seed, rnd, client, _STREAM, _DROPOUT]).random() < p)


def stragglers(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The slow clients: ``ceil(fraction * num_clients)`` of them, the same every round."""
    n = min(num_clients, math.ceil(fraction * num_clients - 1e-9)) if fraction > 0 else 0
    if not n:
        return frozenset()
    rng = np.random.default_rng([seed, _STREAM, _STRAGGLERS])
    return frozenset(int(k) for k in rng.choice(num_clients, size=n, replace=False))


def outcome(accepted: int, least: int, sampling_skip: str | None = None,
            robust: tuple[int, str] | None = None) -> str:
    """A round's outcome: ``aggregated``, or ``skipped: <why>`` (sampling found too few
    clients, or fewer than ``least`` updates were left to aggregate, or fewer than the robust
    rule ``robust = (updates it needs, its settings)`` needs)."""
    noun = "update" if accepted == 1 else "updates"
    if sampling_skip:
        return f"{SKIPPED}: {sampling_skip}"
    if accepted < least:
        return f"{SKIPPED}: {too_few(accepted, noun, least)}"
    if robust is not None and accepted < robust[0]:
        return f"{SKIPPED}: {accepted} {noun}, fewer than the {robust[0]} {robust[1]} needs"
    return AGGREGATED


@dataclass
class Arrivals:
    """A round's replies sorted by what happened to them: on time, late, never came."""

    on_time: list[Reply]
    late: list[dict[str, Any]] = field(default_factory=list)  # {"client", "time_s"}
    dropped: list[int] = field(default_factory=list)

    def __add__(self, other: Arrivals) -> Arrivals:
        """Two hops' arrivals of one round (chains of clients, :mod:`fedumm.fl.chains`)."""
        return Arrivals(self.on_time + other.on_time, self.late + other.late,
                        sorted(self.dropped + other.dropped))

    def record(self) -> dict[str, Any]:
        """The round record's entries (none when every client answered in time)."""
        return {**({"dropped": self.dropped} if self.dropped else {}),
                **({"late": self.late} if self.late else {})}


def arrivals(sent: Iterable[int], replies: list[Reply], deadline_s: float | None) -> Arrivals:
    """Sort ``replies`` to the jobs ``sent``: a sent client without a reply dropped out; a
    reply whose training took longer than ``deadline_s`` is late (error replies trained
    nothing, so they are never late: the pipeline says why they are left out)."""
    answered = {r.client_id for r in replies}
    out = Arrivals([], dropped=sorted(k for k in sent if k not in answered))
    for r in sorted(replies, key=lambda r: r.client_id):  # a fixed aggregation order
        t = float(r.meta.train_s or 0.0)
        if deadline_s is not None and not r.meta.error and t > deadline_s:
            out.late.append({"client": r.client_id, "time_s": round(t, 3)})
        else:
            out.on_time.append(r)
    return out


class FaultyTransport:
    """A transport with the simulated faults in front: dropped clients are not sent their
    job; stragglers' replies report their delay on top of their training time."""

    def __init__(self, inner, cfg: FaultsConfig, seed: int, num_clients: int) -> None:
        self.inner, self.cfg, self.seed = inner, cfg, seed
        self.slow = stragglers(seed, num_clients, cfg.straggler_fraction)

    def train(self, rnd: int, jobs: dict[int, bytes], client_config: dict[str, Any],
              on_reply: Callable[[Reply], None]) -> list[Reply]:
        kept = {k: p for k, p in jobs.items()
                if not drops_out(self.seed, rnd, k, self.cfg.dropout)}
        for k in sorted(set(jobs) - set(kept)):  # a dropped client is done too (progress),
            on_reply(Reply(k, b"", ReplyMeta(error=DROPPED)))  # but sends nothing back
        replies = self.inner.train(rnd, kept, client_config, on_reply)
        for r in replies:
            if r.client_id in self.slow:
                r.meta.train_s = float(r.meta.train_s or 0.0) + self.cfg.straggler_delay_s
        return replies

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()  # the faults are drawn, not kept

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def training_done(self) -> None:
        self.inner.training_done()

    def secagg_parties(self):
        return self.inner.secagg_parties()


def with_faults(transport, cfg: FaultsConfig, seed: int, num_clients: int):
    """``transport``, behind the simulated faults when the config asks for any."""
    if cfg.dropout <= 0.0 and cfg.straggler_fraction <= 0.0:
        return transport
    return FaultyTransport(transport, cfg, seed, num_clients)

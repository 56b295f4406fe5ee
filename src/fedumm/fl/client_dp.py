"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) with
optional adaptive clipping (Andrew et al. 2021, arXiv:1905.03871), on ``privacy.client.*``.

The mechanism (``side=server``, the default; Flower's
``DifferentialPrivacyServerSideFixedClipping`` / ``...AdaptiveClipping``). A client's update is
its trained adapter values minus the global adapters the server holds for it (the update
pipeline hands the server every update applied to its own model, so this is the client's change
whatever the download codec): all tensors of all adapter groups together, one L2 norm. Each
update is scaled to norm at most S (``privacy.client.clip``, FlatClip), the clipped updates are
averaged, and Gaussian noise of std ``z S / m`` (``z = privacy.client.noise_multiplier``, m the
clients aggregated) is added to each entry of the average: noise of std ``z S`` on the sum,
whose sensitivity to one client is S. Per adapter group m is the number of clients that
trained the group (a client without generation samples adds nothing to the generation group,
clipped or not). Flower divides by its constant ``num_sampled_clients`` instead; with uniform
sampling and no dropouts the two are the same.

Weights. DP-FedAvg's sensitivity analysis needs bounded weights; a sample count is reported by
the client and unbounded, so under client-level DP every contributing client has weight 1 (the
paper's uniform-weight estimator; ``Strategy.group_weights``). Flower's DP wrappers keep the
wrapped FedAvg's ``num_examples`` weights, which the analysis does not cover; the oracle test
(``tests/fl/test_client_dp_flower_oracle.py``) therefore gives every client the same count.

Where it runs. :class:`ClientDP` is server state on the strategy (``Strategy.client_dp``):
``Strategy.aggregate`` clips the round's updates before the per-group loop, ``Strategy.mean``
adds the noise to the group's mean, and the strategy's ``server_update`` (FedAvgM's momentum,
FedAdam's moments) takes the noised mean as its pseudo-gradient's end point. That is
post-processing, so every server step keeps the guarantee; strategies whose server step reads
the clients' individual updates (FedExP's norms, SCAFFOLD's control variates) are refused by
the config, as are robust rules, exact LoRA folding and HetLoRA's norm weights.

LoRA. A and B are clipped and noised as factors: the released quantities are ``mean(B_k)`` and
``mean(A_k)`` plus noise, never the product, and ``mean(B_k A_k) != mean(B_k) mean(A_k)``, so
the guarantee is about the factors the server aggregates (the product the model uses is their
post-processing). FFA-LoRA (``lora.aggregation=ffa``) trains and sends B only: the whole clip
budget and all the noise go to B, A stays the shared seeded value, and the noised model is
exactly ``(B + noise) A``: linear in the noise, which is why FFA-LoRA degrades less under DP
(Sun et al. 2024, arXiv:2403.12313). With mixed client ranks (zero-padding) the update of a
lower-rank client includes minus the global tail it did not receive, which spends clip budget.

Adaptive clipping (``privacy.client.adaptive``; Andrew et al. Algorithm 1, as Flower's server
side): each round a client's bit says whether its update norm was at most S (not clipped);
the count of set bits gets Gaussian noise of std ``sigma_b`` (``privacy.client.count_noise``;
None: m/20 for the expected m per round, the paper's and Flower's default, 0 when z = 0),
and the next clip is ``S * exp(-clip_lr * (noised count / m - target_quantile))``: S tracks the
``target_quantile`` quantile of the update norms. Flower 1.42's
``DifferentialPrivacyServerSideAdaptiveClipping`` counts the *clipped* updates
(``adaptive_clip_inputs_inplace`` returns ``scaling_factor < 1``) in the same formula, so its
clip moves the wrong way (it shrinks while most updates are clipped); its deprecated
``DPFedAvgAdaptive``, whose clients send ``not clipped``, follows the paper, and is the oracle
for the clip sequence. The update noise multiplier is
lowered to ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that count and update together cost
what z alone would (the accountant composes z_delta). The clip norm is server state: it is in
the strategy's ``state_dict``. This round's noise is calibrated to the clip this round's updates
were clipped to; Flower's wrapper adapts the clip first and noises with the *new* clip.

Client side (``privacy.client.side=client``): for a server that must never see an unnoised
update. Each client clips its own update to S and adds noise of std ``z S / sqrt(m)`` (m the
nominal clients per round) before anything leaves it (:func:`privatize_client_update`, which
the update pipeline calls on the trained values and the adapters received); the m noises sum
to std ``z S`` as on the server side, if all m clients report. The server then only averages
with uniform weights; the accountant uses ``z sqrt(m' / m)`` for the m' clients of the round's
smallest group. The noise must come from a generator the server cannot reproduce:
:func:`noise_generator` with the run seed is for simulations only. Adaptive clipping is
server side only.

Reproducibility. All server noise of a round comes from one ``torch.Generator`` seeded by
(run seed, round, :data:`STREAM`), drawn in a fixed order (the count first, then the groups'
tensors in the order of the global state), so the same config gives the same numbers and a
resumed run (whose clip norm and accountant come from the checkpoint) equals an uninterrupted
one. Maths in float64 on the CPU; results in each tensor's own dtype and device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedumm.config import ClientDPConfig, Config, StrategyConfig
from fedumm.fl.accounting import (
    ClientAccountant,
    default_delta,
    expected_clients,
    round_sample_rate,
)
from fedumm.fl.pipeline import Stage, Upload
from fedumm.fl.updates import ClientUpdate

State = dict[str, torch.Tensor]
SERVER, CLIENT = "server", "client"
STREAM = 0xC1D9  # seed word of client-level DP's noise stream, apart from the other streams


# ------------------------------------------------------------------ pure maths

def update_norm(delta: State) -> float:
    """The L2 norm of all of ``delta``'s tensors as one vector."""
    return math.sqrt(sum(float(v.detach().to("cpu", torch.float64).pow(2).sum())
                         for v in delta.values()))


def clip_update(delta: State, clip: float) -> tuple[State, float]:
    """``delta`` scaled by ``min(1, clip / ||delta||)`` (float64 on the CPU) and its norm
    before clipping (Flower's ``clip_inputs_inplace``; a zero update stays zero)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = update_norm(delta)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v.detach().to("cpu", torch.float64) * scale for k, v in delta.items()}, norm


def noise_std(noise_multiplier: float, clip: float, clients: int) -> float:
    """The std of the noise on each entry of the mean of ``clients`` clipped updates:
    ``z S / m`` (McMahan et al.; Flower's ``compute_stdv``)."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    return float(noise_multiplier) * float(clip) / clients


def adjusted_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """Andrew et al.'s ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the update noise
    multiplier that, together with noise of std ``count_noise`` on the clipped count, costs
    what ``noise_multiplier`` alone would (0 stays 0). Needs ``z < 2 sigma_b``."""
    z, sb = float(noise_multiplier), float(count_noise)
    if z == 0:
        return 0.0
    if not z < 2 * sb:
        raise ValueError(f"adaptive clipping with noise_multiplier={z} needs a clipped-count "
                         f"noise std above z / 2 = {z / 2}, got {sb}")
    return (z ** -2 - (2 * sb) ** -2) ** -0.5


def default_count_noise(clients: float) -> float:
    """The std of the clipped count's noise when unset: m / 20 (Andrew et al., Flower)."""
    return float(clients) / 20.0


def next_clip(clip: float, unclipped_fraction: float, target_quantile: float, lr: float
              ) -> float:
    """The geometric clip update ``S exp(-lr (unclipped_fraction - target_quantile))``
    (Andrew et al.: ``unclipped_fraction`` the noised fraction of clients whose update norm
    was at most S): the clip shrinks while more than ``target_quantile`` of the updates fit
    under it and grows while fewer do, so it tracks that quantile of the update norms."""
    return float(clip) * math.exp(-float(lr) * (float(unclipped_fraction)
                                                - float(target_quantile)))


def noise_generator(seed: int, rnd: int, *words: int) -> torch.Generator:
    """A generator seeded by (``seed``, ``rnd``, :data:`STREAM`, ``words``): the server's per
    round (no words), or a simulated client's (its id as a word; never in a deployment, where
    the server knows the run seed)."""
    state = np.random.SeedSequence([int(seed), int(rnd), STREAM, *map(int, words)])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))


def gaussian_noise(like: State, std: float, generator: torch.Generator) -> State:
    """Independent N(0, std^2) entries shaped like ``like``'s tensors (float64, CPU), drawn in
    ``like``'s key order."""
    return {k: torch.randn(tuple(v.shape), generator=generator, dtype=torch.float64) * std
            for k, v in like.items()}


def _back(values: State, like: State) -> State:
    return {k: v.to(like[k].device, like[k].dtype) for k, v in values.items()}


def privatize_client_update(trained: State, received: State, clip: float,
                            noise_multiplier: float, clients: float,
                            generator: torch.Generator | None = None) -> tuple[State, bool]:
    """Client-side DP-FedAvg: the values a client sends, ``received + clip(trained -
    received) + N(0, (z S / sqrt(m))^2)``, and whether its update was clipped.

    ``trained``: the tensors the client sends (all groups it trained), ``received``: the
    adapters it started from (at least those keys), ``clients``: the nominal m per round
    (:attr:`ClientSideDP.clients`). ``generator`` None: fresh OS entropy, which the server
    cannot reproduce (use a seeded one only in simulations)."""
    if clients <= 0:
        raise ValueError(f"clients must be > 0, got {clients}")
    missing = sorted(trained.keys() - received.keys())
    if missing:
        raise ValueError(f"no received value for the trained tensors {missing[:3]}")
    delta = {k: v.detach().to("cpu", torch.float64) - received[k].detach().to("cpu", torch.float64)
             for k, v in trained.items()}
    clipped, norm = clip_update(delta, clip)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    noise = gaussian_noise(clipped, noise_multiplier * clip / math.sqrt(clients), generator)
    out = {k: received[k].detach().to("cpu", torch.float64) + clipped[k] + noise[k]
           for k in trained}
    return _back(out, trained), norm > clip


@dataclasses.dataclass(frozen=True)
class ClientSideDP:
    """What a client needs for ``privacy.client.side=client``: the clip, z and the nominal
    clients per round m (uniform: m; Poisson: q K)."""

    clip: float
    noise_multiplier: float
    clients: float

    @classmethod
    def from_config(cls, cfg: Config) -> ClientSideDP | None:
        """The client-side settings, or None unless client DP runs on the client side."""
        dp = cfg.privacy.client
        if not dp.enabled or dp.side != CLIENT:
            return None
        assert dp.clip is not None
        return cls(float(dp.clip), float(dp.noise_multiplier),
                   expected_clients(cfg.strategy, cfg.clients))

    def apply(self, trained: State, received: State,
              generator: torch.Generator | None = None) -> tuple[State, bool]:
        """:func:`privatize_client_update` with these settings."""
        return privatize_client_update(trained, received, self.clip, self.noise_multiplier,
                                       self.clients, generator)


# ------------------------------------------------------------------ server state

class ClientDP:
    """Client-level DP's server side: the clip norm (adapted each round when adaptive), the
    round's noise stream, the accountant, and the round's record.

    The strategy calls :meth:`clip_round` once per aggregated round (before any group is
    averaged), :meth:`add_noise` on each group's mean, and :meth:`record` for the round record.

    Parameters
    ----------
    settings
        ``privacy.client``.
    strategy
        ``strategy`` (how clients are sampled: the accountant's q, the expected m).
    num_clients
        K, the clients of the run.
    seed
        The run seed (the noise streams).
    delta
        ``privacy.delta``; None: 1/K.
    """

    def __init__(self, settings: ClientDPConfig, strategy: StrategyConfig, num_clients: int,
                 seed: int, delta: float | None = None) -> None:
        if settings.clip is None:
            raise ValueError("client-level DP needs privacy.client.clip")
        self.settings, self.strategy = settings, strategy
        self.num_clients, self.seed = int(num_clients), int(seed)
        self.delta = default_delta(delta, num_clients)
        self.side = settings.side
        self.clip_norm = float(settings.clip)  # the clip of the next round (adaptive: state)
        self.expected = expected_clients(strategy, num_clients)
        self.count_noise = 0.0
        self.noise_multiplier = float(settings.noise_multiplier)  # z, or z_delta if adaptive
        if settings.adaptive:
            # unset: m / 20, or none without update noise (Flower's defaults)
            self.count_noise = (float(settings.count_noise) if settings.count_noise is not None
                                else default_count_noise(self.expected)
                                if settings.noise_multiplier > 0 else 0.0)
            self.noise_multiplier = adjusted_noise_multiplier(settings.noise_multiplier,
                                                              self.count_noise)
        self.accountant = ClientAccountant()
        self._gen: torch.Generator | None = None
        self._clip = self.clip_norm  # the clip this round's updates were clipped to
        self._record: dict = {}

    @classmethod
    def from_config(cls, cfg: Config) -> ClientDP | None:
        """The run's client-level DP, or None when ``privacy.client.clip`` is unset."""
        if not cfg.privacy.client.enabled:
            return None
        return cls(cfg.privacy.client, cfg.strategy, cfg.clients, cfg.seed, cfg.privacy.delta)

    # -- a round -----------------------------------------------------------------------------

    def clip_round(self, rnd: int, global_state: State, updates: Sequence[ClientUpdate],
                   frozen: Callable[[str], bool] = lambda key: False,
                   available: int | None = None) -> list[ClientUpdate]:
        """Round ``rnd``'s updates, each clipped as one vector over all its trained
        (non-``frozen``) tensors to the current clip norm; adapts the clip (adaptive) and
        composes the round in the accountant (``available``: the clients online, for q).
        Client side: the updates as they are (their clients clipped and noised them)."""
        self._gen = noise_generator(self.seed, rnd)
        self._clip = self.clip_norm
        q = round_sample_rate(self.strategy, self.num_clients, available)
        self._record = {"side": self.side, "clip": self._clip, "clients": len(updates),
                        "noise_std": {}}
        if not updates:
            return []
        if self.side == CLIENT:
            counts = [sum(k in u.tensors for u in updates) for k in global_state
                      if not frozen(k)]
            smallest = min((c for c in counts if c), default=len(updates))
            z = self.noise_multiplier * math.sqrt(smallest / self.expected)
            self.accountant.step(q, z)
            self._record.update(noise_multiplier=z, **self._privacy())
            return list(updates)
        out, norms = [], []
        for u in updates:
            keys = [k for k in u.tensors if k in global_state and not frozen(k)]
            delta = {k: u.tensors[k].detach().to("cpu", torch.float64)
                     - global_state[k].detach().to("cpu", torch.float64) for k in keys}
            clipped, norm = clip_update(delta, self._clip)
            norms.append(norm)
            values = {k: global_state[k].detach().to("cpu", torch.float64) + clipped[k]
                      for k in keys}
            out.append(dataclasses.replace(u, tensors={**u.tensors,
                                                       **_back(values, u.tensors)}))
        below = sum(n <= self._clip for n in norms)  # Andrew et al.'s bits: not clipped
        self._record["clipped_fraction"] = 1 - below / len(updates)
        if self.settings.adaptive:
            noised = below + self.count_noise * float(torch.randn((), generator=self._gen,
                                                                  dtype=torch.float64))
            self.clip_norm = next_clip(self._clip, noised / len(updates),
                                       self.settings.target_quantile, self.settings.clip_lr)
            self._record.update(unclipped_fraction_noised=noised / len(updates),
                                next_clip=self.clip_norm)
        self.accountant.step(q, self.noise_multiplier)
        self._record.update(noise_multiplier=self.noise_multiplier, **self._privacy())
        return out

    def add_noise(self, group: str, avg: State, clients: int) -> State:
        """A group's mean of ``clients`` clipped updates plus N(0, (z S / m)^2) per entry
        (server side; client side: as it is, its clients added the noise)."""
        if self._gen is None:
            raise RuntimeError("ClientDP.clip_round must run before add_noise in a round")
        if self.side == CLIENT:
            # each of the clients added std z S / sqrt(m): their mean has z S / sqrt(m c)
            std = self.settings.noise_multiplier * self._clip / math.sqrt(self.expected * clients)
            self._record["noise_std"][group] = std
            return avg
        std = noise_std(self.noise_multiplier, self._clip, clients)
        self._record["noise_std"][group] = std
        if std == 0:
            return avg
        noise = gaussian_noise(avg, std, self._gen)
        return _back({k: v.detach().to("cpu", torch.float64) + noise[k]
                      for k, v in avg.items()}, avg)

    def _privacy(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.delta}

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` over the rounds aggregated so far."""
        return self.accountant.epsilon(self.delta)

    def record(self) -> dict:
        """The last aggregated round's entries (then cleared): clip, clipped fraction, noise
        std per group, the noise multiplier composed, epsilon and delta so far."""
        out, self._record = self._record, {}
        return out

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"clip": self.clip_norm, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.clip_norm = float(d["clip"])
        self.accountant.load_state_dict(d.get("accountant", {}))


# ------------------------------------------------------------------ pipeline stage

class ClientNoise(Stage):
    """The update pipeline's stage of ``privacy.client.side=client``: the client clips its
    update to the clip norm and adds its share of the noise before anything is encoded. The
    noise is seeded by (seed, round, client) in the local runtime, a simulation whose runs must
    repeat; under FLARE it is the operating system's randomness, which the server cannot
    regenerate (it knows the run seed)."""

    name = "client_dp"

    def __init__(self, dp: ClientSideDP, seed: int | None) -> None:
        self.dp, self.seed = dp, seed

    @classmethod
    def from_config(cls, cfg: Config) -> ClientNoise | None:
        dp = ClientSideDP.from_config(cfg)
        if dp is None:
            return None
        return cls(dp, cfg.seed if cfg.runtime == "local" else None)

    def client(self, up: Upload) -> None:
        gen = None if self.seed is None else noise_generator(self.seed, up.round, up.client_id)
        up.tensors, _ = self.dp.apply(up.tensors, up.reference, gen)

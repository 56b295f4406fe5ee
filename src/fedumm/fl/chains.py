"""Sequential training inside a round: FedSeq's superclients.

Zaccone et al., "Speeding up Heterogeneous Federated Learning with Sequentially Trained
Superclients" (ICPR 2022, arXiv:2201.10899): a round's clients are grouped into chains
(superclients) of ``strategy.chain`` clients; inside a chain the first client trains from the
global adapters, each next one from the adapters the previous one sent back, and the last
one's adapters are the chain's update, which the strategy aggregates with the other chains'
as if the chain were one client holding all its members' samples.

Why: under FedAvg the mean of K clients' updates moves the model about as far as one of them,
so a round is worth one client's local steps however many clients train. A chain of c clients
is worth c clients' steps on c clients' data, at the same compute (every client still runs its
own local epochs once per round); the price is wall-clock time (a round waits for c
trainings one after another) and that each member sees the previous member's adapters, which
the server relays. With pathological label skew a chain also covers more labels than one
client (FedSeq groups clients so that each chain's label mixture is close to uniform; here
the chains are drawn at random each round, seeded, so no client reveals its label counts).

The round loop (:mod:`fedumm.runtime.loop`) trains chains hop by hop: hop h sends each
chain's current adapters to its h-th member. A member that drops out, is late or is rejected
is passed over: the next member starts from the adapters before it. A member's client hooks
see what it was sent as its start: FedProx's proximal term pulls it toward the previous
member's adapters, not the round's global ones.
"""

from __future__ import annotations

import numpy as np

from fedumm.fl.updates import ClientUpdate

# seed word of the chain draw, apart from sampling's, the faults' and the trainer's
_STREAM = 0xC4A1


def draw_chains(selected: list[int], length: int, seed: int, rnd: int) -> list[list[int]]:
    """Round ``rnd``'s chains: ``selected`` shuffled (seeded by seed and round alone) and cut
    into chains of ``length`` clients (the last one shorter when it does not divide)."""
    if length <= 1:
        return [[k] for k in selected]
    rng = np.random.default_rng([seed, rnd, _STREAM])
    order = [selected[i] for i in rng.permutation(len(selected))]
    return [order[i:i + length] for i in range(0, len(order), length)]


def hops(chains: list[list[int]]) -> list[list[tuple[int, int]]]:
    """The chains as hops: hop h lists (chain index, client) of every chain's h-th member."""
    depth = max((len(c) for c in chains), default=0)
    return [[(i, c[h]) for i, c in enumerate(chains) if h < len(c)] for h in range(depth)]


def merge_chain(members: list[ClientUpdate]) -> ClientUpdate:
    """One chain's update for the strategy: its last member's adapters for every group a member
    trained (a group only an earlier member trained keeps that member's values), the members'
    samples and steps summed, each group's quality the sample-weighted mean of its members',
    bytes summed. The chain goes by its first member's id."""
    tensors: dict = {}
    samples: dict[str, int] = {}
    quality_sum: dict[str, float] = {}
    for u in members:
        tensors.update(u.tensors)
        for m, n in u.num_samples.items():
            samples[m] = samples.get(m, 0) + n
            if m in u.quality:
                quality_sum[m] = quality_sum.get(m, 0.0) + n * u.quality[m]
    quality = {m: q / samples[m] for m, q in quality_sum.items() if samples.get(m)}
    return ClientUpdate(members[0].client_id, tensors, samples, quality,
                        sum(u.num_steps for u in members), dict(members[-1].metrics),
                        upload_bytes=sum(u.upload_bytes for u in members))

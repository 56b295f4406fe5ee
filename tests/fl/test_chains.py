"""Chains of clients (FedSeq's superclients): the draw, a chain's one update, the config's
refusals."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import ConfigError, config_from_dict
from fedumm.fl.chains import draw_chains, hops, merge_chain
from fedumm.fl.updates import ClientUpdate


def test_chains_split_the_round_into_a_seeded_shuffle_of_that_length():
    sel = [3, 5, 8, 9, 11, 12, 20]
    a = draw_chains(sel, 3, seed=1, rnd=4)
    assert [len(c) for c in a] == [3, 3, 1]
    assert sorted(k for c in a for k in c) == sel  # every client once
    assert a == draw_chains(sel, 3, seed=1, rnd=4)  # a function of seed and round
    draws = {tuple(map(tuple, draw_chains(sel, 3, seed=1, rnd=r))) for r in range(6)}
    assert len(draws) > 1  # redrawn every round
    assert draw_chains(sel, 1, seed=1, rnd=4) == [[k] for k in sel]  # off: one client each


def test_hops_take_every_chains_next_member_in_turn():
    assert hops([[4, 1, 7], [2, 9], [5]]) == [[(0, 4), (1, 2), (2, 5)], [(0, 1), (1, 9)],
                                              [(0, 7)]]
    assert hops([[0], [1]]) == [[(0, 0), (1, 1)]]


def test_a_chain_sends_its_last_adapters_with_its_members_samples_summed():
    t = {k: torch.full((2,), v) for k, v in (("u", 1.0), ("g", 2.0))}
    first = ClientUpdate(6, dict(t), {"understanding": 10, "generation": 30},
                         {"understanding": 0.5, "generation": 0.2}, num_steps=4,
                         metrics={"und_loss": 9.0}, upload_bytes=100)
    # the second member trained understanding only (it holds no generation samples)
    second = ClientUpdate(2, {"u": torch.full((2,), 3.0)}, {"understanding": 30},
                          {"understanding": 0.9}, num_steps=5, metrics={"und_loss": 1.0},
                          upload_bytes=60)
    chain = merge_chain([first, second])
    assert chain.client_id == 6  # by its first member
    assert torch.equal(chain.tensors["u"], torch.full((2,), 3.0))  # the last to train it
    assert torch.equal(chain.tensors["g"], torch.full((2,), 2.0))  # only the first trained it
    assert chain.num_samples == {"understanding": 40, "generation": 30}
    assert chain.quality == pytest.approx({"understanding": (10 * 0.5 + 30 * 0.9) / 40,
                                           "generation": 0.2})
    assert (chain.num_steps, chain.upload_bytes, chain.metrics) == (9, 160, {"und_loss": 1.0})


@pytest.mark.parametrize("overrides, match", [
    (["strategy.name=scaffold"], "control variate per client"),
    (["strategy.name=fedexp"], "update norms"),
    (["strategy.robust=median", "clients=4"], "strategy.robust"),
    (["secagg.enabled=true"], "secagg.enabled"),
    (["privacy.client.clip=1.0", "privacy.client.noise_multiplier=0.5"],
     "privacy.client.clip"),
    (["lora.client_ranks=[4,8]"], "lora.client_ranks"),
    (["codec.download=int8"], "lossless download"),
])
def test_config_refuses_what_needs_each_clients_own_update(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, ["clients=2", "strategy.chain=2", *overrides])

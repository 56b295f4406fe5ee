"""SecAgg+ (fedumm.fl.secure_sum) and the secure weighted mean (fedumm.fl.secagg): exact integer
sums under dropouts, hand-computed quantisation bounds, uniform masked vectors, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedumm.config import ConfigError, SecAggConfig, StrategyConfig, load_config
from fedumm.fl.secagg import (
    Quantizer,
    round_groups,
    run_secure_sum,
    secure_weighted_mean,
)
from fedumm.fl.secure_sum import (
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    UnmaskRequest,
    neighbour_graph,
)
from fedumm.fl.strategies import FedAvg
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.protocol import IMAGE_INPUTS
from fedumm.models.reference import REFERENCE_GROUPS as REF

V = "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
L = "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"
G = "base_model.model.gen_head.lora_A.weight"
M32 = 2**32


def vectors(ids: list[int], length: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Full-range uint32 inputs, so the sum wraps around the modulus."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, M32, length, dtype=np.uint64).astype(np.uint32) for k in ids}


def plain_sum(vecs: dict[int, np.ndarray], ids) -> np.ndarray:
    return (sum(vecs[k].astype(np.uint64) for k in ids) % M32).astype(np.uint32)


# -- the protocol over integers ---------------------------------------------------------------

@pytest.mark.parametrize("n,k,t,drops", [
    (5, 0, 3, {}),
    # n - t = 3 clients drop, one at each stage
    (6, 0, 3, {"dropped_before_shares": {0}, "dropped_before_input": {1},
               "dropped_after_input": {2}}),
    (6, 0, 3, {"dropped_before_input": {4, 5}, "dropped_after_input": {0}}),
    (6, 0, 3, {"dropped_after_input": {1, 3, 5}}),
    # a sparse graph: 8 clients, 4 neighbours each (5 share holders)
    (8, 4, 3, {"dropped_before_input": {2}, "dropped_after_input": {6}}),
])
def test_secure_sum_is_the_exact_sum_of_the_inputs_that_arrived(n, k, t, drops) -> None:
    ids = list(range(10, 10 + n))
    drops = {key: {ids[i] for i in v} for key, v in drops.items()}
    vecs = vectors(ids, 257)
    res = run_secure_sum(3, ids, vecs.__getitem__, 257, neighbour_graph(ids, k, 0, 3), t,
                         **drops)
    arrived = set(ids) - drops.get("dropped_before_shares", set()) \
        - drops.get("dropped_before_input", set())
    assert res.inputs == arrived
    assert np.array_equal(res.total, plain_sum(vecs, arrived))
    assert set(res.traffic) == {"advertise_keys", "share_keys", "masked_input", "unmask"}
    assert res.traffic["masked_input"][0] == len(arrived) * (4 + 257 * 4)


@pytest.mark.parametrize("drops,stage", [
    ({"dropped_after_input": {0, 1, 2}}, "unmask"),
    ({"dropped_before_input": {0, 1, 2}}, "masked_input"),
    ({"dropped_before_shares": {0, 1, 2}}, "share_keys"),
])
def test_fewer_than_threshold_survivors_abort(drops, stage) -> None:
    ids = list(range(5))
    vecs = vectors(ids, 8)
    with pytest.raises(SecAggAbort, match=f"at {stage}: 2 clients left, fewer than the "
                                          "threshold 3"):
        run_secure_sum(0, ids, vecs.__getitem__, 8, neighbour_graph(ids, 0, 0, 0), 3,
                       **drops)


def test_a_neighbourhood_without_enough_holders_aborts() -> None:
    ids = list(range(8))
    graph = neighbour_graph(ids, 2, 0, 0)  # a ring: each client has 2 neighbours
    u = ids[0]
    vecs = vectors(ids, 8)
    # u sends its input, then u and both its neighbours leave: its b_u cannot be rebuilt
    with pytest.raises(SecAggAbort, match=f"shares of client {u}'s b came back"):
        run_secure_sum(0, ids, vecs.__getitem__, 8, graph, 2,
                       dropped_after_input={u, *graph[u]})


def test_neighbour_graph_is_regular_symmetric_and_seeded() -> None:
    ids = list(range(20))
    g = neighbour_graph(ids, 3, seed=1, rnd=2)  # k rounded up to 4
    assert all(len(vs) == 4 and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == neighbour_graph(ids, 3, seed=1, rnd=2)
    assert g != neighbour_graph(ids, 3, seed=1, rnd=3)
    assert neighbour_graph(ids[:5], 4, 0, 0) == {u: tuple(v for v in ids[:5] if v != u)
                                                 for u in ids[:5]}


def seeded(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def masked_round(n: int, length: int, x: np.ndarray) -> tuple[SecAggServer, dict]:
    """Stages 1-3 with seeded key material; every client's input is ``x``."""
    ids = list(range(n))
    graph = neighbour_graph(ids, 0, 0, 0)
    server = SecAggServer(0, graph, 2, length)
    parties = {k: SecAggClient(k, 0, graph[k], 2, entropy=seeded(k)) for k in ids}
    routed = server.receive_keys([p.advertise_keys() for p in parties.values()])
    inbox = server.receive_shares([parties[k].share_keys(routed[k]) for k in ids])
    server.receive_masked([parties[k].masked_input(x, inbox[k]) for k in ids])
    return server, parties


def test_one_masked_vector_is_uniform() -> None:
    length = 1 << 16
    x = np.full(length, 12345, dtype=np.uint32)  # a constant input
    server, _ = masked_round(3, length, x)
    y = server._masked[0]
    # chi-square over the top byte: 256 bins of 256 expected entries each
    counts = np.bincount(y >> 24, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(y / M32, "uniform").pvalue > 1e-3


def test_the_server_never_holds_an_unmasked_input() -> None:
    length = 4096
    x = vectors([0], length, seed=7)[0]
    server, _ = masked_round(4, length, x)
    for k, y in server._masked.items():
        # an entry survives a uniform mask with probability 2^-32
        assert np.count_nonzero(y == x) <= 1, k
        # nor is any one client's mask undone by another's masked vector
        for j, z in server._masked.items():
            if j != k:
                assert np.count_nonzero(y - z == 0) <= 1
    held = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    assert not any(np.array_equal(v, x) for v in held)


def test_a_client_never_reveals_both_secrets_of_one_client() -> None:
    _, parties = masked_round(3, 16, np.zeros(16, dtype=np.uint32))
    with pytest.raises(SecAggAbort, match="both secrets of clients \\[1\\]"):
        parties[0].unmask(UnmaskRequest(frozenset({0, 1, 2}), frozenset({1})))


def test_a_tampered_share_does_not_authenticate() -> None:
    ids = [0, 1, 2]
    graph = neighbour_graph(ids, 0, 0, 0)
    server = SecAggServer(0, graph, 2, 4)
    parties = {k: SecAggClient(k, 0, graph[k], 2) for k in ids}
    routed = server.receive_keys([p.advertise_keys() for p in parties.values()])
    inbox = server.receive_shares([parties[k].share_keys(routed[k]) for k in ids])
    blob = bytearray(inbox[0][1])
    blob[-1] ^= 1
    with pytest.raises(SecAggAbort, match="from client 1 does not authenticate"):
        parties[0].masked_input(np.zeros(4, np.uint32), {**inbox[0], 1: bytes(blob)})


# -- quantisation ------------------------------------------------------------------------------

def test_quantizer_by_hand() -> None:
    q = Quantizer(clip_range=8.0, steps=2**22)
    codes, clipped = q.quantize(np.array([-8.0, 0.0, 8.0, 100.0, -1e9, 2**-19]))
    # D = 16 / 2^22 = 2^-18; 0 -> 2^21; 2^-19 = D / 2 rounds half to even (2^21)
    assert codes.tolist() == [0, 2**21, 2**22, 2**22, 0, 2**21]
    assert clipped == 2
    assert q.dequantize_sum(np.array([3 * 2**21 + 1], np.uint32), 3).tolist() == [2**-18]
    q.check(1023)
    with pytest.raises(ValueError, match="sum of 1024 clients.*at most 4194303"):
        q.check(1024)
    with pytest.raises(ValueError, match="even"):
        Quantizer(steps=1001)
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(np.array([np.nan]))


def test_unmasked_sum_equals_the_plain_quantised_sum() -> None:
    ids = list(range(6))
    q = Quantizer()
    rng = np.random.default_rng(1)
    floats = {k: rng.normal(0, 3, 1000) for k in ids}  # some beyond the clip range
    codes = {k: q.quantize(floats[k])[0] for k in ids}
    res = run_secure_sum(0, ids, codes.__getitem__, 1000, neighbour_graph(ids, 0, 0, 0), 4,
                         dropped_before_input={5})
    exact = sum(codes[k].astype(np.int64) for k in range(5))  # integers, no wrap
    assert np.array_equal(res.total.astype(np.int64), exact)


# -- the weighted mean -------------------------------------------------------------------------

def update(cid: int, tensors: dict, und: int = 0, gen: int = 0) -> ClientUpdate:
    return ClientUpdate(cid, tensors, {UNDERSTANDING: und, GENERATION: gen, IMAGE_INPUTS: und})


def round_of(n: int, seed: int = 0, size: int = 50):
    """A global state of three groups and n clients: even ids understand, odd generate."""
    gen = torch.Generator().manual_seed(seed)
    ref = {k: torch.randn(size, generator=gen) for k in (V, L, G)}
    ups = []
    for c in range(n):
        keys = (V, L) if c % 2 == 0 else (L, G)
        ups.append(update(c, {k: ref[k] + 0.2 * torch.randn(size, generator=gen)
                              for k in keys}, und=(c + 1) * 10 * (c % 2 == 0),
                          gen=(c + 2) * 7 * (c % 2)))
    return ref, ups


@pytest.mark.parametrize("drops", [{}, {"dropped_before_input": {1}, "dropped_after_input": {2}},
                                   {"dropped_before_shares": {4}, "dropped_after_input": {0}}])
def test_secure_mean_is_the_weighted_mean_within_the_quantisation_step(drops) -> None:
    n, clip, steps = 6, 2.0, 2**12  # a coarse step, D = 4 / 4096, to see the bound bite
    ref, ups = round_of(n)
    strategy = FedAvg(StrategyConfig(), n, 0, groups=REF)
    groups, weights = round_groups(strategy, ref, ups)
    cfg = SecAggConfig(enabled=True, threshold=3, clip_range=clip, quantization_range=steps)
    mean, record = secure_weighted_mean(4, ups, ref, groups, weights, cfg, seed=0, **drops)
    counted = [u for u in ups if u.client_id not in drops.get("dropped_before_input", set())
               | drops.get("dropped_before_shares", set())]
    assert record["inputs"] == len(counted) and record["clipped"] == 0
    plain = strategy.aggregate(4, ref, counted)  # the oracle: the strategy's own mean
    after = strategy.aggregate(4, ref, [mean])  # what the loop does with the secure mean
    step = 2 * clip / steps
    for g, keys in groups.items():
        pos = [w for w in weights[g] if w > 0]
        wbar = sum(pos) / len(pos)
        mass = sum(w / wbar for u, w in zip(ups, weights[g], strict=True) if u in counted)
        bound = len(counted) * step / 2 / mass + 1e-9  # module docstring's bound
        for k in keys:
            err = float((after[k] - plain[k]).abs().max())
            assert err <= bound, (k, err, bound)
            assert err > 0.0  # the values were quantised, not passed through
    assert mean.num_samples[UNDERSTANDING] == sum(u.num_samples[UNDERSTANDING] for u in counted)
    assert set(record["bytes"]) == {"advertise_keys", "share_keys", "masked_input", "unmask"}
    assert record["length"] == 150 and mean.upload_bytes > 150 * 4 * len(counted)


def test_secure_mean_skips_a_group_no_counted_client_trained() -> None:
    ref, ups = round_of(4)
    strategy = FedAvg(StrategyConfig(), 4, 0, groups=REF)
    groups, weights = round_groups(strategy, ref, ups)
    cfg = SecAggConfig(enabled=True, threshold=2)
    # both generation clients (1, 3) drop before input: nobody counted trained the gen head
    mean, _ = secure_weighted_mean(0, ups, ref, groups, weights, cfg, seed=0,
                                   dropped_before_input={1, 3})
    assert G not in mean.tensors and V in mean.tensors
    assert mean.num_samples[GENERATION] == 0


def test_secure_mean_refuses_too_many_clients_for_the_modulus() -> None:
    ref, ups = round_of(3)
    groups, weights = round_groups(FedAvg(StrategyConfig(), 3, 0, groups=REF), ref, ups)
    cfg = SecAggConfig(enabled=True, quantization_range=2**31)
    with pytest.raises(ValueError, match="must fit in 32 bits"):
        secure_weighted_mean(0, ups, ref, groups, weights, cfg, seed=0)
    with pytest.raises(ValueError, match="one weight per update"):
        secure_weighted_mean(0, ups, ref, groups, {**weights, "vision": [1.0]},
                             SecAggConfig(enabled=True), seed=0)


# -- config ------------------------------------------------------------------------------------

ON = "secagg.enabled=true"


@pytest.mark.parametrize("overrides,match", [
    (["codec.upload=int8"], "codec.upload=int8.*codec.upload=float32"),
    (["lora.aggregation=exact"], "lora.aggregation=exact"),
    (["lora.client_ranks=[4,8]"], "lora.client_ranks"),
    (["strategy.robust=median"], "strategy.robust=median"),
    (["strategy.name=fedumm"], "strategy.name=fedumm.*held-out quality"),
    (["strategy.name=scaffold"], "strategy.name=scaffold"),
    (["strategy.name=fedexp"], "strategy.name=fedexp"),
    (["strategy.name=local"], "strategy.name=local"),
    (["clients=4", "secagg.threshold=5"], "5 shares.*among 4 clients"),
    (["clients=10", "strategy.clients_per_round=3", "secagg.threshold=4"], "among 3 clients"),
    (["clients=10", "secagg.neighbours=2", "secagg.threshold=4"], "among 3 clients"),
    (["secagg.threshold=2.5"], "whole number"),
    (["clients=1100"], "fit in 32 bits"),
    (["secagg.quantization_range=1001"], "even number"),
])
def test_config_refuses_what_secagg_cannot_serve(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [ON, *overrides])
    load_config(None, overrides)  # each is fine without secure aggregation


@pytest.mark.parametrize("overrides", [[], ["strategy.name=fedadam"], ["strategy.name=fedprox"],
                                       ["codec.download=int8"], ["lora.aggregation=ffa"],
                                       ["clients=8", "secagg.threshold=8"],
                                       ["runtime=flare-sim"]])
def test_config_accepts_what_secagg_serves(overrides) -> None:
    assert load_config(None, [ON, *overrides]).secagg.enabled

"""Runs with chains of clients (``strategy.chain``): each member starts from the adapters the
previous one trained, the strategy averages the chains' last adapters weighted by all their
members' samples, a member that drops out is passed over, and a resumed run equals an
uninterrupted one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fedumm.config import config_from_dict
from fedumm.fl.chains import draw_chains
from fedumm.fl.client import ClientTrainer
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.faults import drops_out
from fedumm.runtime.local import LocalRuntime
from makers import killed_at_training_call, round_records, run_adapters


@contextlib.contextmanager
def trainings():
    """Every client training inside the block: (client, what it started from, its update)."""
    real, seen = ClientTrainer.train, []

    def train(self, client, global_state, rnd, *args, **kwargs):
        start = {k: v.detach().clone() for k, v in global_state.items()}
        update, state = real(self, client, global_state, rnd, *args, **kwargs)
        seen.append((client.client_id, start, update))
        return update, state

    ClientTrainer.train = train
    try:
        yield seen
    finally:
        ClientTrainer.train = real


def _run(tmp_path, overrides):
    cfg = config_from_dict({"name": "c"}, overrides)
    rt = LocalRuntime(cfg, tmp_path / "run", progress=False)
    rt.dir.create(cfg)
    initial = {k: v.clone() for k, v in rt.loop.server.states[0].items()}
    with trainings() as seen:
        rt.run()
    return cfg, rt, seen, initial


def test_each_member_starts_from_the_previous_ones_adapters_and_the_chains_are_averaged(
        tmp_path, tiny_overrides):
    cfg, rt, seen, initial = _run(tmp_path, [*tiny_overrides, "clients=4", "strategy.chain=2",
                                    "rounds=1", "eval.base=false"])
    chains = draw_chains([0, 1, 2, 3], 2, cfg.seed, 0)
    (rec,) = round_records(tmp_path / "run")
    assert rec["chains"] == chains
    by_client = {k: (start, upd) for k, start, upd in seen}
    assert [k for k, *_ in seen] == [c[0] for c in chains] + [c[1] for c in chains]  # hops
    for a, b in chains:
        start_a, upd_a = by_client[a]
        start_b, _ = by_client[b]
        assert all(torch.equal(start_a[k], initial[k]) for k in initial)  # the global's
        for k in start_b:  # b starts where a ended (what a did not train: the global's)
            want = upd_a.tensors.get(k, initial[k])
            assert torch.allclose(start_b[k], want, atol=0, rtol=0), k
    strategy = rt.loop.server.strategy
    final = rt.loop.server.states[0]
    groups = strategy.group_members(initial, [u for *_, u in seen])
    for group, (keys, _) in groups.items():
        # each chain: its last member's adapters, weighted by every member's samples
        weights = [sum(strategy.client_weight(by_client[k][1], group) for k in c)
                   for c in chains]
        lasts = [by_client[c[1]][1].tensors for c in chains]
        for key in keys:
            want = sum(w * t[key] for w, t in zip(weights, lasts, strict=True)) / sum(weights)
            assert torch.allclose(final[key], want, atol=1e-6), key
    assert rec["steps"] == sum(u.num_steps for *_, u in seen)
    assert sorted(int(k) for k in rec["num_samples"]) == [0, 1, 2, 3]


def test_a_member_that_drops_out_is_passed_over(tmp_path, tiny_overrides):
    p = 0.5
    # a seed whose round-0 chain loses its first member and keeps its second
    seed = next(s for s in range(500) if drops_out(s, 0, draw_chains([0, 1], 2, s, 0)[0][0], p)
                and not drops_out(s, 0, draw_chains([0, 1], 2, s, 0)[0][1], p))
    (first, second), = draw_chains([0, 1], 2, seed, 0)
    _, rt, seen, initial = _run(tmp_path, [*tiny_overrides, f"seed={seed}", "strategy.chain=2",
                                  "rounds=1", "eval.base=false", f"faults.dropout={p}"])
    (rec,) = round_records(tmp_path / "run")
    assert rec["dropped"] == [first] and rec["outcome"] == "aggregated"
    ((k, start, upd),) = seen
    assert k == second
    assert all(torch.equal(start[n], initial[n]) for n in start)  # from the global adapters
    final = rt.loop.server.states[0]
    assert all(torch.allclose(final[n], upd.tensors[n], atol=1e-6) for n in upd.tensors)


def test_a_chained_run_resumed_after_a_kill_mid_chain_equals_an_uninterrupted_one(
        tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "clients=4", "strategy.chain=2", "rounds=2",
                 "eval.base=false"]
    run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "full",
                   progress=False)
    with killed_at_training_call(4 + 3), pytest.raises(KeyboardInterrupt):  # round 1, hop 1
        run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "cut",
                       progress=False)
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    a, b = run_adapters(tmp_path / "full"), run_adapters(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["chains"] for r in round_records(tmp_path / "full")] == \
        [r["chains"] for r in round_records(tmp_path / "cut")]


def test_chains_of_one_are_the_plain_round(tmp_path, tiny_overrides):
    base = [*tiny_overrides, "eval.base=false"]
    run_experiment(config_from_dict({"name": "p"}, base), tmp_path / "plain", progress=False)
    run_experiment(config_from_dict({"name": "p"}, [*base, "strategy.chain=1"]),
                   tmp_path / "one", progress=False)
    a, b = run_adapters(tmp_path / "plain"), run_adapters(tmp_path / "one")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "chains" not in round_records(tmp_path / "one")[0]


def test_the_baselines_ignore_chains(tmp_path, tiny_overrides):
    # one config serves a chained federated run and its centralized / local baselines
    for name in ("centralized", "local"):
        base = [*tiny_overrides, f"strategy.name={name}", "clients=4", "eval.base=false"]
        run_experiment(config_from_dict({"name": "b"}, base), tmp_path / name,
                       progress=False)
        run_experiment(config_from_dict({"name": "b"}, [*base, "strategy.chain=4"]),
                       tmp_path / f"{name}_chained", progress=False)
        rec = round_records(tmp_path / f"{name}_chained")[0]
        assert "chains" not in rec
        a, b = run_adapters(tmp_path / name), run_adapters(tmp_path / f"{name}_chained")
        assert all(torch.equal(a[k], b[k]) for k in a), name

"""Client state on disk: exact round trips, checkpoint-consistent commits, selected clients only,
and a SCAFFOLD run of 10,000 clients resumed after a kill equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.runtime import client_store
from fedumm.runtime.client_store import ClientStore, load_state, save_state
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory
from makers import killed_at_training_call


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def test_a_client_state_round_trips_exactly(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3, 2)
    opt.step()
    state = {"optimizer": opt.state_dict(),  # int keys, tuples, 0-dim tensors, None, bools
             "control": {"a.lora_A": torch.randn(4, 2, dtype=torch.bfloat16)},
             "download": {"round": 3, "state": {"w": torch.arange(6).view(2, 3)[:, 1:]}},
             "same": [p.data, p.data], "x": 1.5}
    save_state(tmp_path / "0.safetensors", state)
    back = load_state(tmp_path / "0.safetensors")
    assert _equal(state["control"], back["control"]) and _equal(state["download"],
                                                                back["download"])
    assert _equal(state["optimizer"], back["optimizer"]) and _equal(state["same"], back["same"])
    q = torch.nn.Parameter(p.detach().clone())
    again = torch.optim.AdamW([q], lr=0.1)
    again.load_state_dict(back["optimizer"])  # what the trainer does with it
    with pytest.raises(TypeError, match="client state holds a set"):
        save_state(tmp_path / "1.safetensors", {"x": {1, 2}})


@pytest.mark.parametrize("on_disk", [True, False])
def test_a_round_is_visible_once_checkpointed_and_dropped_if_it_never_was(tmp_path, on_disk):
    store = ClientStore(tmp_path / "cs" if on_disk else None)
    store.begin(0)
    store.put(0, 7, {"c": torch.ones(2)})
    assert store.get(7) is None  # round 0 is not checkpointed yet
    ckpt = store.state_dict()  # the checkpoint of round 0
    store.begin(1)
    assert torch.equal(store.get(7)["c"], torch.ones(2))
    store.put(1, 7, {"c": torch.zeros(2)})  # round 1 ... killed before its checkpoint
    resumed = ClientStore(tmp_path / "cs" if on_disk else None)
    resumed.load_state_dict(ckpt)
    assert torch.equal(resumed.get(7)["c"], torch.ones(2))
    resumed.begin(1)
    resumed.put(1, 7, {"c": torch.full((2,), 2.0)})
    after = resumed.state_dict()  # checkpoint of round 1 written; killed before the commit
    again = ClientStore(tmp_path / "cs" if on_disk else None)
    again.load_state_dict(after)
    assert torch.equal(again.get(7)["c"], torch.full((2,), 2.0))


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_rounds_later_hops_keep_what_its_earlier_hops_staged(tmp_path, on_disk):
    store = ClientStore(tmp_path / "cs" if on_disk else None)
    for rnd in (0, 1):  # round 0 would clear, round 1 would drop, a first begin
        store.begin(rnd)
        store.put(rnd, 3, {"c": torch.full((1,), float(rnd))})  # hop 0 of a chain
        store.begin(rnd)  # hop 1 of the same round
        store.put(rnd, 4, {"c": torch.full((1,), 10.0 + rnd)})
    store.finish()
    assert [float(store.get(k)["c"]) for k in (3, 4)] == [1.0, 11.0]


def test_no_state_no_file(tmp_path):
    store = ClientStore(tmp_path / "cs")
    store.begin(0)
    store.put(0, 1, {})
    store.finish()
    assert store.disk_bytes() == 0


K10K = ["clients=10000", "data.train_scenes=2500", "partition.method=iid",
        "partition.min_per_client=1", "train.val_fraction=0", "strategy.name=scaffold",
        "strategy.clients_per_round=3", "train.max_steps=1", "rounds=3", "eval.every=0",
        "eval.base=false", "eval.max_vqa=4", "eval.max_gen=0"]


def test_scaffold_at_10000_clients_resumes_after_a_kill_as_if_uninterrupted(
        tmp_path, tiny_overrides, monkeypatch):
    overrides = [*tiny_overrides, *K10K]
    # two of the three rounds' draws share a client, so its control variate is read back
    reads = {"n": 0}
    real = client_store.load_state

    def counted(path):
        reads["n"] += 1
        return real(path)

    monkeypatch.setattr(client_store, "load_state", counted)
    run_experiment(config_from_dict({"name": "s"}, overrides), tmp_path / "full", progress=False)
    assert reads["n"] <= 3 * 3  # the selected clients' files only, never the population's
    picked = {c for m in RunDirectory(tmp_path / "full").metrics() if m["type"] == "round"
              for c in m["clients"]}
    stored = {int(f.stem) for f in (tmp_path / "full" / "client_state" / "committed").iterdir()}
    assert stored == picked and len(picked) <= 9

    # killed mid round 1 (its 2nd client), then again between round 1's client-state writes
    # and its checkpoint: both resumes continue as if nothing happened
    with killed_at_training_call(5), pytest.raises(KeyboardInterrupt):
        run_experiment(config_from_dict({"name": "s"}, overrides), tmp_path / "cut",
                       progress=False)
    real_save = RunDirectory.save_checkpoint

    def dies_at_round_1(self, state):
        if state["round"] == 1:
            raise KeyboardInterrupt("killed before the checkpoint")
        return real_save(self, state)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", dies_at_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    assert list((tmp_path / "cut" / "client_state" / "staging").iterdir())  # round 1's writes
    monkeypatch.setattr(RunDirectory, "save_checkpoint", real_save)
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)

    def adapters(run):
        return load_file(str(run / "adapters" / "adapter_model.safetensors"))

    a, b = adapters(tmp_path / "full"), adapters(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in (tmp_path / "full" / "client_state" / "committed").iterdir():
        assert _equal(load_state(f), load_state(tmp_path / "cut" / "client_state" /
                                                "committed" / f.name))


def test_a_round_records_who_was_online_sampled_and_trained(tmp_path, tiny_overrides):
    from fedumm.config import StrategyConfig
    from fedumm.fl.sampling import draw

    base = [*tiny_overrides, "clients=4", "rounds=4", "strategy.availability=0.5",
            "strategy.min_clients=2", "strategy.clients_per_round=2", "eval.every=0"]
    cfg = StrategyConfig(availability=0.5, min_clients=2, clients_per_round=2)
    seed = next(s for s in range(100)  # a seed whose rounds both skip and train
                if len({bool(draw(cfg, 4, s, r).skipped) for r in range(4)}) == 2
                and not draw(cfg, 4, s, 0).skipped)
    run_experiment(config_from_dict({"name": "a"}, [*base, f"seed={seed}"]), tmp_path / "a",
                   progress=False)
    rounds = [m for m in RunDirectory(tmp_path / "a").metrics() if m["type"] == "round"]
    assert len(rounds) == 4
    for m in rounds:
        d = draw(cfg, 4, seed, m["round"])
        seen = m["participation"]
        assert seen["available"] == d.available and m["clients"] == d.clients
        assert seen["trained"] == len(d.clients)
        assert ("skipped" in seen) == bool(d.skipped)
    json.dumps(rounds)  # the records stay plain JSON

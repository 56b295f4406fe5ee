"""Simulated attacks (attack.*): the malicious set, what each attack does to exactly the
malicious clients' uploads (against the same upload without the attack), and a micro
federated run under attack with a robust rule."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import ConfigError, config_from_dict
from fedumm.fl.attacks import ATTACK_STATE, malicious_clients
from fedumm.fl.pipeline import Pipeline, ReplyMeta, Upload
from fedumm.fl.updates import UNDERSTANDING

K = 8
FRACTION = 0.25


def _cfg(*overrides):
    return config_from_dict({}, [f"clients={K}", *overrides])


def test_the_malicious_set_is_a_seeded_draw_fixed_for_the_run():
    a = malicious_clients(0, K, FRACTION)
    assert a == malicious_clients(0, K, FRACTION) and len(a) == round(FRACTION * K)
    assert a <= set(range(K))
    draws = {malicious_clients(s, 100, 0.1) for s in range(5)}
    assert len(draws) > 1 and all(len(d) == 10 for d in draws)
    assert malicious_clients(0, K, 0.0) == frozenset()
    assert malicious_clients(0, 4, 1.0) == frozenset(range(4))


def _upload(cid: int) -> tuple[Upload, dict]:
    g = torch.Generator().manual_seed(cid)
    ref = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in ref.items()}
    meta = ReplyMeta(num_samples={UNDERSTANDING: 12}, quality={UNDERSTANDING: 0.3})
    return Upload(cid, trained, {}, ref, meta, {}), ref


def _sent(cfg, cid: int, client_state: dict | None = None):
    """What the server aggregates from client ``cid``'s upload, its update, and the reply."""
    up, ref = _upload(cid)
    up.client_state = dict(client_state or {})
    pipe = Pipeline.from_config(cfg)
    reply = pipe.send(up)
    upd = pipe.receive(reply, ref)
    return {k: upd.tensors[k] - ref[k] for k in ref}, upd, up.client_state


@pytest.mark.parametrize("kind", ["sign_flip", "scale", "noise", "lie"])
def test_each_attack_changes_exactly_the_malicious_clients_uploads(kind):
    cfg = _cfg(f"attack.kind={kind}", f"attack.fraction={FRACTION}", "attack.scale=-7.5",
               "attack.noise_std=0.5", "attack.lie_factor=3")
    bad = malicious_clients(cfg.seed, K, FRACTION)
    for cid in range(K):
        honest, hupd, _ = _sent(_cfg(), cid)
        got, upd, _ = _sent(cfg, cid)
        if cid not in bad or kind == "lie":  # the tensors as the client trained them
            assert all(torch.equal(got[k], honest[k]) for k in honest)
        if cid not in bad:
            assert upd.num_samples == hupd.num_samples and upd.quality == hupd.quality
            continue
        if kind == "sign_flip":
            for k in honest:
                torch.testing.assert_close(got[k], -honest[k])
        elif kind == "scale":
            for k in honest:
                torch.testing.assert_close(got[k], -7.5 * honest[k])
        elif kind == "noise":
            diff = torch.cat([(got[k] - honest[k]).ravel() for k in honest])
            assert 0.2 < float(diff.std()) < 1.0
        else:  # lie: the counts and quality it reports
            assert upd.num_samples == {UNDERSTANDING: 36}
            assert upd.quality == {UNDERSTANDING: pytest.approx(0.9)}


def test_noise_is_reproducible_and_new_each_round():
    cfg = _cfg("attack.kind=noise", "attack.fraction=1.0")
    first, _, state = _sent(cfg, 2)
    again, _, _ = _sent(cfg, 2)
    second, _, state2 = _sent(cfg, 2, state)
    assert state[ATTACK_STATE] == 1 and state2[ATTACK_STATE] == 2
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["a"], second["a"])


def test_an_attack_that_would_pick_no_client_is_a_config_error():
    with pytest.raises(ConfigError, match="0 clients malicious"):
        _cfg("attack.kind=scale", "attack.fraction=0.05")
    assert Pipeline.from_config(_cfg()).stages[0].name != "attack"  # off: not in the pipeline


def test_a_micro_run_under_attack_with_the_median_completes(tmp_path, tiny_overrides):
    from fedumm.runtime.dispatch import run_experiment
    from fedumm.runtime.run_dir import RunDirectory

    cfg = config_from_dict({"name": "attacked"}, [
        *tiny_overrides, "rounds=1", "clients=4", "train.max_steps=1", "eval.every=0",
        "eval.max_gen=0", "attack.kind=scale", "attack.fraction=0.25",
        "strategy.robust=median"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    rounds = [m for m in RunDirectory(tmp_path / "run").metrics() if m["type"] == "round"]
    assert len(rounds) == 1 and summary["rounds"] == 1

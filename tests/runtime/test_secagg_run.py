"""Secure aggregation in the round loop: the run's model equals plain FedAvg's within the
quantisation step, a client that drops out is unmasked by the others' shares, and a round
that loses too many clients is skipped with its reason (the model stays)."""

from __future__ import annotations

import json

import pytest

from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from makers import round_records, run_adapters


@pytest.fixture()
def four(tiny_overrides):
    return [*tiny_overrides, "clients=4", "eval.every=0", "eval.max_gen=0",
            "train.val_fraction=0"]


def test_secure_aggregation_equals_plain_fedavg_within_the_quantisation_step(tmp_path, four):
    run_experiment(config_from_dict({"name": "p"}, four), tmp_path / "plain", progress=False)
    run_experiment(config_from_dict({"name": "s"}, [*four, "secagg.enabled=true"]),
                   tmp_path / "sec", progress=False)
    plain, sec = run_adapters(tmp_path / "plain"), run_adapters(tmp_path / "sec")
    assert plain.keys() == sec.keys()
    # 2 rounds, each within D/2 = 8 / 2^22 of the plain weighted mean (clients reached the
    # second round from slightly different adapters, so allow a small margin on top)
    worst = max(float((plain[k] - sec[k]).abs().max()) for k in plain)
    assert 0 < worst < 1e-4
    recs = round_records(tmp_path / "sec")
    assert all(r["outcome"] == "aggregated" and r["secagg"]["inputs"] == 4 for r in recs)
    # the bytes counted are the protocol's messages (keys, shares, masked uint32 vectors),
    # not the payloads the simulation hands the server
    sent = [sum(s["up"] for s in r["secagg"]["bytes"].values()) for r in recs]
    assert [r["upload_bytes"] for r in recs] == sent
    length = recs[0]["secagg"]["length"]
    assert all(b > 4 * 4 * length for b in sent)  # 4 clients' masked vectors and more
    summary = json.loads((tmp_path / "sec" / "summary.json").read_text())
    assert summary["communication"]["upload_bytes_per_client_round"] == sum(sent) / 8


def test_a_dropped_client_is_unmasked_by_the_others_and_too_few_skip_the_round(
        tmp_path, four):
    # dropout 0.25 at seed 0 drops some clients in some rounds; threshold 3 of 4
    over = [*four, "rounds=6", "secagg.enabled=true", "secagg.threshold=3",
            "faults.dropout=0.25"]
    run_experiment(config_from_dict({"name": "d"}, over), tmp_path / "d", progress=False)
    recs = round_records(tmp_path / "d")
    for r in recs:
        dropped = r.get("dropped", [])
        alive = 4 - len(dropped)
        if alive >= 3:
            assert r["outcome"] == "aggregated", r
            assert r["secagg"]["dropped_before_input"] == sorted(dropped)
            assert r["secagg"]["inputs"] == alive
        else:
            assert r["outcome"].startswith("skipped"), r
            assert "secagg" not in r
    # at seed 0 both happen: rounds aggregated despite a dropout, rounds skipped
    assert any(r["outcome"] == "aggregated" and r.get("dropped") for r in recs)
    skipped = [r for r in recs if r["outcome"] != "aggregated"]
    assert skipped and all("fewer than the threshold 3" in r["outcome"] for r in skipped)


def test_a_sealed_reply_keeps_the_update_on_the_client(tiny_overrides):
    """Over a real transport the client runs the pipeline's server halves itself and keeps
    the values; the server gets their keys only, as tensors that cannot be read."""
    import torch

    from fedumm.fl import codecs as codec
    from fedumm.fl.pipeline import SEALED
    from fedumm.runtime.experiment import (
        build_adapters,
        client_datasets,
        client_endpoint,
        load_backbone,
    )

    cfg = config_from_dict({"name": "s"}, [*tiny_overrides, "secagg.enabled=true"])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    client = client_datasets(cfg, backbone)[0][0]
    start = adapters.state()
    payload = codec.encode(start, "float32")
    plain, _ = client_endpoint(cfg, adapters).handle(client, 0, payload, {}, None)
    held = []
    sealed, _ = client_endpoint(cfg, adapters).handle_sealed(
        client, 0, payload, {}, None, hold=lambda values, begun: held.append((values, begun)))
    endpoint = client_endpoint(cfg, adapters)
    server_view = endpoint.pipeline.receive(plain, start)  # what an open server decodes
    (values, begun), = held
    assert values.keys() == server_view.tensors.keys()
    assert all(torch.equal(values[k], server_view.tensors[k]) for k in values)
    assert all(torch.equal(begun[k], start[k]) for k in start)
    assert sealed.payload == b"" and sealed.meta.form == SEALED
    assert sealed.meta.keys == sorted(values) and sealed.meta.num_samples == \
        plain.meta.num_samples
    shell = endpoint.pipeline.receive(sealed, start)
    assert shell.tensors.keys() == values.keys() and shell.num_samples == plain.meta.num_samples
    k = next(iter(shell.tensors))
    assert shell.tensors[k].is_meta
    with pytest.raises((NotImplementedError, RuntimeError)):
        shell.tensors[k].tolist()

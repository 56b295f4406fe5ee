"""The update pipeline of the one round loop: deltas under lossy codecs with error feedback,
bytes counted as sent, and malformed updates rejected with their reason while the run goes on."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import config_from_dict
from fedumm.fl import codecs as codec
from fedumm.fl.endpoint import ClientEndpoint
from fedumm.fl.pipeline import DELTA, Pipeline, Reply, ReplyMeta, Stage, Upload
from fedumm.fl.stages import validate
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.local import LocalRuntime
from fedumm.runtime.run_dir import RunDirectory


def _cfg(overrides, *extra):
    return config_from_dict({"name": "pipe"}, [*overrides, *extra])


def test_a_sparse_codec_sends_deltas_with_error_feedback(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "codec.upload=topk:0.05+int8")
    RunDirectory(tmp_path / "run").create(cfg)
    rt = LocalRuntime(cfg, tmp_path / "run", progress=False)
    summary = rt.run()
    full = run_experiment(_cfg(tiny_overrides), tmp_path / "fp32", progress=False)
    ratio = (full["communication"]["upload_bytes_per_client_round"]
             / summary["communication"]["upload_bytes_per_client_round"])
    assert ratio > 10  # 5 % of the entries, int8 values and 16-bit positions
    assert summary["communication"]["download_bytes_per_client_round"] == \
        full["communication"]["download_bytes_per_client_round"]  # float32 down
    for _, state in rt.transport.store.items():  # what the codec dropped is kept
        residual = state["error_feedback"]
        assert residual and any(float(v.abs().sum()) > 0 for v in residual.values())


def test_the_server_adds_a_decoded_delta_to_what_the_client_received():
    received = {"a": torch.tensor([1.0, 2.0, 3.0])}
    delta = {"a": torch.tensor([0.5, 0.0, -1.0])}
    reply = Reply(0, codec.encode(delta, "int8"), ReplyMeta({"understanding": 1}, form=DELTA))
    upd = Pipeline.from_config(_cfg([], "codec=int8")).receive(reply, received)
    torch.testing.assert_close(upd.tensors["a"], received["a"] + codec.roundtrip(delta,
                                                                                  "int8")[0]["a"])
    assert upd.upload_bytes == len(reply.payload)


def test_validation_names_what_is_wrong():
    expected = {"a": torch.zeros(2, 3)}
    assert validate({"a": torch.ones(2, 3)}, expected) is None
    assert "non-finite" in validate({"a": torch.full((2, 3), float("inf"))}, expected)
    assert "shape (3, 2), expected (2, 3)" in validate({"a": torch.ones(3, 2)}, expected)
    assert "unknown adapter tensors ['b']" in validate({"b": torch.ones(1)}, expected)
    assert "dtype" in validate({"a": torch.ones(2, 3, dtype=torch.int64)}, expected)
    reply = Reply(0, b"not a payload", ReplyMeta())
    assert Pipeline.from_config(_cfg([])).receive(reply, expected).startswith(
        "undecodable payload")


def _diverge(client_id):
    from fedumm.fl.client import ClientTrainer

    real = ClientTrainer.train

    def train(self, client, *args, **kwargs):
        upd, state = real(self, client, *args, **kwargs)
        if client.client_id == client_id:
            upd.tensors = {k: v * float("nan") for k, v in upd.tensors.items()}
        return upd, state

    return train


@pytest.mark.parametrize("corrupt, reason", [
    (None, "non-finite values after local training"),
    (lambda t: {**t, "base_model.model.nowhere.lora_A.weight": torch.zeros(2, 2)},
     "unknown adapter tensors"),
    (lambda t: {k: v[:1] for k, v in t.items()}, "shape"),
    (lambda t: b"\x00" * 64, "undecodable payload"),
])
def test_a_malformed_update_is_rejected_with_its_reason_and_the_run_finishes(
        tmp_path, tiny_overrides, monkeypatch, corrupt, reason):
    real = ClientEndpoint.handle

    def handle(self, client, rnd, payload, client_config, client_state):
        reply, state = real(self, client, rnd, payload, client_config, client_state)
        if client.client_id == 1 and rnd == 0:  # client 1 sends garbage in round 0
            bad = corrupt(codec.decode(reply.payload))
            reply.payload = bad if isinstance(bad, bytes) else codec.encode(bad, "float32")
        return reply, state

    if corrupt is None:  # client 1's training diverges in every round
        from fedumm.fl.client import ClientTrainer

        monkeypatch.setattr(ClientTrainer, "train", _diverge(1))
    else:
        monkeypatch.setattr(ClientEndpoint, "handle", handle)
    summary = run_experiment(_cfg(tiny_overrides), tmp_path / "run", progress=False)
    metrics = RunDirectory(tmp_path / "run").metrics()
    rejected = [m for m in metrics if m["type"] == "rejected"]
    assert rejected[0]["client"] == 1 and rejected[0]["round"] == 0
    assert len(rejected) == (2 if corrupt is None else 1)  # diverged: both rounds
    assert reason in rejected[0]["reason"]
    rounds = [m for m in metrics if m["type"] == "round"]
    assert rounds[0]["rejected"] == [{"client": 1, "reason": rejected[0]["reason"]}]
    assert list(rounds[0]["num_samples"]) == ["0"]  # only client 0 was aggregated
    assert torch.isfinite(torch.tensor(summary["final"]["vqa_accuracy"]))


class Halve(Stage):
    """A toy stage in the privacy slot (after the delta is taken, before the codec)."""

    name = "halve"
    seen: list[bool] = []

    def client(self, up: Upload) -> None:
        Halve.seen.append(set(up.tensors) <= set(up.reference))
        up.tensors = {k: 0.5 * v for k, v in up.tensors.items()}


def test_a_stage_in_the_client_pipeline_runs_before_the_codec(tmp_path, tiny_overrides):
    """The update pipeline takes a stage between the delta and the codec without any change
    to the trainer or the endpoint: here one that halves the update."""
    from fedumm.runtime.experiment import build_adapters, client_datasets, client_endpoint

    cfg = _cfg(tiny_overrides, "codec.upload=int8")
    from fedumm.runtime.experiment import load_backbone

    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    clients, _ = client_datasets(cfg, backbone)
    plain = client_endpoint(cfg, adapters)
    stages = list(plain.pipeline.stages)
    halved = ClientEndpoint(plain.trainer, plain.strategy, plain.lora,
                            Pipeline([*stages[:1], Halve(), *stages[1:]]))
    start = adapters.state()
    payload = codec.encode(start, "float32")
    full, _ = plain.handle(clients[0], 0, payload, {}, None)
    half, _ = halved.handle(clients[0], 0, payload, {}, None)
    assert Halve.seen == [True]
    d_full, d_half = codec.decode(full.payload), codec.decode(half.payload)
    k = max(d_full, key=lambda k: float(d_full[k].abs().max()))
    assert torch.allclose(d_half[k], 0.5 * d_full[k], atol=2 * float(d_full[k].abs().max()) / 127)


def test_a_run_whose_every_update_was_rejected_fails_and_says_why(tmp_path, tiny_overrides,
                                                                   monkeypatch, capsys):
    from fedumm.cli import main
    from fedumm.fl.client import ClientTrainer

    real = ClientTrainer.train

    def diverge(self, client, *args, **kwargs):
        upd, state = real(self, client, *args, **kwargs)
        upd.tensors = {k: v * float("nan") for k, v in upd.tensors.items()}
        return upd, state

    monkeypatch.setattr(ClientTrainer, "train", diverge)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: rejected\n")
    code = main(["run", str(cfg_file), *tiny_overrides, "--out", str(tmp_path / "run"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no client update was accepted in the 2 round(s): all 4 were rejected" in err
    assert "non-finite values after local training" in err and "Traceback" not in err
    summary = RunDirectory(tmp_path / "run")  # the record of what happened is complete
    import json

    s = json.loads((summary.path / summary.SUMMARY).read_text())
    assert s["updates"]["accepted"] == 0 and s["updates"]["rejected"] == 4


def test_the_report_says_how_many_updates_were_rejected(tmp_path, tiny_overrides, monkeypatch):
    from fedumm.fl.client import ClientTrainer

    monkeypatch.setattr(ClientTrainer, "train", _diverge(1))  # client 1, every round
    run_experiment(_cfg(tiny_overrides), tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**2 of 4 client updates were rejected** (first: client 1 in round 0: " in report

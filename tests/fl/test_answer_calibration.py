"""The answer head calibrated by a client's own answers (FedRS / FedLC, train.answer_calibration):
the adjustment against the papers' formulas, the local loss against a hand computation, the
no-op settings against plain training, and the hook gone after training (ended or failed)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fedumm.config import load_config
from fedumm.eval.model_eval import heldout_quality
from fedumm.fl.answer_calibration import AnswerCalibration, answer_token_counts
from fedumm.fl.client import ClientTrainer
from fedumm.fl.client_hooks import LocalRound
from fedumm.models.protocol import UNDERSTANDING


def _setup(tiny_overrides, *overrides):
    from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

    cfg = load_config(None, [*tiny_overrides, "train.max_steps=3", *overrides])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    clients, _ = client_datasets(cfg, backbone)
    return cfg, backbone, adapters, clients


def test_the_adjustments_are_the_papers_formulas(tiny_overrides):
    _, backbone, _, _ = _setup(tiny_overrides)
    counts = Counter({3: 16, 5: 1})
    rs = AnswerCalibration(backbone, counts, "fedrs", alpha=0.3).adjustment(8)
    assert rs.tolist() == [0.3, 0.3, 0.3, 1.0, 0.3, 1.0, 0.3, 0.3]
    lc = AnswerCalibration(backbone, counts, "fedlc", tau=2.0).adjustment(8)
    assert lc[3].item() == pytest.approx(-2.0 * 16 ** -0.25)  # -tau * n^(-1/4) = -1.0
    assert lc[5].item() == pytest.approx(-2.0)
    assert lc[0].item() == pytest.approx(-2.0 * 1e-8 ** -0.25)  # absent: a margin of 200
    # over the task's answer tokens (the server's space, plus the client's own): the rest of
    # the vocabulary keeps its plain logit
    rs = AnswerCalibration(backbone, counts, "fedrs", alpha=0.3, space=[1, 3]).adjustment(8)
    assert rs.tolist() == [1.0, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    lc = AnswerCalibration(backbone, counts, "fedlc", tau=2.0, space=[1, 3]).adjustment(8)
    assert lc[[0, 2, 4, 6, 7]].tolist() == [0.0] * 5
    assert lc[1].item() == pytest.approx(-200.0) and lc[5].item() == pytest.approx(-2.0)


def test_counts_are_the_tokens_the_loss_supervises(tiny_overrides):
    _, backbone, _, clients = _setup(tiny_overrides)
    samples = clients[0].train
    und = [s for s in samples if s.task == UNDERSTANDING]
    counts = answer_token_counts(backbone, samples)
    batch = backbone.collate(und).parts[UNDERSTANDING]
    supervised = batch["a_ids"][batch["a_mask"].bool()]
    assert counts == Counter(supervised.tolist())
    assert counts[backbone.tokenizer.eos_id] == len(und)  # one end token per answer


@pytest.mark.parametrize("method", ["fedrs", "fedlc"])
def test_the_local_loss_is_the_calibrated_softmax(tiny_overrides, method):
    _, backbone, _, clients = _setup(tiny_overrides)
    und = [s for s in clients[0].train if s.task == UNDERSTANDING]
    hook = AnswerCalibration(backbone, answer_token_counts(backbone, und), method,
                             alpha=0.25, tau=0.5)
    b = backbone.collate(und).parts[UNDERSTANDING]
    with torch.no_grad():
        logits, *_ = backbone.model._answer_logits(b["images"], b["q_ids"], b["q_mask"],
                                                   b["a_ids"], b["a_mask"], b["image_present"])
        adj = hook.adjustment(logits.shape[-1]).to(logits.dtype)
        logits = logits * adj if method == "fedrs" else logits + adj
        labels = b["a_ids"].masked_fill(b["a_mask"] == 0, -100)
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        plain = backbone.loss(backbone.collate(und))[UNDERSTANDING]
        hook.begin(LocalRound({}, {}, {}))
        calibrated = backbone.loss(backbone.collate(und))[UNDERSTANDING]
        hook.close()
        after = backbone.loss(backbone.collate(und))[UNDERSTANDING]
    assert calibrated.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(calibrated.item() - plain.item()) > 1e-3  # it changes the loss
    assert torch.equal(after, plain)  # and leaves the model as it was


@pytest.mark.parametrize("setting", ["train.answer_calibration=fedrs",
                                     "train.answer_calibration=fedlc"])
def test_no_op_settings_train_exactly_as_plain_training(tiny_overrides, setting):
    """alpha=1 (FedRS) multiplies every logit by 1, tau=0 (FedLC) adds 0: bit for bit the
    plain update; the default settings train differently."""
    def update(*extra):
        cfg, backbone, adapters, clients = _setup(tiny_overrides, *extra)
        trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality)
        start = {k: v.clone() for k, v in adapters.state().items()}
        upd, _ = trainer.train(clients[0], start, 0, trainer.config_hooks(clients[0]))
        assert not backbone.answer_head._forward_hooks  # removed when training ended
        return upd.tensors

    plain = update()
    off = update(setting, "train.answer_calibration_alpha=1", "train.answer_calibration_tau=0")
    on = update(setting)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert any(not torch.equal(plain[k], on[k]) for k in plain)


def test_the_hook_is_removed_when_training_fails(tiny_overrides, monkeypatch):
    cfg, backbone, adapters, clients = _setup(tiny_overrides, "train.answer_calibration=fedrs")
    trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality)

    def broken(batch):
        assert backbone.answer_head._forward_hooks  # calibrating while it trains
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backbone, "loss", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(clients[0], adapters.state(), 0, trainer.config_hooks(clients[0]))
    assert not backbone.answer_head._forward_hooks


def test_a_backbone_without_an_answer_head_is_refused_before_training(tiny_overrides,
                                                                      monkeypatch):
    from fedumm.models.reference.backbone import ReferenceBackbone

    monkeypatch.delattr(ReferenceBackbone, "answer_head")
    cfg, _, adapters, _ = _setup(tiny_overrides, "train.answer_calibration=fedlc")
    with pytest.raises(ValueError, match="needs a backbone with answer_head"):
        ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality)


def test_the_server_sends_its_held_out_answer_tokens(tiny_overrides, tmp_path, monkeypatch):
    """The class set clients calibrate over is the answer tokens of the server's held-out
    answers, sent in every round's client config."""
    from fedumm.fl import client as client_module
    from fedumm.fl.answer_calibration import answer_space
    from fedumm.runtime.dispatch import run_experiment
    from fedumm.runtime.experiment import eval_samples, load_backbone

    seen: list = []
    real = client_module.AnswerCalibration

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(client_module, "AnswerCalibration", spy)
    cfg = load_config(None, [*tiny_overrides, "train.answer_calibration=fedrs", "rounds=1",
                             "eval.every=0", "eval.base=false"])
    run_experiment(cfg, tmp_path / "run", progress=False)
    expected = answer_space(load_backbone(cfg), eval_samples(cfg))
    assert expected and seen == [expected] * cfg.clients

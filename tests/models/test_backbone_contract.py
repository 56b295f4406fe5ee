"""The Backbone protocol's contract, checked on every registered backbone (tiny sizes)."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedumm.config import BackboneConfig
from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.eval.model_eval import heldout_quality
from fedumm.fl import codecs
from fedumm.models.info import adapter_parameters
from fedumm.models.kinds import backbone_kinds, build_backbone
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import (
    GENERATION,
    UNDERSTANDING,
    Backbone,
    base_state_dict,
)

PRESETS = {"reference": "micro", "janus": "tiny", "blip3o": "tiny"}
LORA_NAME = r"^base_model\.model\.|\.lora_(embedding_)?[AB](\.weight)?$"


def make(kind: str) -> Backbone:
    return build_backbone(BackboneConfig(kind=kind, preset=PRESETS[kind], device="cpu"))


@pytest.fixture(scope="module")
def samples():
    data = generate_shapes("base", 6, seed=0, image_size=16)  # both backbones take 16 px
    s = shapes_samples(data)
    und = [x for x in s if x.task == UNDERSTANDING][:4]
    gen = [x for x in s if x.task == GENERATION][:4]
    return und + gen


def test_every_registered_backbone_is_covered():
    assert set(backbone_kinds()) == set(PRESETS)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_losses_fall_and_only_adapters_get_gradients(kind, samples):
    bb = make(kind)
    assert isinstance(bb, Backbone)
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    batch = bb.collate(samples, [False] * 7 + [True])
    assert batch.counts == {UNDERSTANDING: 4, GENERATION: 4}
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        torch.manual_seed(0)  # the same flow-matching noise each step: a fixed batch
        losses = bb.loss(batch)
        assert set(losses) == {UNDERSTANDING, GENERATION}
        first = first or {m: v.item() for m, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        with_grad = {n for n, p in ad.model.named_parameters() if p.grad is not None}
        adapter_names = {n for n, p in ad.model.named_parameters()
                         if any(p is q for q in ad.params.values())}
        assert with_grad and with_grad <= adapter_names
        opt.step()
    torch.manual_seed(0)
    last = {m: v.item() for m, v in bb.loss(batch).items()}
    for m in (UNDERSTANDING, GENERATION):
        assert last[m] < first[m] - 0.05, (m, first, last)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_groups_hold_exactly_their_declared_modules(kind):
    bb = make(kind)
    plain = dict(bb.model.named_modules())
    counts = adapter_parameters(bb.model, bb.groups, r=4)  # before PEFT wraps the modules
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    for g in bb.groups:
        lora_modules = {re.sub(LORA_NAME, "", k) for k in ad.keys(g.name) if ".lora_" in k}
        declared = {n for n in plain if g.target and re.fullmatch(g.target, n)}
        assert lora_modules == declared, g.name
        assert ad.keys(g.name), g.name  # every group trains something
    # the count of `fedumm backbone info` (no PEFT, meta device) is what PEFT builds
    n = ad.num_parameters()
    assert counts == {g: n[g] for g in counts}


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_group_state_round_trips_bit_exactly(kind):
    a = LoraAdapters(make(kind), r=4, alpha=8, seed=0)
    with torch.no_grad():
        for p in a.params.values():
            p.add_(torch.randn_like(p))
    for group in a.groups:
        state = a.state([group])
        received, _ = codecs.roundtrip(state)
        b = LoraAdapters(make(kind), r=4, alpha=8, seed=1)
        b.load_state(received)
        assert all(torch.equal(b.params[k], v) for k, v in state.items())


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_answer_generate_quality_and_fingerprint(kind, samples):
    bb = make(kind)
    und = [s for s in samples if s.task == UNDERSTANDING]
    answers = bb.answer([s.load_image() for s in und[:2]] + [None], [s.text for s in und[:3]])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    images = bb.generate(["a photo of a red circle", "a photo of two squares"], seed=1)
    assert len(images) == 2
    assert all(im.shape == (bb.image_size, bb.image_size, 3) and im.dtype == np.uint8
               for im in images)
    again = bb.generate(["a photo of a red circle", "a photo of two squares"], seed=1)
    assert np.array_equal(np.asarray(images), np.asarray(again))
    q = heldout_quality(bb, samples)
    assert set(q) == {UNDERSTANDING, GENERATION} and all(0.0 <= v <= 1.0 for v in q.values())
    gen = [s for s in samples if s.task == GENERATION]
    assert q[GENERATION] == bb.generation_quality(gen) == bb.generation_quality(gen)
    before = bb.fingerprint()
    bb2 = make(kind)
    assert bb2.fingerprint() == before
    with torch.no_grad():
        next(iter(base_state_dict(bb2.model).values())).view(-1)[0] += 1.0
    bb2._fingerprint = None  # the transformers backbones cache their hash; the weights changed
    assert bb2.fingerprint() != before


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_answer_likelihoods_equal_the_training_loss(kind, samples):
    """Two paths to one number: a candidate answer's summed log-probability is minus the
    training loss (a mean cross-entropy over the supervised tokens) times their count."""
    bb = make(kind)
    und = samples[:2]
    images = [und[0].load_image(), None]  # the second question without its image
    candidates = ["yes", "red circle"]
    ll = bb.answer_likelihoods(images, [s.text for s in und], candidates)
    assert ll.shape == (2, 2) and np.isfinite(ll).all() and (ll < 0).all()
    bb.model.eval()
    for i, s in enumerate(und):
        for j, cand in enumerate(candidates):
            one = replace(s, answer=cand, image=s.image if images[i] is not None else None)
            batch = bb.collate([one])
            u = batch.parts[UNDERSTANDING]
            n = int(u["a_mask"].sum()) if "a_mask" in u else int((u["labels"] != -100).sum())
            with torch.no_grad():
                loss = bb.loss(batch)[UNDERSTANDING].item()
            assert ll[i, j] == pytest.approx(-loss * n, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_answering_scoring_and_generating_run_in_eval_mode_and_restore_the_mode(kind, samples):
    """Between training steps: every module runs in eval mode (no dropout), and the model is
    back in training mode afterwards, also when the call raises."""
    bb = make(kind)
    und = [s for s in samples if s.task == UNDERSTANDING][:2]
    images, questions = [s.load_image() for s in und], [s.text for s in und]
    calls = {"answer": lambda: bb.answer(images, questions),
             "answer_likelihoods": lambda: bb.answer_likelihoods(images, questions, ["yes"]),
             "generate": lambda: bb.generate(["a photo of a red circle"], seed=0)}
    seen: list[bool] = []
    fail = {"now": False}

    def record(module, args):
        seen.append(module.training)
        if fail["now"]:
            raise RuntimeError("boom")

    hooks = [m.register_forward_pre_hook(record) for m in bb.model.modules()]
    try:
        for name, call in calls.items():
            bb.model.train()
            seen.clear()
            fail["now"] = False
            call()
            assert seen and not any(seen), name
            assert all(m.training for m in bb.model.modules()), name
            fail["now"] = True
            with pytest.raises(RuntimeError, match="boom"):
                call()
            assert all(m.training for m in bb.model.modules()), name
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_preparation_progress_ends_at_its_total(kind, samples):
    """A backbone whose ``prepare`` reports progress counts its generation samples up to
    their total (the CLI's preparing-data bar closes there); one with nothing to prepare
    (BLIP3o computes its targets per batch) reports nothing."""
    from fedumm.models.protocol import prepare_samples

    bb = make(kind)
    calls: list[tuple[int, int]] = []
    prepare_samples(bb, samples, lambda done, total: calls.append((done, total)))
    gen = sum(s.task == GENERATION for s in samples)
    if kind == "blip3o":
        assert calls == []
    else:
        assert calls and calls[-1] == (gen, gen)
        assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # rising


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_answer_token_ids_are_what_the_loss_supervises_and_the_head_gives_its_logits(kind,
                                                                                     samples):
    """``answer_token_ids`` (the classes FedRS / FedLC count) are the understanding loss's
    supervised ids, sample by sample, and ``answer_head`` is the module whose output that loss
    reads: scaling its output changes the loss."""
    from collections import Counter

    from fedumm.fl.answer_calibration import AnswerCalibration, answer_token_counts
    from fedumm.fl.client_hooks import LocalRound

    bb = make(kind)
    und = [s for s in samples if s.task == UNDERSTANDING]
    part = bb.collate(und).parts[UNDERSTANDING]
    if "labels" in part:  # Hugging Face models: -100 outside the answer
        supervised = [row[row != -100].tolist() for row in part["labels"]]
    else:
        supervised = [row[m.bool()].tolist() for row, m in zip(part["a_ids"], part["a_mask"],
                                                                strict=True)]
    assert bb.answer_token_ids([s.answer for s in und]) == supervised
    counts = answer_token_counts(bb, und)
    assert counts == Counter(t for row in supervised for t in row)
    with torch.no_grad():
        plain = bb.loss(bb.collate(und))[UNDERSTANDING]
        hook = AnswerCalibration(bb, counts, "fedrs", alpha=0.0)
        hook.begin(LocalRound({}, {}, {}))
        restricted = bb.loss(bb.collate(und))[UNDERSTANDING]
        hook.close()
    assert abs(restricted.item() - plain.item()) > 1e-4  # absent tokens' logits set to 0

"""FedMLLM's layer-adaptive regulariser: which adapter tensors get the proximal term."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import load_config
from fedumm.eval.model_eval import heldout_quality
from fedumm.fl.client import ClientTrainer
from fedumm.fl.strategies.fedprox import middle_layer_keys
from fedumm.models.protocol import DecoderLayers

DECODER = DecoderLayers(r"language_model\.layers\.(\d+)\.", 6)
KEYS = [f"base_model.model.language_model.layers.{i}.mlp.up_proj.lora_A.weight"
        for i in range(6)] + ["base_model.model.vision_model.encoder.layers.3.fc1.lora_A.weight"]


def test_only_the_middle_decoder_layers_are_regularised():
    assert [DECODER.index(k) for k in middle_layer_keys(KEYS, DECODER, 2)] == [2, 3]
    assert [DECODER.index(k) for k in middle_layer_keys(KEYS, DECODER, 0)] == list(range(6))
    with pytest.raises(ValueError, match="no middle layer of the backbone's 6"):
        middle_layer_keys(KEYS, DECODER, 3)


def _train(tiny_overrides, *overrides):
    from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

    # plain SGD, no clipping, two steps: the term is zero at the first step (the adapters
    # start at the global ones), so at the second only the tensors it touches move otherwise
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=2", "train.optimizer=sgd",
                             "train.grad_clip=0", "train.lr=0.5", *overrides])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    clients, _ = client_datasets(cfg, backbone)
    start = {k: v.clone() for k, v in adapters.state().items()}
    trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality)
    update, _ = trainer.train(clients[0], start, 0, trainer.config_hooks(clients[0]))
    return update.tensors, start, backbone.decoder_layers, trainer


def test_the_term_changes_exactly_the_decoder_adapters(tiny_overrides):
    free, start, decoder, _ = _train(tiny_overrides)
    held, _, _, trainer = _train(tiny_overrides, "train.adaptive_prox=true",
                                 "train.adaptive_prox_skip=0", "train.adaptive_prox_mu=50",
                                 "train.adaptive_prox_weight=0.02")
    in_decoder = sorted(k for k in free if decoder.index(k) is not None)
    assert in_decoder and set(in_decoder) == trainer.layer_prox_keys & set(free)
    # LoRA's A has no gradient at the first step (B starts at 0): the term moves the B's
    assert all(torch.equal(held[k], free[k]) for k in free if k not in in_decoder)
    assert all(not torch.equal(held[k], free[k]) for k in in_decoder if "lora_B" in k)
    # pulled back towards the global adapters
    assert sum((held[k] - start[k]).norm() for k in in_decoder) < \
        sum((free[k] - start[k]).norm() for k in in_decoder)


def test_too_many_skipped_layers_is_an_error_before_training(tiny_overrides):
    with pytest.raises(ValueError, match="adaptive_prox_skip=1 leaves no middle layer"):
        _train(tiny_overrides, "train.adaptive_prox=true", "train.adaptive_prox_skip=1")


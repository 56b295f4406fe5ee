"""A micro random-weight configuration of the reference UMM, for tests and quick checks.

Same architecture and module names as the shipped model, sized to run in milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch

from fedumm.data.readers.shapes import generate_shapes
from fedumm.models.reference.backbone import ReferenceBackbone
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.reference.umm import ReferenceUMM, UMMConfig
from fedumm.models.reference.vq import PatchCodebook

MICRO_IMAGE_SIZE = 16


def micro_config(vocab: int) -> UMMConfig:
    return UMMConfig(
        image_size=MICRO_IMAGE_SIZE, vision_patch=4, gen_patch=4, vision_hidden=32,
        vision_layers=1,
        vision_heads=2, vision_intermediate=64, hidden=32, layers=1, heads=2, intermediate=64,
        text_vocab=vocab, image_codes=32, alignment_tokens=2,
    )


def micro_backbone(seed: int = 0) -> ReferenceBackbone:
    """A deterministic micro backbone (random weights, k-means codebook on a few renders)."""
    tok = TextTokenizer.default()
    data = generate_shapes("base", 40, seed=seed, image_size=MICRO_IMAGE_SIZE)
    targets = np.stack([data.image(i) for i in data.gen_image])
    codebook = PatchCodebook.fit(targets, 4, 32, seed=seed, iters=5)
    torch.manual_seed(seed)
    model = ReferenceUMM(micro_config(tok.vocab_size))
    model.eval()
    return ReferenceBackbone(model, tok, codebook, {"micro": True})

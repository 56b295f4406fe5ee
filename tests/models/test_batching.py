"""Pretraining labels built by the SampleEncoder, checked against the pixels they describe."""

from __future__ import annotations

import numpy as np

from fedumm.data.readers.shapes import generate_shapes
from fedumm.data.render import BACKGROUND, COLORS
from fedumm.models.reference.pretrain_batches import SampleEncoder
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.reference.vq import PatchCodebook

COLOR_NAMES = list(COLORS)


def test_generated_cell_labels_follow_the_codes_raster_order():
    data = generate_shapes("base", 20, seed=0, image_size=48)
    targets = np.stack([data.image(i) for i in data.gen_image])
    enc = SampleEncoder(TextTokenizer.default(), PatchCodebook.fit(targets, 16, 64, iters=2), 8)
    prep = enc.prepare(data, with_probe=True)
    assert prep.gen_cells.shape == (len(data.gen), 9, 2)
    objects = 0
    for j, image in enumerate(targets):
        for t, (shape, color) in enumerate(prep.gen_cells[j].tolist()):
            r, c = divmod(t, 3)
            cell = image[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].reshape(-1, 3)
            if shape == 0:
                assert (cell == BACKGROUND).all()
            else:
                objects += 1
                rgb = COLORS[COLOR_NAMES[color - 1]]
                assert (cell == rgb).all(1).sum() > 16, (j, t)  # the named colour is drawn here
    assert objects >= len(data.gen)
    batch = enc.generation_batch(prep, [2, 0])
    assert np.array_equal(batch["cells"].numpy(), prep.gen_cells[[2, 0]].numpy())


def test_grounding_labels_travel_with_their_questions():
    data = generate_shapes("base", 10, seed=0, image_size=48)
    targets = np.stack([data.image(i) for i in data.gen_image])
    enc = SampleEncoder(TextTokenizer.default(), PatchCodebook.fit(targets, 16, 32, iters=1), 8)
    prep = enc.prepare(data, with_probe=True)
    batch = enc.understanding_batch(prep, [3, 1])
    assert batch["ground"].shape == (2, 9)
    assert np.array_equal(batch["ground"].numpy(), prep.ground[[3, 1]].numpy())
    assert enc.prepare(data).ground is None  # only with the pretraining labels

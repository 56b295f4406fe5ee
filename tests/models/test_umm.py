from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedumm.data.readers.shapes import generate_shapes
from fedumm.models.protocol import state_fingerprint
from fedumm.models.reference.backbone import ReferenceBackbone
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE, micro_backbone
from fedumm.models.reference.pretrain_batches import pretrain_encoder


@pytest.fixture()
def backbone() -> ReferenceBackbone:
    return micro_backbone(seed=0)


@pytest.fixture(scope="module")
def data():
    return generate_shapes("base", 24, seed=0, image_size=MICRO_IMAGE_SIZE)


def test_both_losses_fall_over_a_few_steps(backbone, data):
    model, enc = backbone.model, pretrain_encoder(backbone)
    prep = enc.prepare(data, with_probe=True)
    ub = enc.understanding_batch(prep, list(range(16)))
    gb = enc.generation_batch(prep, list(range(16)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = last = None
    for _ in range(25):
        lu = model.understanding_loss(ub["images"], ub["q_ids"], ub["q_mask"], ub["a_ids"],
                                      ub["a_mask"], probe=ub["probe"])
        lg = model.generation_loss(gb["p_ids"], gb["p_mask"], gb["codes"])
        first = first or (lu.item(), lg.item())
        last = (lu.item(), lg.item())
        opt.zero_grad()
        (lu + lg).backward()
        opt.step()
    assert last[0] < 0.7 * first[0]
    assert last[1] < 0.7 * first[1]


def test_generate_returns_images_of_the_right_size_deterministically(backbone):
    prompts = ["a photo of a red circle", "a photo of two squares"]
    a = backbone.generate(prompts, seed=3)
    b = backbone.generate(prompts, seed=3)
    assert a.shape == (2, MICRO_IMAGE_SIZE, MICRO_IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_answer_gives_one_string_per_question(backbone, data):
    recs = data.vqa[:5]
    images = np.stack([data.image(r.image_id) for r in recs])
    answers = backbone.answer(images, [r.question for r in recs])
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)


def test_left_padding_does_not_change_the_answer_logits(backbone, data):
    """A question batched with a longer one must see the same logits as alone."""
    enc, model = pretrain_encoder(backbone), backbone.model
    r0, r1 = data.vqa[0], data.vqa[1]
    img = np.stack([data.image(r0.image_id), data.image(r1.image_id)])
    alone = enc.question_batch(img[:1], [r0.question])
    both = enc.question_batch(img, [r0.question, r1.question + " is there a red circle"])
    h1 = model._decode(*model._understanding_prefix(alone["images"], alone["q_ids"],
                                                    alone["q_mask"])[:2])[0][:, -1]
    h2 = model._decode(*model._understanding_prefix(both["images"], both["q_ids"],
                                                    both["q_mask"])[:2])[0][:1, -1]
    assert torch.allclose(h1, h2, atol=1e-5)


def test_checkpoint_round_trip_and_fingerprint(backbone, tmp_path):
    backbone.save(tmp_path / "ck")
    again = ReferenceBackbone.load(tmp_path / "ck")
    assert again.fingerprint() == backbone.fingerprint()
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    assert again.tokenizer.encode("a red circle") == backbone.tokenizer.encode("a red circle")
    assert torch.equal(again.codebook.codebook, backbone.codebook.codebook)


def test_tampered_weights_are_refused(backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    backbone.save(tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    state["lm_head.weight"][0, 0] += 1.0
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        ReferenceBackbone.load(tmp_path / "ck")
    # the checksums rewritten to match: the fingerprint in config.json still refuses it
    from fedumm.models.checksums import write_checksums

    files = ("model.safetensors", "config.json", "tokenizer.json", "codebook.safetensors")
    write_checksums(tmp_path / "ck", files)
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        ReferenceBackbone.load(tmp_path / "ck")


@pytest.mark.parametrize("damage", ["flip_codebook", "drop_fingerprint", "no_sums",
                                    "missing_tokenizer"])
def test_every_checkpoint_file_is_verified(backbone, tmp_path, damage):
    import json

    ck = backbone.save(tmp_path / "ck")
    if damage == "flip_codebook":
        data = bytearray((ck / "codebook.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ck / "codebook.safetensors").write_bytes(bytes(data))
        message = "codebook.safetensors is corrupt"
    elif damage == "drop_fingerprint":
        from fedumm.models.checksums import write_checksums

        info = json.loads((ck / "config.json").read_text())
        del info["fingerprint"]
        (ck / "config.json").write_text(json.dumps(info))
        write_checksums(ck, ("model.safetensors", "config.json", "tokenizer.json",
                             "codebook.safetensors"))
        message = "has no fingerprint"
    elif damage == "no_sums":
        (ck / "SHA256SUMS.json").unlink()
        message = "has no SHA256SUMS.json"
    else:
        (ck / "tokenizer.json").unlink()
        message = r"missing \['tokenizer.json'\]"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ReferenceBackbone.load(ck)


def test_fingerprint_depends_on_every_byte():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([0.0, 0.0, 1e-30])}
    assert state_fingerprint(a) != state_fingerprint(b)
    assert state_fingerprint(a) == state_fingerprint({"w": torch.zeros(3)})


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ReferenceBackbone.load(tmp_path)


def test_grounding_loss_reads_the_image_tokens_of_the_prefix(backbone, data):
    """The grounding term equals a BCE computed from the prefix alone, whose image tokens sit
    just before the final SEP (hidden states of a causal decoder ignore what follows)."""
    model, enc = backbone.model, pretrain_encoder(backbone)
    ub = enc.understanding_batch(enc.prepare(data), list(range(6)))
    n = model.config.image_tokens
    ground = (torch.arange(6 * n).reshape(6, n) % 3 == 0).float()
    args = (ub["images"], ub["q_ids"], ub["q_mask"], ub["a_ids"], ub["a_mask"])
    with torch.no_grad():
        plain = model.understanding_loss(*args)
        with_ground = model.understanding_loss(*args, ground=ground, ground_weight=0.5)
        embeds, mask, _ = model._understanding_prefix(*args[:3])
        hidden = model._decode(embeds, mask)[0][:, -1 - n:-1]
        bce = F.binary_cross_entropy_with_logits(model.ground_head(hidden).squeeze(-1), ground)
    assert torch.allclose(with_ground - plain, 0.5 * bce, atol=1e-6)
    with pytest.raises(ValueError, match="cells"):
        model.understanding_loss(*args, ground=ground[:, :-1])


"""The BLIP3o backbone against BLIP3o's official code (github.com/JiuhaiChen/BLIP3o, branch
main) and the libraries it uses, with oracles from outside fedumm where one exists:

* guidance's null point: ``mask_drop`` (blip3o_arch.py) zeroes the LLM's hidden states before
  the DiT's ``caption_projection`` (lumina_nextdit2d.py), and ``sample_images``
  (blip3o_qwen_inference.py) passes zeros as the unconditional branch;
* the conditioning prompt: the T2I conversation of train.py (``preprocess_qwen``, then the
  collator's ``[IMG]`` before the query slots) and inference.py's ``conv_qwen`` prompt, both
  as the tokenizer's ``apply_chat_template`` renders the official messages;
* which samples train which adapter group (the queries serve generation only; BLIP3o trains
  generation with the MLLM frozen);
* understanding images through Qwen2.5-VL's processor with min / max pixel bounds
  (transformers' ``Qwen2VLImageProcessorPil`` and ``smart_resize`` as the oracle).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fedumm.config import BackboneConfig, config_from_dict
from fedumm.data.records import ImageRef, Sample
from fedumm.fl.client import ClientData
from fedumm.models.blip3o.backbone import Blip3oBackbone
from fedumm.models.kinds import build_backbone
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import GENERATION, UNDERSTANDING
from makers import blip3o_samples, blip3o_tiny

tiny = blip3o_tiny


@pytest.fixture(scope="module")
def samples():
    return blip3o_samples()


SYSTEM = "You are a helpful assistant."  # Qwen's, BLIP3o's conv_qwen and preprocess_qwen


def official_messages(caption: str) -> list[dict[str, str]]:
    """BLIP3o's T2I request (train.py's conversation, inference.py's prompt)."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user",
             "content": f"Please generate image based on the following caption: {caption}"}]


def generation(samples):
    return [s for s in samples if s.task == GENERATION]


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def spy(bb: Blip3oBackbone, name: str) -> list[tuple]:
    """Record the arguments of ``bb.<name>`` (an instance attribute shadows the method)."""
    calls: list[tuple] = []
    method = getattr(bb, name)

    def record(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    setattr(bb, name, record)
    return calls


# ------------------------------------------------------------------ guidance's null point
def test_a_dropped_prompt_conditions_on_the_projection_of_zero_hidden_states(samples):
    bb = tiny()
    proj = bb.model.caption_projection
    assert proj.linear_1.bias.abs().sum() > 0 and proj.linear_2.bias.abs().sum() > 0
    g = bb.collate(generation(samples)[:2], [True, False]).parts[GENERATION]
    with torch.no_grad():
        hidden = bb._query_states(g["input_ids"], g["attention_mask"])
        cond = bb._condition(g["input_ids"], g["attention_mask"], g["keep"])
        null = proj(torch.zeros_like(hidden[0]))
    assert null.abs().min() > 0  # not the zero condition fedumm used to give
    torch.testing.assert_close(cond[0], null)
    torch.testing.assert_close(cond[1], proj(hidden[1]))
    # the training loss conditions the DiT on exactly that (the trainer's path)
    calls = spy(bb, "_velocity")
    bb.loss(bb.collate(generation(samples)[:2], [True, False]))
    torch.testing.assert_close(calls[0][2][0].detach(), null)


def test_sampling_guides_against_the_projection_of_zero_hidden_states(samples):
    bb = tiny()
    prompts = [s.text for s in generation(samples)[:2]]
    calls = spy(bb, "_velocity")
    states = spy(bb, "_query_states")
    bb.generate(prompts, seed=0)
    proj = bb.model.caption_projection
    with torch.no_grad():
        hidden = bb._query_states(*states[0])
        null = proj(torch.zeros_like(hidden))
        cond = proj(hidden)
    for _, _, both in calls:  # every step: [conditional; unconditional]
        torch.testing.assert_close(both[:2], cond)
        torch.testing.assert_close(both[2:], null)


# ------------------------------------------------------------------ the conditioning prompt
def test_the_generation_prompt_is_blip3os_chat_then_img(samples):
    bb = tiny()
    tok = bb.tokenizer
    img = tok.convert_tokens_to_ids("[IMG]")
    assert tok.tokenize("[IMG]") == ["[IMG]"] and img != tok.unk_token_id
    gen = generation(samples)
    captions = [s.text for s in gen]

    def oracle(caption: str, training: bool) -> list[int]:
        chat = official_messages(caption) + ([{"role": "assistant", "content": ""}]
                                             if training else [])
        text = tok.apply_chat_template(chat, add_generation_prompt=not training, tokenize=False)
        # what BLIP3o's conversation code renders for that chat
        head = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nPlease generate "
                f"image based on the following caption: {caption}<|im_end|>\n"
                "<|im_start|>assistant\n")
        assert text == head + ("<|im_end|>\n" if training else "")
        return tok(text, add_special_tokens=False)["input_ids"] + [img]

    g = bb.collate(gen).parts[GENERATION]
    training = unpadded(g["input_ids"], g["attention_mask"])
    assert training == [oracle(c, True) for c in captions]
    assert tok.unk_token_id not in sum(training, [])  # every prompt word is in the vocabulary
    states = spy(bb, "_query_states")
    bb.generate(captions, seed=0)
    assert unpadded(*states[0]) == [oracle(c, False) for c in captions]
    # Qwen2.5-VL's template adds its default system turn to a chat without one
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")


# ------------------------------------------------------------------ which samples train what
def test_queries_are_trained_and_weighed_by_generation_only(samples):
    bb = tiny()
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    assert ad.layout.sample_keys("alignment") == (GENERATION,)
    assert ad.layout.sample_keys("language") == (UNDERSTANDING,)
    und = ClientData(0, [s for s in samples if s.task == UNDERSTANDING])
    gen = ClientData(1, generation(samples))
    both = ClientData(2, list(samples))
    # an understanding-only client neither trains nor uploads the queries
    assert und.groups_with_data(ad) == ["vision", "language"]
    assert gen.groups_with_data(ad) == ["generation", "alignment"]
    assert both.groups_with_data(ad) == ["vision", "language", "generation", "alignment"]
    bb = tiny()
    bb.generation_trains_language = True
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    assert ad.layout.sample_keys("language") == (UNDERSTANDING, GENERATION)
    assert ClientData(1, generation(samples)).groups_with_data(ad) == [
        "language", "generation", "alignment"]


def _generation_grads(bb: Blip3oBackbone, samples) -> tuple[LoraAdapters, dict]:
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    with torch.no_grad():  # non-zero B factors: every LoRA factor could get a gradient
        for k in ad.params:
            if "lora_B" in k:
                ad.params[k].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    bb.loss(bb.collate(generation(samples)))[GENERATION].backward()
    return ad, {k: p.grad for k, p in ad.params.items()}


def test_generation_trains_the_dit_projection_and_queries_not_the_language_model(samples):
    ad, grads = _generation_grads(tiny(), samples)
    # the queries, the caption projection and the DiT (its cross-attention blocks wait behind
    # Lumina-Next's zero-initialised gates, so their first gradients are zero)
    learn = [k for k in ad.params if "queries" in k or "caption_projection" in k
             or ".attn1." in k or "feed_forward" in k]
    assert {ad.group_of(k) for k in learn} == {"generation", "alignment"}
    assert any("queries" in k for k in learn) and any("caption_projection" in k for k in learn)
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in learn)
    assert all(grads[k] is None for k in ad.keys("language"))  # BLIP3o: the MLLM is frozen
    assert all(ad.params[k].requires_grad for k in ad.keys("language"))  # flags restored
    bb = tiny()
    bb.generation_trains_language = True
    ad, grads = _generation_grads(bb, samples)
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in ad.keys("language"))


def test_the_config_key_reaches_the_backbone_before_its_adapters():
    from fedumm.runtime.experiment import build_adapters, load_backbone

    base = ["backbone.kind=blip3o", "backbone.preset=tiny", "backbone.device=cpu"]
    for value, language_by in (("false", (UNDERSTANDING,)),
                               ("true", (UNDERSTANDING, GENERATION))):
        cfg = config_from_dict({}, [*base, f"lora.generation_trains_language={value}"])
        backbone = load_backbone(cfg)
        ad = build_adapters(cfg, backbone)
        assert backbone.generation_trains_language is (value == "true")
        assert ad.layout.modalities("language") == language_by


# ------------------------------------------------------------------ understanding images
def _image_samples(shapes: list[tuple[int, int]]) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(id=f"u{i}", task=UNDERSTANDING, text="what shape is it?",
                   image=ImageRef(array=rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                   answer="circle") for i, (h, w) in enumerate(shapes)]


def _qwen_processor(min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                    patch_size=14, merge_size=2, temporal_patch_size=2)


def test_understanding_images_keep_their_aspect_ratio_as_qwens_processor_does():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    bb = tiny()
    lo, hi = bb.dims.min_pixels, bb.dims.max_pixels
    assert lo < hi
    sizes = [(48, 48), (30, 90), (200, 120)]  # square, wide and tall, small and large
    batch = _image_samples(sizes)
    u = bb.collate(batch).parts[UNDERSTANDING]
    oracle = _qwen_processor(lo, hi)
    expected = [oracle(images=[s.load_image()], return_tensors="pt") for s in batch]
    torch.testing.assert_close(u["pixel_values"],
                               torch.cat([e["pixel_values"] for e in expected]),
                               rtol=0, atol=0)
    grid = u["image_grid_thw"]
    assert torch.equal(grid, torch.cat([e["image_grid_thw"] for e in expected]))
    for (h, w), row in zip(sizes, grid.tolist(), strict=True):
        rh, rw = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert row == [1, rh // 14, rw // 14] and lo <= rh * rw <= hi
    assert len({tuple(r) for r in grid.tolist()}) == 3  # one batch, three image sizes
    pads = (u["input_ids"] == bb.ids["image"]).sum(1)
    assert pads.tolist() == (grid.prod(-1) // 4).tolist()  # merged 2x2 patches per image
    assert bb.loss(bb.collate(batch))[UNDERSTANDING].isfinite()
    answers = bb.answer([s.load_image() for s in batch], [s.text for s in batch])
    assert len(answers) == 3


def test_the_pixel_bounds_are_the_folders_and_default_to_blip3os_evaluation(tmp_path):
    from fedumm.models.blip3o.presets import EVAL_MAX_PIXELS, EVAL_MIN_PIXELS

    assert (EVAL_MIN_PIXELS, EVAL_MAX_PIXELS) == (200_704, 1_605_632)
    folder = tiny().save(tmp_path / "ck")
    (folder / "SHA256SUMS.json").unlink()  # the config is edited by hand below
    config = json.loads((folder / "config.json").read_text())
    assert (config["min_pixels"], config["max_pixels"]) == (56 * 56, 112 * 112)

    def load(path):
        return build_backbone(BackboneConfig(kind="blip3o", path=str(path), device="cpu"))

    config.update(min_pixels=28 * 28, max_pixels=84 * 84)
    (folder / "config.json").write_text(json.dumps(config))
    bb = load(folder)
    batch = _image_samples([(30, 90)])
    u = bb.collate(batch).parts[UNDERSTANDING]
    want = _qwen_processor(28 * 28, 84 * 84)(images=[batch[0].load_image()], return_tensors="pt")
    assert torch.equal(u["pixel_values"], want["pixel_values"])
    assert torch.equal(u["image_grid_thw"], want["image_grid_thw"])
    published = tmp_path / "published"  # a BLIP3o folder has no such keys
    shutil.copytree(folder, published)
    del config["min_pixels"], config["max_pixels"]
    (published / "config.json").write_text(json.dumps(config))
    size = load(published).processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (EVAL_MIN_PIXELS, EVAL_MAX_PIXELS)

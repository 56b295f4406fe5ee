"""The Janus backbone against Janus-Pro's official code (github.com/deepseek-ai/Janus) and
transformers' Janus processor, with oracles from outside fedumm:

* understanding prompts: transformers' ``JanusProcessor.apply_chat_template`` on the same
  conversation, with the default system prompt the converted processors add, over a
  byte-level BPE tokenizer (where " red" and "red" are different tokens); and the template's
  text against DeepSeek's ``deepseek`` conversation (``janus/utils/conversation.py``,
  ``Conversation.get_prompt``; ``VLChatProcessor.system_prompt``) transcribed here;
* the image-generation prompt as ``generation_inference.py`` builds it (no system prompt,
  ``<begin_of_image>`` last; the unconditional branch keeps BOS and BOI only);
* generation targets: short side resized, centre crop (hand-computed crops);
* VQ codes: ``janus/models/vq_model.py``'s ``VectorQuantizer.forward`` with ``l2_norm``,
  transcribed here, on a codebook whose rows have different norms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.data.records import ImageRef, Sample
from fedumm.models.janus import BOI, EOI, IMAGE, JanusBackbone
from fedumm.models.janus.assembly import CHAT_TEMPLATE, set_generation_config
from fedumm.models.janus.presets import preset_config, tiny_dims
from fedumm.models.janus.targets import centre_crop, target_pixels, vq_codes
from fedumm.models.protocol import GENERATION, UNDERSTANDING

# VLChatProcessor.system_prompt (janus/models/processing_vlm.py)
OFFICIAL_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                   "the visual content that the user provides, and assist the user with a "
                   "variety of tasks using natural language.")
USER, ASSISTANT, EOS = "<|User|>", "<|Assistant|>", "<eos>"


def deepseek_prompt(system: str, messages: list[tuple[str, str | None]]) -> str:
    """DeepSeek's ``deepseek`` conversation (sep "\\n\\n", sep2 EOS), as ``get_prompt`` and
    ``apply_sft_template_for_multi_turn_prompts`` (which strips) write it."""
    seps = ("\n\n", EOS)
    out = system + seps[0] if system else ""
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return out.strip()


def bpe_processor(num_image_tokens: int):
    """A JanusProcessor laid out as a converted checkpoint's, over a byte-level BPE tokenizer
    trained here on ShapesWorld text and the system prompt, BOS first as DeepSeek's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import JanusImageProcessorPil, JanusProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", EOS, IMAGE, BOI, EOI, USER, ASSISTANT]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    data = shapes_samples(generate_shapes("base", 12, seed=1, image_size=32))
    corpus = [OFFICIAL_SYSTEM] + [f"{s.text} {s.answer}" for s in data]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = TemplateProcessing(single="<bos> $A",
                                            special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token=EOS, pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})
    images = JanusImageProcessorPil(size={"height": 32, "width": 32},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(images, fast, chat_template=CHAT_TEMPLATE,
                          use_default_system_prompt=True, num_image_tokens=num_image_tokens)


@pytest.fixture(scope="module")
def bpe_backbone() -> JanusBackbone:
    from transformers import JanusForConditionalGeneration

    processor = bpe_processor(tiny_dims()["vision"]["num_image_tokens"])
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(
        preset_config("tiny", len(tok), tok.convert_tokens_to_ids(IMAGE))).eval()
    set_generation_config(model, tok)
    return JanusBackbone(model, processor)


@pytest.fixture(scope="module")
def questions() -> list[Sample]:
    rng = np.random.default_rng(0)
    und = [s for s in shapes_samples(generate_shapes("base", 6, seed=2, image_size=32))
           if s.task == UNDERSTANDING][:4]
    # other shapes than the model's, one without an image (the processor letterboxes them)
    shapes = [(24, 40), (40, 28), (32, 32)]
    out = [Sample(id=s.id, task=UNDERSTANDING, text=s.text, answer=s.answer,
                  image=ImageRef(array=rng.integers(0, 256, (*hw, 3), dtype=np.uint8)))
           for s, hw in zip(und, shapes, strict=False)]
    return out + [Sample(id="no-image", task=UNDERSTANDING, text=und[3].text, image=None,
                         answer=und[3].answer)]


def conversation(s: Sample, answer: bool) -> list[dict]:
    content = ([] if s.image is None else [{"type": "image", "image": s.load_image()}])
    chat = [{"role": "user", "content": content + [{"type": "text", "text": s.text}]}]
    if answer:
        chat.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
    return chat


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


# ------------------------------------------------------------------ understanding prompts
def test_the_template_writes_deepseeks_conversation_with_its_system_prompt(bpe_backbone):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    proc = bpe_backbone.processor
    assert DEFAULT_SYSTEM_PROMPT == OFFICIAL_SYSTEM + "\n\n" and proc.use_default_system_prompt
    user = f"{IMAGE}\nwhat color is the circle?"  # inference.py's content: image, then text
    chat = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "what color is the circle?"}]}]
    answered = chat + [{"role": "assistant", "content": [{"type": "text", "text": " red "}]}]
    # training text: the answer's turn closed by EOS (the caller adds the last EOS)
    assert (DEFAULT_SYSTEM_PROMPT + proc.apply_chat_template(answered) + EOS
            == deepseek_prompt(OFFICIAL_SYSTEM, [(USER, user), (ASSISTANT, "red")]))
    # the answer prompt, and the image-generation prompt (no system prompt)
    assert (DEFAULT_SYSTEM_PROMPT + proc.apply_chat_template(chat, add_generation_prompt=True)
            == deepseek_prompt(OFFICIAL_SYSTEM, [(USER, user), (ASSISTANT, None)]))
    two = answered + [{"role": "user", "content": [{"type": "text", "text": "and the square?"}]}]
    assert proc.apply_chat_template(two, add_generation_prompt=True) == deepseek_prompt(
        "", [(USER, user), (ASSISTANT, "red"), (USER, "and the square?"), (ASSISTANT, None)])


def test_understanding_ids_and_loss_mask_are_the_processors_chat_template(bpe_backbone,
                                                                          questions):
    proc, tok = bpe_backbone.processor, bpe_backbone.tokenizer
    u = bpe_backbone.collate(questions).parts[UNDERSTANDING]
    rows = unpadded(u["input_ids"], u["attention_mask"])
    for s, row, labels in zip(questions, rows, u["labels"], strict=True):
        full = proc.apply_chat_template(conversation(s, True), tokenize=True)[0].tolist()
        prompt = proc.apply_chat_template(conversation(s, False), add_generation_prompt=True,
                                          tokenize=True)[0].tolist()
        assert row == full + [tok.eos_token_id] and row[:len(prompt)] == prompt
        assert row[:len(tok(OFFICIAL_SYSTEM)["input_ids"])] == tok(OFFICIAL_SYSTEM)["input_ids"]
        supervised = [i for i, v in enumerate(labels.tolist()) if v != -100]
        assert supervised == list(range(len(prompt), len(row)))
        answer = row[len(prompt):-1]
        # the answer as the template places it: " red", not "red" tokenised on its own
        assert tok.convert_ids_to_tokens(answer)[0].startswith("Ġ")
        assert answer != tok(s.answer, add_special_tokens=False)["input_ids"]
    pixels = proc(text=[proc.apply_chat_template(conversation(s, False))
                        for s in questions if s.image is not None],
                  images=[s.load_image() for s in questions if s.image is not None],
                  return_tensors="pt")["pixel_values"]
    assert torch.equal(u["pixel_values"], pixels)


def test_answer_prompts_are_the_processors(bpe_backbone, questions):
    """``answer`` reads the same prompt ids (left-padded) as ``apply_chat_template`` gives."""
    proc = bpe_backbone.processor
    ids, _ = bpe_backbone._prompt_ids([s.text for s in questions],
                                      [s.load_image() if s.image else None for s in questions])
    for s, row in zip(questions, ids, strict=True):
        assert row == proc.apply_chat_template(conversation(s, False), tokenize=True,
                                               add_generation_prompt=True)[0].tolist()


def test_generation_prompts_are_generation_inferences(bpe_backbone):
    tok = bpe_backbone.tokenizer
    prompts = ["a red circle left of a blue square", "two green triangles"]
    g = bpe_backbone.collate([Sample(id=str(i), task=GENERATION, text=p,
                                     image=ImageRef(array=np.zeros((32, 32, 3), np.uint8)))
                              for i, p in enumerate(prompts)], drop_text=[False, True]).parts
    rows = unpadded(g[GENERATION]["p_ids"], g[GENERATION]["p_mask"])
    official = tok(deepseek_prompt("", [(USER, prompts[0]), (ASSISTANT, "")]) + BOI)["input_ids"]
    assert rows[0] == official and official[0] == tok.bos_token_id
    # the unconditional branch: tokens[1:-1] = pad_id on the same prompt length
    dropped = tok(deepseek_prompt("", [(USER, prompts[1]), (ASSISTANT, "")]) + BOI)["input_ids"]
    assert rows[1] == [dropped[0]] + [tok.pad_token_id] * (len(dropped) - 2) + [dropped[-1]]


# ------------------------------------------------------------------ generation targets
def test_generation_targets_are_centre_crops_not_letterboxes():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    assert np.array_equal(centre_crop(wide, 32), wide[:, 8:40])  # short side already 32
    assert np.array_equal(centre_crop(tall, 32), tall[8:40])
    px = target_pixels([wide, tall], 32)
    assert px.shape == (2, 3, 32, 32)
    assert torch.allclose(px[0], torch.from_numpy(wide[:, 8:40]).permute(2, 0, 1) / 127.5 - 1)
    # halved to 32 x 48 first: the red band (columns 0-7 of 96 -> 0-3 of 48) is cropped away,
    # and no grey padding appears
    big = np.zeros((64, 96, 3), np.uint8)
    big[..., 2] = 200
    big[:, :8] = (255, 0, 0)
    crop = centre_crop(big, 32)
    assert crop.shape == (32, 32, 3) and np.all(crop == (0, 0, 200))


# ------------------------------------------------------------------ VQ codes
def official_lookup(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """vq_model.py ``VectorQuantizer.forward`` with ``l2_norm=True``: (B*h*w,) indices."""
    z = torch.einsum("b c h w -> b h w c", z).contiguous()
    z_flattened = F.normalize(z.view(-1, codebook.shape[1]), p=2, dim=-1)
    embedding = F.normalize(codebook, p=2, dim=-1)
    d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1)
         - 2 * torch.einsum("bd,dn->bn", z_flattened, torch.einsum("n d -> d n", embedding)))
    return torch.argmin(d, dim=1)


def test_vq_codes_are_the_official_l2_normalised_lookup():
    from fedumm.config import BackboneConfig
    from fedumm.models.kinds import build_backbone

    bb = build_backbone(BackboneConfig(kind="janus", preset="tiny", device="cpu"))
    vq = bb._janus.model.vqmodel
    with torch.no_grad():  # rows of very different norms: the raw lookup would favour some
        book = vq.quantize.embedding.weight
        book.mul_(torch.logspace(-2, 2, book.shape[0])[torch.randperm(book.shape[0])][:, None])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    samples = [Sample(id=f"g{i}", task=GENERATION, text="a red circle",
                      image=ImageRef(array=im)) for i, im in enumerate(images)]
    calls: list[tuple[int, int]] = []
    bb.prepare(samples, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 3)]
    codes = bb.collate(samples).parts[GENERATION]["codes"]
    pixels = target_pixels(images, bb.image_size)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(pixels))
        expected = official_lookup(z, vq.quantize.embedding.weight).view(len(images), -1)
        raw = vq.encode(pixels).image_tokens.view(len(images), -1)
        assert torch.equal(codes, expected) and torch.equal(vq_codes(vq, pixels), expected)
    assert not torch.equal(raw, expected)  # transformers' encode looks up the raw vectors


# ------------------------------------------------------------------ preparation progress
def test_prepare_reports_progress_through_the_protocol(monkeypatch):
    from fedumm.models.janus import backbone as janus_backbone
    from fedumm.models.protocol import prepare_samples

    class Legacy:  # a user's backbone written before ``progress`` existed
        def prepare(self, samples):
            self.seen = len(samples)

    old = Legacy()
    prepare_samples(old, [1, 2], progress=lambda *_: pytest.fail("no progress expected"))
    assert old.seen == 2

    from fedumm.config import BackboneConfig
    from fedumm.models.kinds import build_backbone

    monkeypatch.setattr(janus_backbone, "_CODE_CHUNK", 2)
    bb = build_backbone(BackboneConfig(kind="janus", preset="tiny", device="cpu"))
    data = shapes_samples(generate_shapes("base", 5, seed=0, image_size=32))
    n = sum(s.task == GENERATION for s in data)
    calls: list[tuple[int, int]] = []
    prepare_samples(bb, data, lambda done, total: calls.append((done, total)))
    assert calls == [(min(i, n), n) for i in range(2, n + 2, 2)]
    calls.clear()
    prepare_samples(bb, data, lambda done, total: calls.append((done, total)))
    assert calls == []  # nothing left to encode

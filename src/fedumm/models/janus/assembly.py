"""Janus-Pro's parts that fedumm assembles itself: the special tokens and chat template its
prompts use, a small processor for the ``tiny`` preset, and the generation config that
``generate(generation_mode="image")`` needs on a model built in code. The model itself is
transformers' ``JanusForConditionalGeneration`` (a config from :mod:`.presets`, or a folder
through :mod:`.checkpoint`)."""

from __future__ import annotations

BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|User|>' if m['role'] == 'user' else '<|Assistant|>' }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


def tiny_processor(image_size: int, num_image_tokens: int):
    """A JanusProcessor with a small word-level tokenizer (ShapesWorld's words) built in code."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import JanusImageProcessorPil, JanusProcessor, PreTrainedTokenizerFast

    from fedumm.models.reference.text_tokenizer import world_vocabulary

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", IMAGE, BOI, EOI, "<|User|>",
                "<|Assistant|>"]
    words = specials + [":", ",", ".", "?"] + world_vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE, "boi_token": BOI,
                                                 "eoi_token": EOI})
    images = JanusImageProcessorPil(size={"height": image_size, "width": image_size},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return JanusProcessor(images, fast, chat_template=CHAT_TEMPLATE,
                          num_image_tokens=num_image_tokens)


def set_generation_config(model, tokenizer) -> None:
    """What ``generate(generation_mode="image")`` needs, for models built here (a published
    checkpoint ships its own ``generation_config.json``)."""
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}

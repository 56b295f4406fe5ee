"""Janus-Pro's parts that fedumm assembles itself: the special tokens and chat template its
prompts use, a small processor for the ``tiny`` preset, and the generation config that
``generate(generation_mode="image")`` needs on a model built in code. The model itself is
transformers' ``JanusForConditionalGeneration`` (a config from :mod:`.presets`, or a folder
through :mod:`.checkpoint`)."""

from __future__ import annotations

BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
# the role markers of DeepSeek's conversation, which the chat template writes
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
# DeepSeek's "deepseek" conversation (janus/utils/conversation.py, ``get_prompt``) as the
# converted checkpoints' template renders it: "<|User|>: {content}\n\n", "<|Assistant|>:
# {answer}" and EOS between turns (after the last turn the caller adds it), "<|Assistant|>:" to
# prompt an answer; each message stripped, an image as "<image_placeholder>\n" before its text.
# The system prompt is the processor's (``use_default_system_prompt``), not the template's.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|User|>: ' if m['role'] == 'user' else '<|Assistant|>: ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% else %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% if not loop.last or add_generation_prompt %}"
    "{{ '\\n\\n' if m['role'] == 'user' else eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


def tiny_processor(image_size: int, num_image_tokens: int):
    """A JanusProcessor laid out as the converted checkpoints' (BOS first, the default system
    prompt on understanding prompts, :data:`CHAT_TEMPLATE`) with a small word-level tokenizer
    (ShapesWorld's and the system prompt's words) built in code."""
    import re

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import JanusImageProcessorPil, JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    from fedumm.models.reference.text_tokenizer import world_vocabulary

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", IMAGE, BOI, EOI, USER, ASSISTANT]
    system = re.findall(r"\w+|[^\w\s]+", DEFAULT_SYSTEM_PROMPT.lower())  # Whitespace's split
    words = specials + [":", ",", ".", "?"] + world_vocabulary() + system
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<bos> $A",
                                            special_tokens=[("<bos>", vocab["<bos>"])])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE, "boi_token": BOI,
                                                 "eoi_token": EOI})
    images = JanusImageProcessorPil(size={"height": image_size, "width": image_size},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return JanusProcessor(images, fast, chat_template=CHAT_TEMPLATE,
                          use_default_system_prompt=True, num_image_tokens=num_image_tokens)


def set_generation_config(model, tokenizer) -> None:
    """What ``generate(generation_mode="image")`` needs, for models built here (a published
    checkpoint ships its own ``generation_config.json``)."""
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}

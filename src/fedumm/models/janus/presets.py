"""Dimensions of Janus-Pro at its named sizes (``backbone.preset``).

``janus-pro-1b`` / ``janus-pro-7b`` are the published configs: a DeepSeek-LLM decoder,
SigLIP-L/16 at 384 px (576 image tokens) and a 16384-code VQ tokenizer with 8-d codes.
``tiny`` is the same architecture small enough to train in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

PRESETS = ("tiny", "janus-pro-1b", "janus-pro-7b")


def tiny_dims() -> dict[str, Any]:
    """The ``tiny`` preset's text, vision and VQ config keys."""
    return {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256),
            "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, num_image_tokens=16, projection_dim=64,
                           depth=2),
            "vq": dict(embed_dim=4, num_embeddings=64, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, projection_dim=64,
                       image_token_embed_dim=64, num_hidden_layers=2)}


def _published_dims(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {"text": dict(vocab_size=102400, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=16384),
            "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16, num_image_tokens=576,
                           projection_dim=hidden, depth=2),
            "vq": dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden,
                       image_token_embed_dim=hidden)}


def preset_dims(name: str) -> dict[str, Any]:
    """The text, vision and VQ config keys a named preset sets (the rest are transformers'
    defaults)."""
    if name == "tiny":
        return tiny_dims()
    if name == "janus-pro-1b":
        return _published_dims(2048, 5632, 24, 16)
    if name == "janus-pro-7b":
        return _published_dims(4096, 11008, 30, 32)
    raise ValueError(f"backbone.preset={name!r}: the janus backbone has presets "
                     f"{list(PRESETS)}")


def preset_config(name: str, vocab_size: int | None = None, image_token_id: int | None = None):
    """A ``JanusConfig`` at a named size; ``vocab_size`` / ``image_token_id`` override the
    preset's (a tokenizer built in code)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    dims = preset_dims(name)
    text = dict(dims["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    extra = {} if image_token_id is None else {"image_token_id": image_token_id}
    # Janus-Pro keeps a separate LM head (not tied to the input embeddings)
    return JanusConfig(text_config=LlamaConfig(**text),
                       vision_config=JanusVisionConfig(**dims["vision"]),
                       vq_config=JanusVQVAEConfig(**dims["vq"]), tie_word_embeddings=False,
                       **extra)

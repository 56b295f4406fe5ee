"""Dimensions of the BLIP3o-style model at its named sizes (``backbone.preset``).

``blip3o-8b`` / ``blip3o-4b`` are BLIP3o's published recipe (JiuhaiChen/BLIP3o): Qwen2.5-VL-7B /
-3B-Instruct, 64 learnable queries, a Lumina-Next DiT (dim 1792, 24 layers, 28 heads, 8x8 input
tokens of 1792-d features) and EVA-CLIP-E-14-plus targets (448 px, 32x32 patches average-pooled
4x4 to 8x8). ``tiny`` is the same architecture at a few hundred thousand parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRESETS = ("tiny", "blip3o-4b", "blip3o-8b")
# the pixel bounds BLIP3o evaluates understanding at (its lmms-eval model, eval/lmms-eval/
# lmms_eval/models/blip3o.py: min_pixels 256 * 28 * 28, max_pixels 1605632 = 2048 * 28 * 28)
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = 256 * 28 * 28, 2048 * 28 * 28


@dataclass(frozen=True)
class Blip3oDims:
    """Everything needed to build the model without weights."""

    text: dict[str, Any]  # Qwen2.5-VL text config
    vision: dict[str, Any]  # Qwen2.5-VL vision config (understanding)
    tie_word_embeddings: bool
    n_query: int  # learnable query tokens after the prompt
    dit: dict[str, Any]  # LuminaNextDiT2DModel: hidden_size, num_layers, heads, kv heads
    target: dict[str, Any]  # the vision target encoder (SiglipVisionConfig keys)
    pool: int  # average pooling of the target encoder's patch grid
    rope_len: int = 384  # rotary table of the DiT (BLIP3o: 384 x 384)
    # understanding images keep their aspect ratio and are resized by Qwen2.5-VL's processor
    # (``smart_resize``) to between min_pixels and max_pixels, sides multiples of 28
    min_pixels: int = EVAL_MIN_PIXELS
    max_pixels: int = EVAL_MAX_PIXELS

    @property
    def grid(self) -> int:
        """Side of the DiT's token grid (target patches after pooling)."""
        return self.target["image_size"] // self.target["patch_size"] // self.pool

    @property
    def feature_dim(self) -> int:
        return int(self.target["hidden_size"])


def _qwen(hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int
          ) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [16, 24, 24]})


_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31])
# EVA-CLIP-E-14-plus's dimensions (a SigLIP vision tower of that size stands in for it)
_EVA_E = dict(hidden_size=1792, intermediate_size=15360, num_hidden_layers=64,
              num_attention_heads=16, image_size=448, patch_size=14)
_DIT = dict(hidden_size=1792, num_layers=24, num_attention_heads=28, num_kv_heads=28)


def preset_dims(name: str) -> Blip3oDims:
    """The dimensions of a named preset."""
    if name == "tiny":
        return Blip3oDims(
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                       "mrope_section": [2, 3, 3]}),
            vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                        window_size=56, fullatt_block_indexes=[1]),
            tie_word_embeddings=True, n_query=8,
            dit=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=4),
            # 48 px ShapesWorld images: 6x6 patches of 8 px, pooled 2x2 to the 3x3 scene grid
            target=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, image_size=48, patch_size=8),
            pool=2, rope_len=32, min_pixels=56 * 56, max_pixels=112 * 112)
    if name == "blip3o-8b":  # Qwen2.5-VL-7B-Instruct (untied LM head), 3 added tokens
        return Blip3oDims(text=_qwen(3584, 18944, 28, 28, 4, 151668), vision=_QWEN_VISION,
                          tie_word_embeddings=False, n_query=64, dit=_DIT, target=_EVA_E,
                          pool=4)
    if name == "blip3o-4b":  # Qwen2.5-VL-3B-Instruct (tied embeddings)
        return Blip3oDims(text=_qwen(2048, 11008, 36, 16, 2, 151668), vision=_QWEN_VISION,
                          tie_word_embeddings=True, n_query=64, dit=_DIT, target=_EVA_E,
                          pool=4)
    raise ValueError(f"backbone.preset={name!r}: the blip3o backbone has presets "
                     f"{list(PRESETS)}")

"""The BLIP3o-style model assembled from stock parts.

* ``qwen``: transformers' ``Qwen2_5_VLForConditionalGeneration`` (understanding, and the
  backbone whose hidden states at the learnable queries condition generation);
* ``queries``: the learnable query tokens (an embedding table, so PEFT can train it in full);
* ``caption_projection``: LLM hidden size -> DiT width (BLIP3o keeps it inside its DiT;
  diffusers' ``PixArtAlphaTextProjection``, the same Linear-GELU(tanh)-Linear);
* ``dit``: diffusers' ``LuminaNextDiT2DModel`` (BLIP3o's DiT is a patched copy of it; with
  ``cross_attention_dim`` = its width, the stock class has the same layers), trained with
  flow matching on the target encoder's features;
* ``target_encoder``: the frozen vision model whose pooled patch features the DiT learns to
  produce. BLIP3o uses EVA-CLIP-E-14-plus, which transformers does not ship; a SigLIP vision
  tower (``SiglipVisionModel``) stands in for it;
* ``decoder``: features -> pixels. BLIP3o uses a separate diffusion decoder; here a linear
  patch decoder, fitted by least squares (:func:`fit_patch_decoder`);
* the components around the model: Qwen2.5-VL's image processor (aspect ratio kept, pixel
  count bounded), a word-level tokenizer for the ``tiny`` preset (with Qwen2.5-VL's special
  tokens, BLIP3o's ``[IMG]`` and Qwen's chat template), and the sampling scheduler
  (diffusers' ``FlowMatchEulerDiscrete``, given to the backbone as diffusers pipelines are
  given theirs).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from fedumm.models.blip3o.presets import Blip3oDims

# Qwen2.5-VL's special tokens that fedumm's prompts use, and the one BLIP3o adds and puts
# before the queries (its train.py adds [IMG], [/IMG] and <image>; only [IMG] enters a prompt)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "[IMG]")
IMAGE_PAD, IMG_START = "<|image_pad|>", "[IMG]"
# BLIP3o's generation prompt: Qwen's system prompt, then this user turn (train.py's T2I
# conversation; inference.py, eval/geneval/generate.py)
SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_INSTRUCTION = "Please generate image based on the following caption: "
# Qwen2.5-VL's chat template for what fedumm sends: text and image parts, and Qwen's default
# system turn when the messages have none
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGET_MEAN = TARGET_STD = 0.5  # SigLIP's normalisation of the target encoder's input


NO_GENERATION = (
    "this BLIP3o checkpoint has no target encoder / patch decoder that fedumm can load "
    "(BLIP3o's EVA-CLIP-E and diffusion decoder are not in transformers / diffusers), so it "
    "trains and answers understanding only: add target_encoder/ and patch_decoder.safetensors "
    "to the folder (see fedumm.models.blip3o.checkpoint), or use data without generation "
    "samples")


class PatchDecoder(nn.Module):
    """Target features (B, C, g, g) -> pixels (B, 3, g*p, g*p) in [0, 1]: one linear map per
    token from its feature to its p x p patch."""

    def __init__(self, feature_dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(feature_dim, 3 * patch * patch)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, g, _ = features.shape
        p = self.patch
        x = self.proj(features.flatten(2).transpose(1, 2))  # (B, g*g, 3*p*p)
        x = x.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)
        return x.clamp(0, 1)


class Blip3oModel(nn.Module):
    """What PEFT wraps: the module names here are what the adapter groups match."""

    def __init__(self, qwen: nn.Module, dit: nn.Module, dims: Blip3oDims,
                 target_encoder: nn.Module | None, decoder: PatchDecoder | None) -> None:
        from diffusers.models.embeddings import PixArtAlphaTextProjection

        super().__init__()
        hidden = dims.text["hidden_size"]
        width = dims.dit["hidden_size"]
        self.qwen = qwen
        self.queries = nn.Embedding(dims.n_query, hidden)
        self.caption_projection = PixArtAlphaTextProjection(hidden, width, act_fn="gelu_tanh")
        self.dit = dit
        self.target_encoder = target_encoder
        self.decoder = decoder
        self.dims = dims

    @torch.no_grad()
    def target_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Target encoder patch features, average-pooled: (B, C, g, g)."""
        if self.target_encoder is None:
            raise ValueError(NO_GENERATION)
        h = self.target_encoder(pixel_values=pixels).last_hidden_state  # (B, n*n, C)
        n = int(round(h.shape[1] ** 0.5))
        h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], n, n)
        return F.avg_pool2d(h, self.dims.pool) if self.dims.pool > 1 else h


def special_token_ids(tok) -> dict[str, int]:
    """The ids of the special tokens the model config and the prompts need."""
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image", IMAGE_PAD), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"),
        ("img_start", IMG_START))}
    if IMG_START not in tok.get_vocab():
        raise ValueError(f"the tokenizer has no {IMG_START} token, which BLIP3o puts before "
                         "the learnable queries (BLIP3o's training adds it to Qwen2.5-VL's "
                         "tokenizer: is this a plain Qwen2.5-VL tokenizer?)")
    ids["bos"] = tok.bos_token_id
    return ids


def tiny_tokenizer():
    """A word-level tokenizer over ShapesWorld's words with Qwen2.5-VL's special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from fedumm.models.reference.text_tokenizer import world_vocabulary

    prompt_words = re.findall(r"\w+", f"{SYSTEM_PROMPT} {GENERATION_INSTRUCTION}".lower())
    words = [*SPECIALS, "<unk>", ":", ",", ".", "?", "user", "assistant", "system",
             *prompt_words, *world_vocabulary()]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))},
                              unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([*SPECIALS, "<unk>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor(dims: Blip3oDims):
    """Qwen2.5-VL's image processor: each image keeps its aspect ratio and is resized to
    between ``dims.min_pixels`` and ``dims.max_pixels`` (``smart_resize``)."""
    from transformers import Qwen2VLImageProcessorPil

    v = dims.vision
    return Qwen2VLImageProcessorPil(min_pixels=dims.min_pixels, max_pixels=dims.max_pixels,
                                    patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                    temporal_patch_size=v["temporal_patch_size"])


def flow_scheduler():
    """The sampling scheduler: Euler steps of the flow-matching ODE (diffusers' default
    ``FlowMatchEulerDiscreteScheduler``; the backbone sets its sigmas per call)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def qwen_config(dims: Blip3oDims, token_ids: dict[str, int], vocab_size: int | None = None):
    from transformers import Qwen2_5_VLConfig

    text = {**dims.text, **({"vocab_size": vocab_size} if vocab_size else {}),
            "bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids["eos"],
            "pad_token_id": token_ids["pad"]}
    vision = {**dims.vision, "out_hidden_size": dims.text["hidden_size"]}
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=dims.tie_word_embeddings,
        image_token_id=token_ids["image"], video_token_id=token_ids["video"],
        vision_start_token_id=token_ids["vision_start"],
        vision_end_token_id=token_ids["vision_end"])


def build_parts(dims: Blip3oDims, token_ids: dict[str, int], vocab_size: int | None = None
                ) -> Blip3oModel:
    """The model with random weights (call under ``torch.device("meta")`` to count only);
    ``vocab_size`` overrides the preset's (a tokenizer built in code)."""
    from diffusers import LuminaNextDiT2DModel
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    qwen = Qwen2_5_VLForConditionalGeneration(qwen_config(dims, token_ids, vocab_size))
    d = dims.dit
    dit = LuminaNextDiT2DModel(
        sample_size=dims.grid, patch_size=1, in_channels=dims.feature_dim,
        hidden_size=d["hidden_size"], num_layers=d["num_layers"],
        num_attention_heads=d["num_attention_heads"], num_kv_heads=d["num_kv_heads"],
        learn_sigma=False, qk_norm=True, cross_attention_dim=d["hidden_size"])
    if dit.pad_token.device.type != "meta":
        nn.init.zeros_(dit.pad_token)  # diffusers leaves it uninitialised (torch.empty)
    target = SiglipVisionModel(SiglipVisionConfig(**dims.target))
    patch = dims.target["image_size"] // dims.grid
    return Blip3oModel(qwen, dit, dims, target, PatchDecoder(dims.feature_dim, patch))


@torch.no_grad()
def fit_patch_decoder(model: Blip3oModel, images: torch.Tensor, pixels: torch.Tensor) -> float:
    """Least-squares fit of the patch decoder on (images in [0, 1] as (B, 3, S, S), the same
    images as the target encoder's normalised input). Returns the mean squared pixel error."""
    dec = model.decoder
    feats = model.target_features(pixels)  # (B, C, g, g)
    b, c, g, _ = feats.shape
    p = dec.patch
    x = feats.flatten(2).transpose(1, 2).reshape(-1, c)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = images.view(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, 3 * p * p)
    x, y = x.double(), y.double()
    # ridge normal equations: a Cholesky solve, bit-reproducible (LAPACK's lstsq was not)
    gram = x.T @ x + 1e-6 * torch.eye(x.shape[1], dtype=x.dtype)
    sol = torch.cholesky_solve(x.T @ y, torch.linalg.cholesky(gram)).float()  # (C+1, 3*p*p)
    dec.proj.weight.copy_(sol[:-1].T)
    dec.proj.bias.copy_(sol[-1])
    return float(((dec(feats) - images) ** 2).mean())

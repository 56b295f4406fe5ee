"""Janus-Pro behind the Backbone protocol (``backbone.kind=janus``), through transformers.

``backbone.path`` is a local folder in the Hugging Face layout (``config.json``, the weights,
the tokenizer and ``preprocessor_config.json``), loaded with
``JanusForConditionalGeneration`` and ``JanusProcessor``; ``backbone.preset`` builds an
architecture with random weights instead: ``tiny`` (seconds on a CPU, with a small word-level
tokenizer built in code), ``janus-pro-1b`` and ``janus-pro-7b`` (the published dimensions).

* Understanding: the chat template with the image, then causal-LM cross-entropy on the answer
  tokens (and EOS) only.
* Generation: transformers has no training loss for it. The target image is VQ-encoded with
  the model's own ``vqmodel``; the codes are embedded through ``generation_embeddings`` +
  ``generation_aligner`` after the prompt (which ends in ``<begin_of_image>``), and
  ``generation_head`` predicts each next code (cross-entropy). A dropped prompt (classifier-free
  guidance) keeps only BOS and BOI and pads the rest, as ``generate(generation_mode="image")``
  builds its unconditional branch.
* Adapter groups: ``vision`` (SigLIP encoder attention / MLP and the understanding aligner),
  ``language`` (decoder attention / MLP), ``generation`` (generation head and generation
  aligner), ``alignment``: the text-embedding rows of ``<begin_of_image>`` and
  ``<end_of_image>`` (PEFT trainable tokens). Janus has no learned alignment tokens; these two
  rows are what both tasks pass through between text and image (they frame the image an
  answer reads, and BOI is the position that predicts the first generated code), so they play
  that role.
* Quality for the quality-weighted rule: exact-match answer accuracy on held-out questions;
  teacher-forced top-1 accuracy of the held-out targets' image codes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedumm.data.records import Sample
from fedumm.fl.codec import DTYPES
from fedumm.models.batching import candidate_log_likelihoods, pad_sequences
from fedumm.models.checksums import verify_checksums, write_folder_checksums
from fedumm.models.protocol import (
    GENERATION,
    UNDERSTANDING,
    AdapterGroup,
    Batch,
    DecoderLayers,
    ModelPlacement,
    check_trainable_preset,
    in_eval_mode,
    register_backbone,
    resolve_device,
)

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig

BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
PRESETS = ("tiny", "janus-pro-1b", "janus-pro-7b")
_CODE_CHUNK = 16  # target images VQ-encoded per call while preparing


def _group_regexes() -> dict[str, str]:
    return {
        "vision": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj"
                  r"|projection_layer)|mlp\.fc[12])|model\.aligner\.(fc1|hidden_layers\.\d+)",
        "language": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj"
                    r"|mlp\.(gate|up|down)_proj)",
        "generation": r"model\.generation_head\.(proj_out|vision_head)"
                      r"|model\.generation_aligner\.(fc1|hidden_layers\.\d+)",
    }


def janus_groups(boi_id: int, eoi_id: int) -> tuple[AdapterGroup, ...]:
    rx = _group_regexes()
    return (
        AdapterGroup("vision", rx["vision"], (UNDERSTANDING,), needs_images=True),
        AdapterGroup("language", rx["language"], (UNDERSTANDING, GENERATION)),
        AdapterGroup("generation", rx["generation"], (GENERATION,)),
        AdapterGroup("alignment", None, (UNDERSTANDING, GENERATION),
                     trainable_tokens=(("embed_tokens", (boi_id, eoi_id)),)),
    )


# --------------------------------------------------------------------------- presets

def _tiny_dims() -> dict[str, Any]:
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
    """Janus-Pro's published configs: a DeepSeek-LLM decoder, SigLIP-L/16 at 384 px (576
    image tokens), and a 16384-code VQ tokenizer with 8-d codes."""
    return {"text": dict(vocab_size=102400, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=16384),
            "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16, num_image_tokens=576,
                           projection_dim=hidden, depth=2),
            "vq": dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden,
                       image_token_embed_dim=hidden)}


def preset_config(name: str, vocab_size: int | None = None, image_token_id: int | None = None):
    """A ``JanusConfig`` at a named size."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    if name == "tiny":
        dims = _tiny_dims()
    elif name == "janus-pro-1b":
        dims = _published_dims(2048, 5632, 24, 16)
    elif name == "janus-pro-7b":
        dims = _published_dims(4096, 11008, 30, 32)
    else:
        raise ValueError(f"backbone.preset={name!r}: the janus backbone has presets "
                         f"{list(PRESETS)}")
    text = dict(dims["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    extra = {} if image_token_id is None else {"image_token_id": image_token_id}
    # Janus-Pro keeps a separate LM head (not tied to the input embeddings)
    return JanusConfig(text_config=LlamaConfig(**text),
                       vision_config=JanusVisionConfig(**dims["vision"]),
                       vq_config=JanusVQVAEConfig(**dims["vq"]), tie_word_embeddings=False,
                       **extra)


_CHAT_TEMPLATE = (
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
    return JanusProcessor(images, fast, chat_template=_CHAT_TEMPLATE,
                          num_image_tokens=num_image_tokens)


def _generation_config(model, tokenizer) -> None:
    """What ``generate(generation_mode="image")`` needs, for models built here."""
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}


# --------------------------------------------------------------------------- loading

_REQUIRED = {"config.json": "the model config"}
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_folder(path: Path) -> None:
    """A clear error naming what a Janus checkpoint folder lacks."""
    if not path.is_dir():
        raise FileNotFoundError(f"backbone.path={str(path)!r} is not a folder (expected a Janus "
                                "checkpoint in the Hugging Face layout)")
    missing = [f"{f} ({why})" for f, why in _REQUIRED.items() if not (path / f).is_file()]
    if not any((path / f).is_file() for f in _WEIGHTS):
        missing.append(f"the weights (one of {', '.join(_WEIGHTS)})")
    if not any((path / f).is_file() for f in _PROCESSOR):
        missing.append(f"the image processor config (one of {', '.join(_PROCESSOR)})")
    if not any((path / f).is_file() for f in _TOKENIZER):
        missing.append(f"the tokenizer (one of {', '.join(_TOKENIZER)})")
    if missing:
        raise FileNotFoundError(f"{path} is not a Janus checkpoint folder: missing "
                                + "; ".join(missing))
    kind = json.loads((path / "config.json").read_text()).get("model_type")
    if kind != "janus":
        raise ValueError(f"{path}/config.json has model_type={kind!r}, expected 'janus' (the "
                         "transformers layout, e.g. deepseek-community/Janus-Pro-1B)")


def build(cfg: BackboneConfig) -> JanusBackbone:
    from transformers import JanusForConditionalGeneration, JanusProcessor

    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.preset:
        check_trainable_preset("janus", cfg.preset, PRESETS)
        dims = _tiny_dims()["vision"]
        processor = tiny_processor(dims["image_size"], dims["num_image_tokens"])
        tok = processor.tokenizer
        config = preset_config("tiny", len(tok), tok.convert_tokens_to_ids(IMAGE))
        torch.manual_seed(0)  # the tiny preset is the same random model everywhere
        model = JanusForConditionalGeneration(config)
        _generation_config(model, tok)
    else:
        path = Path(cfg.path)
        check_folder(path)
        verify_checksums(path, (), optional=True)  # a folder fedumm wrote lists its files
        processor = JanusProcessor.from_pretrained(str(path), local_files_only=True)
        model = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype,
                                                              local_files_only=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    return JanusBackbone(model, processor)


def skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple[AdapterGroup, ...]]:
    """The architecture on the meta device (no memory, no weights) and its groups."""
    from transformers import JanusForConditionalGeneration

    if cfg.preset:
        config = preset_config(cfg.preset)
    else:
        from transformers import JanusConfig

        check_folder(Path(cfg.path))
        config = JanusConfig.from_pretrained(cfg.path, local_files_only=True)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    # BOI / EOI ids do not change the parameter count of the alignment group
    return model, janus_groups(0, 1)


# --------------------------------------------------------------------------- the backbone

class JanusBackbone(ModelPlacement):
    """A Janus(-Pro) model and its processor, behind the Backbone protocol."""

    kind = "janus"
    input_size = None  # the processor resizes and pads any image

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        tok = self.tokenizer
        self.boi_id = tok.convert_tokens_to_ids(BOI)
        self.eoi_id = tok.convert_tokens_to_ids(EOI)
        if tok.pad_token_id is None:
            raise ValueError("the Janus tokenizer has no pad token")
        self._codes: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------- properties
    @property
    def groups(self) -> tuple[AdapterGroup, ...]:
        return janus_groups(self.boi_id, self.eoi_id)

    @property
    def decoder_layers(self) -> DecoderLayers:
        return DecoderLayers(r"model\.language_model\.layers\.(\d+)\.",
                             int(self._janus.config.text_config.num_hidden_layers))

    @property
    def _janus(self):
        """The ``JanusForConditionalGeneration`` under any PEFT wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def image_size(self) -> int:
        return int(self._janus.config.vision_config.image_size)

    @property
    def num_image_tokens(self) -> int:
        return int(self._janus.config.vision_config.num_image_tokens)

    def save(self, path: str | Path) -> Path:
        """A checkpoint folder in the Hugging Face layout (what ``backbone.path`` loads)."""
        path = Path(path)
        self._janus.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))
        write_folder_checksums(path)
        return path

    # --------------------------------------------------------------- inputs
    def _chat(self, text: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    def _prompt_ids(self, prompts: Sequence[str], images: Sequence[np.ndarray | None]
                    ) -> list[list[int]]:
        """Token ids of chat prompts, each image expanded to BOI + image tokens + EOI."""
        texts = [self._chat(p, im is not None) for p, im in zip(prompts, images, strict=True)]
        expanded = self.processor.replace_image_token({}, 0)
        texts = [t.replace(IMAGE, expanded) for t in texts]
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def _pad(self, seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, ...]:
        ids, mask = pad_sequences(seqs, left, pad_id=self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def _generation_prompts(self, texts: Sequence[str | None], drop: Sequence[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids ending in BOI; a dropped prompt keeps BOS and BOI only."""
        seqs = []
        for text, d in zip(texts, drop, strict=True):
            ids = self.tokenizer(self._chat(text or "", False), add_special_tokens=True)[
                "input_ids"] + [self.boi_id]
            if d or text is None:
                keep = {self.tokenizer.bos_token_id, self.boi_id}
                ids = [t if t in keep else self.tokenizer.pad_token_id for t in ids]
            seqs.append(ids)
        return self._pad(seqs, left=True)

    # --------------------------------------------------------------- batches
    @torch.no_grad()
    def prepare(self, samples: Sequence[Sample]) -> None:
        """VQ-encode the target images of generation samples once (the VQ model is frozen)."""
        gen = [s for s in samples if s.task == GENERATION and s.id not in self._codes]
        vq = self._janus.model.vqmodel
        for i in range(0, len(gen), _CODE_CHUNK):
            chunk = gen[i:i + _CODE_CHUNK]
            codes = vq.encode(self._pixels([s.load_image() for s in chunk])).image_tokens
            codes = codes.reshape(len(chunk), -1).cpu()
            self._codes.update({s.id: c for s, c in zip(chunk, codes, strict=True)})

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        drop = list(drop_text) if drop_text is not None else [False] * len(samples)
        und = [s for s in samples if s.task == UNDERSTANDING]
        gen = [(s, d) for s, d in zip(samples, drop, strict=True) if s.task == GENERATION]
        batch = Batch()
        if und:
            images = [s.load_image() if s.image is not None else None for s in und]
            prompts = self._prompt_ids([s.text or "" for s in und], images)
            answers = self.tokenizer([s.answer for s in und], add_special_tokens=False)[
                "input_ids"]
            eos = self.tokenizer.eos_token_id
            seqs = [p + a + [eos] for p, a in zip(prompts, answers, strict=True)]
            ids, mask = self._pad(seqs, left=False)
            labels = ids.masked_fill(mask == 0, -100)
            for i, p in enumerate(prompts):
                labels[i, :len(p)] = -100  # only the answer (and EOS) is supervised
            present = [im for im in images if im is not None]
            batch.parts[UNDERSTANDING] = {
                "input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": self._pixels(present) if present else None}
            batch.counts[UNDERSTANDING] = len(und)
        if gen:
            missing = [s for s, _ in gen if s.id not in self._codes]
            if missing:
                self.prepare(missing)
            p_ids, p_mask = self._generation_prompts([s.text for s, _ in gen],
                                                     [d for _, d in gen])
            codes = torch.stack([self._codes[s.id] for s, _ in gen]).to(self.device)
            batch.parts[GENERATION] = {"p_ids": p_ids, "p_mask": p_mask, "codes": codes}
            batch.counts[GENERATION] = len(gen)
        return batch

    def _understanding_loss(self, u: dict) -> torch.Tensor:
        return self.model(input_ids=u["input_ids"], attention_mask=u["attention_mask"],
                          pixel_values=u["pixel_values"], labels=u["labels"]).loss

    def _code_logits(self, g: dict) -> torch.Tensor:
        """Teacher-forced logits (B, L, codes) of every target code given the prompt."""
        janus = self._janus
        p_ids, p_mask, codes = g["p_ids"], g["p_mask"], g["codes"]
        text = janus.get_input_embeddings()(p_ids)
        image = janus.prepare_embeddings_for_image_generation(codes[:, :-1])
        embeds = torch.cat([text, image.to(text.dtype)], dim=1)
        mask = torch.cat([p_mask, torch.ones_like(codes[:, :-1])], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = janus.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=positions).last_hidden_state
        start = p_ids.shape[1] - 1  # BOI predicts the first code
        return janus.model.generation_head(hidden[:, start:start + codes.shape[1]])

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = {}
        if UNDERSTANDING in batch.parts:
            out[UNDERSTANDING] = self._understanding_loss(batch.parts[UNDERSTANDING])
        if GENERATION in batch.parts:
            g = batch.parts[GENERATION]
            logits = self._code_logits(g)
            out[GENERATION] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                              g["codes"].reshape(-1))
        return out

    @torch.no_grad()
    def quality(self, samples: Sequence[Sample]) -> dict[str, float]:
        """Exact-match answer accuracy; teacher-forced top-1 accuracy of the image codes."""
        from fedumm.eval.model_eval import heldout_quality

        def code_accuracy(gen: list[Sample]) -> float:
            g = self.collate(gen).parts[GENERATION]
            return float((self._code_logits(g).argmax(-1) == g["codes"]).float().mean())

        return heldout_quality(self, samples, code_accuracy)

    # --------------------------------------------------------------- capabilities
    def _generation_settings(self, **settings):
        """The checkpoint's generation config with ``settings`` (one object, so transformers
        does not mix it with loose keyword arguments)."""
        import copy

        gc = copy.deepcopy(self._janus.generation_config)
        gc.max_length = None  # max_new_tokens (text) or the image token count decides
        gc.update(pad_token_id=self.tokenizer.pad_token_id, **settings)
        return gc

    @torch.no_grad()
    @in_eval_mode
    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
               batch_size: int = 16, max_new_tokens: int = 8) -> list[str]:
        """Greedy answers: the prompt once, then one token at a time over the KV cache
        (positions skip the left padding, as in training)."""
        from transformers import DynamicCache

        eos = self.tokenizer.eos_token_id
        out: list[str] = []
        for s in range(0, len(questions), batch_size):
            imgs = list(images[s:s + batch_size])
            ids, mask = self._pad(self._prompt_ids(questions[s:s + batch_size], imgs), left=True)
            present = [im for im in imgs if im is not None]
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                pixel_values=self._pixels(present) if present else None,
                                cache=cache, use_cache=True).logits
            tokens = [[] for _ in imgs]
            done = torch.zeros(len(imgs), dtype=torch.bool, device=ids.device)
            last = positions[:, -1:]
            for _ in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i] and t != eos:
                        tokens[i].append(t)
                done |= nxt == eos
                if bool(done.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(len(imgs), 1)], dim=1)
                last = last + 1
                logits = self.model(input_ids=nxt[:, None], attention_mask=mask,
                                    position_ids=last, cache=cache, use_cache=True).logits
            out += [t.strip() for t in self.tokenizer.batch_decode(tokens,
                                                                   skip_special_tokens=True)]
        return out

    @torch.no_grad()
    def answer_likelihoods(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
                           candidates: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """(N, C) log-likelihood of each candidate answer (its tokens and EOS) per question,
        teacher-forced as in training."""
        return candidate_log_likelihoods(
            self, lambda u: self.model(input_ids=u["input_ids"], attention_mask=u["attention_mask"],
                                       pixel_values=u["pixel_values"]).logits,
            images, questions, candidates, batch_size)

    @torch.no_grad()
    @in_eval_mode
    def generate(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 8,
                 cfg_scale: float = 5.0, temperature: float = 1.0) -> np.ndarray:
        """Images (N, S, S, 3) uint8 through ``generate(generation_mode="image")`` and
        ``decode_image_tokens``; the global RNG is forked, so training is not disturbed."""
        janus = self._janus
        chunks = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for s in range(0, len(prompts), batch_size):
                part = list(prompts[s:s + batch_size])
                ids, mask = self._generation_prompts(part, [False] * len(part))
                codes = janus.generate(
                    input_ids=ids, attention_mask=mask, generation_mode="image",
                    generation_config=self._generation_settings(
                        do_sample=True, temperature=temperature, guidance_scale=cfg_scale))
                pixels = janus.decode_image_tokens(codes).float()  # (B, S, S, 3) in [-1, 1]
                chunks.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                              .cpu().numpy())
        size = self.image_size
        return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)


register_backbone("janus", build, skeleton)

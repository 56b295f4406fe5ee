"""Janus-Pro behind the Backbone protocol (``backbone.kind=janus``), through transformers'
``JanusForConditionalGeneration`` and ``JanusProcessor`` (built by :mod:`.builder`).

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
* Generation quality (for the quality-weighted rule): teacher-forced top-1 accuracy of the
  held-out targets' image codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.models.batching import candidate_log_likelihoods, pad_sequences, split_tasks
from fedumm.models.groups import AdapterGroup, DecoderLayers
from fedumm.models.janus.assembly import BOI, EOI, IMAGE
from fedumm.models.janus.checkpoint import save_folder
from fedumm.models.placement import ModelPlacement, in_eval_mode
from fedumm.models.protocol import Batch

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
        return save_folder(self._janus, self.processor, Path(path))

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
        und, gen = split_tasks(samples, drop_text)
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
    def generation_quality(self, samples: Sequence[Sample]) -> float:
        """Teacher-forced top-1 accuracy of the held-out targets' image codes."""
        g = self.collate(samples).parts[GENERATION]
        return float((self._code_logits(g).argmax(-1) == g["codes"]).float().mean())

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

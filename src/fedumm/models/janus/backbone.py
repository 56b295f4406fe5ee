"""Janus-Pro behind the Backbone protocol (``backbone.kind=janus``), through transformers'
``JanusForConditionalGeneration`` and ``JanusProcessor`` (built by :mod:`.builder`).

* Understanding: the conversation (the question with its image, then the answer) as the
  checkpoint's processor renders and tokenises it: its chat template, its default system
  prompt (DeepSeek's ``VLChatProcessor.system_prompt``, which the converted processors add),
  each image expanded to BOI + image tokens + EOI; the answer tokenised where the template
  places it (after "<|Assistant|>:", so a byte-level BPE sees " red", not "red"). Causal-LM
  cross-entropy on the answer tokens and EOS only (``mask_prompt``).
* Generation: transformers has no training loss for it. The target image, short side resized
  and centre-cropped, is VQ-encoded as the official tokenizer does it (:mod:`.targets`); the
  codes are embedded through ``generation_embeddings`` + ``generation_aligner`` after the
  prompt (the processor's image-generation prompt: no system prompt, ending in
  ``<begin_of_image>``, as ``generation_inference.py`` builds it), and ``generation_head``
  predicts each next code (cross-entropy). A dropped prompt (classifier-free guidance) keeps
  only BOS and BOI and pads the rest, as ``generate(generation_mode="image")`` and the official
  ``generate`` build their unconditional branch.
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

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.models.batching import candidate_log_likelihoods, pad_sequences, split_tasks
from fedumm.models.groups import AdapterGroup, DecoderLayers
from fedumm.models.janus.assembly import BOI, EOI
from fedumm.models.janus.checkpoint import save_folder
from fedumm.models.janus.targets import target_pixels, vq_codes
from fedumm.models.placement import ModelPlacement, in_eval_mode
from fedumm.models.protocol import Batch
from fedumm.models.vocabulary import tokenizer_unknown_words

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
    def _chat(self, text: str, with_image: bool, answer: str | None = None) -> str:
        """The chat template's text of the question (with its image first, as Janus's examples
        place it) and either the answer or the prompt for one."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        chat = [{"role": "user", "content": content}]
        if answer is not None:
            chat.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(chat, add_generation_prompt=answer is None,
                                                  tokenize=False)

    def _encode(self, texts: list[str], images: Sequence[np.ndarray | None],
                mode: str = "text") -> tuple[list[list[int]], torch.Tensor | None]:
        """Token ids of rendered chats and the pixels of their images, through the processor:
        ``mode="text"`` adds its default system prompt, ``"image"`` ends in BOI."""
        present = [im for im in images if im is not None]
        out = self.processor(text=texts, images=present or None, generation_mode=mode,
                             padding=False, return_tensors=None)
        pixels = None
        if present:
            pixels = torch.stack([torch.as_tensor(np.asarray(p)) for p in out["pixel_values"]])
            pixels = pixels.to(self.device, self.dtype)
        return [list(ids) for ids in out["input_ids"]], pixels

    def _prompt_ids(self, prompts: Sequence[str], images: Sequence[np.ndarray | None]
                    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Token ids of understanding prompts (ending in "<|Assistant|>:") and their pixels."""
        return self._encode([self._chat(p, im is not None)
                             for p, im in zip(prompts, images, strict=True)], images)

    def _answer_ids(self, prompts: Sequence[str], images: Sequence[np.ndarray | None],
                    answers: Sequence[str]
                    ) -> tuple[list[list[int]], list[int], torch.Tensor | None]:
        """Token ids of whole conversations (prompt, answer as the template places it, EOS),
        each prompt's length, and the pixels."""
        prompt_ids, _ = self._prompt_ids(prompts, images)
        full, pixels = self._encode([self._chat(p, im is not None, a) for p, im, a
                                     in zip(prompts, images, answers, strict=True)], images)
        eos = self.tokenizer.eos_token_id
        for p, f in zip(prompt_ids, full, strict=True):
            if f[:len(p)] != p:
                raise ValueError("the Janus chat template's answer prompt is not a prefix of the "
                                 "conversation with its answer: cannot mark the answer tokens")
            if f[-1] != eos:  # the converted template leaves the last turn's EOS to the caller
                f.append(eos)
        return full, [len(p) for p in prompt_ids], pixels

    @property
    def answer_head(self) -> torch.nn.Module:
        """The language model's head (the generation head reads image codes)."""
        return self.model.lm_head

    def answer_token_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """The supervised ids of each answer as the chat template places it, EOS included
        (the same whatever the question: it ends before the answer)."""
        full, prompt_lens, _ = self._answer_ids([""] * len(answers), [None] * len(answers),
                                                answers)
        return [f[n:] for f, n in zip(full, prompt_lens, strict=True)]

    def _pad(self, seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, ...]:
        ids, mask = pad_sequences(seqs, left, pad_id=self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def _generation_prompts(self, texts: Sequence[str | None], drop: Sequence[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids ending in BOI; a dropped prompt keeps BOS and BOI only."""
        seqs, _ = self._encode([self._chat(t or "", False) for t in texts], [None] * len(texts),
                               mode="image")
        keep = {self.tokenizer.bos_token_id, self.boi_id}
        for i, (text, d) in enumerate(zip(texts, drop, strict=True)):
            if d or text is None:
                seqs[i] = [t if t in keep else self.tokenizer.pad_token_id for t in seqs[i]]
        return self._pad(seqs, left=True)

    # --------------------------------------------------------------- batches
    @torch.no_grad()
    def prepare(self, samples: Sequence[Sample],
                progress: Callable[[int, int], None] | None = None) -> None:
        """VQ-encode the target images of generation samples once (the VQ model is frozen);
        ``progress(done, total)`` after each chunk of images."""
        gen = [s for s in samples if s.task == GENERATION and s.id not in self._codes]
        vq = self._janus.model.vqmodel
        for i in range(0, len(gen), _CODE_CHUNK):
            chunk = gen[i:i + _CODE_CHUNK]
            pixels = target_pixels([s.load_image() for s in chunk], self.image_size)
            codes = vq_codes(vq, pixels.to(self.device, self.dtype)).cpu()
            self._codes.update({s.id: c for s, c in zip(chunk, codes, strict=True)})
            if progress is not None:
                progress(i + len(chunk), len(gen))

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        und, gen = split_tasks(samples, drop_text)
        batch = Batch()
        if und:
            images = [s.load_image() if s.image is not None else None for s in und]
            seqs, prompt_lens, pixels = self._answer_ids([s.text or "" for s in und], images,
                                                         [s.answer for s in und])
            ids, mask = self._pad(seqs, left=False)
            labels = ids.masked_fill(mask == 0, -100)
            for i, n in enumerate(prompt_lens):
                labels[i, :n] = -100  # only the answer (and EOS) is supervised
            batch.parts[UNDERSTANDING] = {
                "input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": pixels}
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

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer maps to its unknown token (none for a
        byte-level BPE)."""
        return tokenizer_unknown_words(self.tokenizer, text)

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
            prompts, pixels = self._prompt_ids(questions[s:s + batch_size], imgs)
            ids, mask = self._pad(prompts, left=True)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                pixel_values=pixels, cache=cache, use_cache=True).logits
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
                 cfg_scale: float | None = None, temperature: float = 1.0) -> np.ndarray:
        """Images (N, S, S, 3) uint8 through ``generate(generation_mode="image")`` and
        ``decode_image_tokens``; the global RNG is forked, so training is not disturbed.
        ``cfg_scale``: the guidance scale (None: 5.0), above 1: transformers' Janus always
        runs the unconditional branch beside the prompt, and at 1 or below it drops the
        guidance step that merges the two (a shape error deep inside ``generate``)."""
        cfg_scale = 5.0 if cfg_scale is None else cfg_scale
        if not cfg_scale > 1:
            raise ValueError(f"cfg_scale={cfg_scale}: Janus's image generation needs a "
                             "classifier-free guidance scale above 1 (its default is 5.0)")
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

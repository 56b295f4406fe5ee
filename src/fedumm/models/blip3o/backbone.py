"""A BLIP3o-style unified model behind the Backbone protocol (``backbone.kind=blip3o``).

* Understanding: Qwen2.5-VL with its chat template; causal-LM cross-entropy on the answer
  tokens (and ``<|im_end|>``) only.
* Understanding images keep their aspect ratio: Qwen2.5-VL's processor resizes each to between
  the preset's (or folder's) ``min_pixels`` and ``max_pixels`` and returns its patches
  flattened with its ``image_grid_thw`` row, so a batch mixes image sizes.
* Generation (BLIP3o's recipe, ``blip3o_qwen.py`` / ``train.py`` / ``inference.py``): under
  Qwen's system prompt, the user turn "Please generate image based on the following caption:
  <caption>", then BLIP3o's ``[IMG]`` token, then the learnable queries; the LLM's last hidden
  states at the queries, projected to the DiT's width (``caption_projection``, inside BLIP3o's
  DiT), condition the DiT by cross-attention. Training closes the chat with an empty assistant
  turn before ``[IMG]`` (BLIP3o's ``preprocess_qwen`` of its T2I conversation); sampling opens
  the assistant turn instead (its ``conv_qwen`` template with ``add_generation_prompt``). The
  DiT is trained with flow matching on the target encoder's pooled features x0: sigma ~ U(0,
  1), x_t = (1 - sigma) x0 + sigma e, the DiT (at timestep 1000 sigma, BLIP3o's convention)
  predicts the velocity e - x0 (MSE). A dropped prompt (classifier-free guidance) zeroes the
  LLM's hidden states before the projection, as BLIP3o's ``mask_drop`` does, so the null
  condition is ``caption_projection(0)``, which is also sampling's unconditional branch: the
  backbone's scheduler (``FlowMatchEulerDiscrete`` by default) steps with guidance, then the
  patch decoder turns features into pixels.
* Adapter groups (:func:`adapter_groups`): ``vision`` and ``language`` (Qwen2.5-VL's vision
  blocks + merger, LLM attention / MLP) trained by understanding; ``generation`` (DiT attention
  / feed-forward, caption projection) and ``alignment`` (the queries, in full) by generation.
  BLIP3o trains generation with the MLLM frozen: the loss reaches the queries through the LLM
  but trains none of its adapters, unless ``generation_trains_language``. A language adapter
  always moves the query hidden states, so understanding training changes generation.
* Generation quality (for the quality-weighted rule): the held-out flow-matching loss L as a
  score 1 - L / L0 clipped to [0, 1], where L0 is the loss of predicting zero velocity (so 0 =
  no better than nothing, 1 = perfect), on fixed noise and a fixed sigma grid
  (deterministic).
* Randomness: the flow-matching noise and sigmas come from torch's RNG, which the client
  trainer seeds per client and round, so runs are reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.models.batching import candidate_log_likelihoods, pad_sequences, split_tasks
from fedumm.models.blip3o.assembly import (
    GENERATION_INSTRUCTION,
    IMAGE_PAD,
    NO_GENERATION,
    SYSTEM_PROMPT,
    TARGET_MEAN,
    TARGET_STD,
    Blip3oModel,
    flow_scheduler,
    special_token_ids,
)
from fedumm.models.groups import AdapterGroup, DecoderLayers
from fedumm.models.placement import ModelPlacement, in_eval_mode
from fedumm.models.protocol import Batch
from fedumm.models.vocabulary import tokenizer_unknown_words

if TYPE_CHECKING:
    from diffusers import SchedulerMixin



def adapter_groups(generation_trains_language: bool = False) -> tuple[AdapterGroup, ...]:
    """The adapter groups; the modalities say whose samples train (and weigh) each group: the
    queries serve generation only, and the language adapters learn from generation only when
    ``generation_trains_language`` (BLIP3o freezes the MLLM for generation)."""
    language_by = (UNDERSTANDING, GENERATION) if generation_trains_language else (UNDERSTANDING,)
    return (
        AdapterGroup("vision", r"qwen\.model\.visual\.(blocks\.\d+\.(attn\.(qkv|proj)"
                               r"|mlp\.(gate|up|down)_proj)|merger\.mlp\.[02])", (UNDERSTANDING,),
                     needs_images=True),
        AdapterGroup("language", r"qwen\.model\.language_model\.layers\.\d+\."
                                 r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)", language_by),
        AdapterGroup("generation", r"dit\.layers\.\d+\.(attn1\.to_[qkv]|attn2\.(to_[qkv]"
                                   r"|to_out\.0)|feed_forward\.linear_[123])"
                                   r"|caption_projection\.linear_[12]", (GENERATION,)),
        AdapterGroup("alignment", None, (GENERATION,), modules_to_save=("queries",)),
    )


GROUPS = adapter_groups()  # BLIP3o's recipe: generation leaves the language adapters alone
QUALITY_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the held-out flow-matching loss's sigma grid


class Blip3oBackbone(ModelPlacement):
    """Qwen2.5-VL + learnable queries + a flow-matching DiT, behind the Backbone protocol."""

    kind = "blip3o"
    input_size = None  # the processors resize any image

    def __init__(self, model: Blip3oModel, tokenizer, processor,
                 scheduler: SchedulerMixin | None = None, sample_steps: int = 0,
                 cfg_scale: float = 3.0, generation_trains_language: bool = False) -> None:
        """``scheduler``: the sampler of :meth:`generate`, a diffusers flow-matching scheduler
        (its ``set_timesteps`` takes ``sigmas``); None: the default of
        :func:`~fedumm.models.blip3o.assembly.flow_scheduler`. ``generation_trains_language``:
        see the module docstring (set before adapters are built on the backbone: it decides
        the groups' modalities)."""
        self.generation_trains_language = generation_trains_language
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.scheduler = scheduler if scheduler is not None else flow_scheduler()
        self.ids = special_token_ids(tokenizer)
        self.dims = model.dims
        self.sample_steps = sample_steps or (8 if self.dims.n_query < 64 else 30)
        self.cfg_scale = cfg_scale
        self._rope: torch.Tensor | None = None

    # --------------------------------------------------------------- properties
    @property
    def groups(self) -> tuple[AdapterGroup, ...]:
        return adapter_groups(self.generation_trains_language)

    @property
    def decoder_layers(self) -> DecoderLayers:
        return DecoderLayers(r"qwen\.model\.language_model\.layers\.(\d+)\.",
                             int(self._parts.qwen.config.text_config.num_hidden_layers))

    @property
    def _parts(self) -> Blip3oModel:
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def image_size(self) -> int:
        return int(self.dims.target["image_size"])

    @property
    def answer_head(self) -> torch.nn.Module:
        """Qwen2.5-VL's language head (generation reads hidden states, not its logits)."""
        return self._parts.qwen.lm_head

    def answer_token_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """The supervised ids of each answer: its tokens (no special tokens) and EOS."""
        ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        return [list(a) + [self.ids["eos"]] for a in ids]

    def save(self, path: str | Path) -> Path:
        """A checkpoint folder in BLIP3o's published layout (what ``backbone.path`` loads)."""
        from fedumm.models.blip3o.checkpoint import save_folder

        return save_folder(self._parts, self.tokenizer, self.processor, Path(path))

    # --------------------------------------------------------------- inputs
    def _chat(self, text: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _vision(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                "image_grid_thw": out["image_grid_thw"].to(self.device)}

    def _prompt_ids(self, prompts: Sequence[str], images: Sequence[np.ndarray | None],
                    grid: torch.Tensor | None) -> list[list[int]]:
        """Chat prompts with each image's pad token repeated once per merged vision token."""
        merge = self.dims.vision["spatial_merge_size"] ** 2
        counts = iter([] if grid is None else (grid.prod(-1) // merge).tolist())
        texts = []
        for p, im in zip(prompts, images, strict=True):
            text = self._chat(p, im is not None)
            if im is not None:
                text = text.replace(IMAGE_PAD, IMAGE_PAD * int(next(counts)))
            texts.append(text)
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _generation_ids(self, captions: Sequence[str], training: bool) -> list[list[int]]:
        """BLIP3o's conditioning prompt per caption, ending with its ``[IMG]`` token (the
        queries follow): the chat with the empty assistant turn closed when ``training``
        (BLIP3o's ``train.py``), the assistant turn opened when sampling (its
        ``inference.py``)."""
        texts = []
        for caption in captions:
            chat = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": GENERATION_INSTRUCTION + caption}]
            if training:
                chat.append({"role": "assistant", "content": ""})
            texts.append(self.tokenizer.apply_chat_template(
                chat, add_generation_prompt=not training, tokenize=False))
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(i) + [self.ids["img_start"]] for i in ids]

    def _pad(self, seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, ...]:
        ids, mask = pad_sequences(seqs, left, pad_id=self.ids["pad"])
        return ids.to(self.device), mask.to(self.device)

    def _target_pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images at the target encoder's size, normalised as SigLIP expects."""
        s = self.image_size
        arrays = [np.asarray(Image.fromarray(im).resize((s, s), Image.BICUBIC)) if
                  im.shape[:2] != (s, s) else im for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        return ((x - TARGET_MEAN) / TARGET_STD).to(self.device, self.dtype)

    # --------------------------------------------------------------- batches
    def prepare(self, samples: Sequence[Sample]) -> None:
        """Nothing to cache: target features are computed per batch (a real model's 64 x 1792
        features per image would not fit in memory for a large dataset)."""

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        und, gen = split_tasks(samples, drop_text)
        batch = Batch()
        if und:
            images = [s.load_image() if s.image is not None else None for s in und]
            present = [im for im in images if im is not None]
            vision = self._vision(present) if present else {}
            prompts = self._prompt_ids([s.text or "" for s in und], images,
                                       vision.get("image_grid_thw"))
            answers = self.answer_token_ids([s.answer for s in und])
            seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
            ids, mask = self._pad(seqs, left=False)
            labels = ids.masked_fill(mask == 0, -100)
            for i, p in enumerate(prompts):
                labels[i, :len(p)] = -100  # only the answer (and its end token) is supervised
            batch.parts[UNDERSTANDING] = {"input_ids": ids, "attention_mask": mask,
                                          "labels": labels, **vision}
            batch.counts[UNDERSTANDING] = len(und)
        if gen:
            ids, mask = self._pad(self._generation_ids([s.text or "" for s, _ in gen],
                                                       training=True), left=True)
            keep = torch.tensor([not d and s.text is not None for s, d in gen],
                                dtype=self.dtype, device=self.device)
            x0 = self._parts.target_features(self._target_pixels([s.load_image()
                                                                  for s, _ in gen]))
            batch.parts[GENERATION] = {"input_ids": ids, "attention_mask": mask, "keep": keep,
                                       "x0": x0}
            batch.counts[GENERATION] = len(gen)
        return batch

    # --------------------------------------------------------------- losses
    def _query_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states (B, Q, hidden) at the queries that follow the
        (left-padded) prompt. Gradients reach the queries through the LLM; its adapters get
        none unless ``generation_trains_language``."""
        parts = self._parts  # PEFT wraps modules in place: queries call their trained copy
        qwen = parts.qwen
        n_query = self.dims.n_query
        text = qwen.get_input_embeddings()(ids)
        queries = parts.queries(torch.arange(n_query, device=ids.device))
        embeds = torch.cat([text, queries.to(text.dtype).expand(len(ids), -1, -1)], dim=1)
        full = torch.cat([mask, mask.new_ones(len(ids), n_query)], dim=1)
        pos = (full.cumsum(1) - 1).clamp(min=0)
        llm = qwen.model.language_model
        frozen = contextlib.nullcontext() if self.generation_trains_language else _frozen(llm)
        with frozen:
            hidden = llm(inputs_embeds=embeds, attention_mask=full,
                         position_ids=pos.unsqueeze(0).expand(3, -1, -1)).last_hidden_state
        return hidden[:, -n_query:]

    def _condition(self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor
                   ) -> torch.Tensor:
        """The DiT's condition (B, Q, width): the query hidden states, zeroed where the prompt
        is dropped (BLIP3o's ``mask_drop``), then projected: a dropped prompt gives the null
        condition ``caption_projection(0)``."""
        hidden = self._query_states(ids, mask)
        return self._parts.caption_projection(hidden * keep.to(hidden.dtype)[:, None, None])

    def _rotary(self) -> torch.Tensor:
        if self._rope is None:
            from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

            d = self.dims.dit
            head = d["hidden_size"] // d["num_attention_heads"]
            self._rope = get_2d_rotary_pos_embed_lumina(head, self.dims.rope_len,
                                                        self.dims.rope_len)
        return self._rope

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor
                  ) -> torch.Tensor:
        mask = torch.ones(cond.shape[:2], device=cond.device, dtype=torch.long)
        return self._parts.dit(x, sigma * 1000, cond, mask, self._rotary(),
                               cross_attention_kwargs={}, return_dict=False)[0]

    def _flow_loss(self, g: dict, sigma: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow-matching MSE, MSE of predicting zero velocity), per sample."""
        x0 = g["x0"]
        sigma = torch.rand(len(x0), device=x0.device, dtype=x0.dtype) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        cond = self._condition(g["input_ids"], g["attention_mask"], g["keep"])
        v = self._velocity(x_t, sigma, cond)
        target = noise - x0
        return (((v.float() - target.float()) ** 2).flatten(1).mean(1),
                (target.float() ** 2).flatten(1).mean(1))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = {}
        if UNDERSTANDING in batch.parts:
            u = batch.parts[UNDERSTANDING]
            out[UNDERSTANDING] = self._parts.qwen(**u).loss
        if GENERATION in batch.parts:
            out[GENERATION] = self._flow_loss(batch.parts[GENERATION])[0].mean()
        return out

    @torch.no_grad()
    def generation_quality(self, samples: Sequence[Sample]) -> float:
        """1 - L / L0 of the held-out flow-matching loss (see the module docstring)."""
        g = self.collate(samples).parts[GENERATION]
        x0 = g["x0"]
        gen_rng = torch.Generator().manual_seed(0)  # fixed noise: a deterministic score
        losses, zero = [], []
        for sigma in QUALITY_SIGMAS:
            noise = torch.randn(x0.shape, generator=gen_rng).to(x0.device, x0.dtype)
            s = torch.full((len(x0),), sigma, device=x0.device, dtype=x0.dtype)
            lo, z = self._flow_loss(g, s, noise)
            losses.append(lo.mean())
            zero.append(z.mean())
        return float((1 - torch.stack(losses).mean() / torch.stack(zero).mean()).clamp(0, 1))

    # --------------------------------------------------------------- capabilities
    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer maps to its unknown token (none for a
        byte-level BPE)."""
        return tokenizer_unknown_words(self.tokenizer, text)

    @torch.no_grad()
    @in_eval_mode
    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
               batch_size: int = 16, max_new_tokens: int = 8) -> list[str]:
        """Greedy answers through Qwen2.5-VL's ``generate`` (left-padded prompts)."""
        qwen = self._parts.qwen
        out: list[str] = []
        for s in range(0, len(questions), batch_size):
            imgs = list(images[s:s + batch_size])
            present = [im for im in imgs if im is not None]
            vision = self._vision(present) if present else {}
            ids, mask = self._pad(self._prompt_ids(questions[s:s + batch_size], imgs,
                                                   vision.get("image_grid_thw")), left=True)
            tokens = qwen.generate(input_ids=ids, attention_mask=mask, **vision,
                                   generation_config=self._greedy(max_new_tokens))
            out += [t.strip() for t in self.tokenizer.batch_decode(
                tokens[:, ids.shape[1]:], skip_special_tokens=True)]
        return out

    @torch.no_grad()
    def answer_likelihoods(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
                           candidates: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """(N, C) log-likelihood of each candidate answer (its tokens and end token) per
        question, teacher-forced as in training."""
        return candidate_log_likelihoods(
            self, lambda u: self._parts.qwen(**{k: v for k, v in u.items() if k != "labels"}
                                             ).logits,
            images, questions, candidates, batch_size)

    def _greedy(self, max_new_tokens: int):
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=self.ids["eos"], pad_token_id=self.ids["pad"])

    @torch.no_grad()
    @in_eval_mode
    def generate(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 8,
                 cfg_scale: float | None = None) -> np.ndarray:
        """Images (N, S, S, 3) uint8: Euler flow-matching steps from seeded noise with
        classifier-free guidance (the null condition ``caption_projection(0)`` as the
        unconditional branch), then the patch decoder. The global RNG is not touched.
        ``cfg_scale``: the guidance scale (None: the backbone's ``cfg_scale`` setting)."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        parts = self._parts
        if parts.decoder is None:
            raise ValueError(NO_GENERATION)
        gen_rng = torch.Generator().manual_seed(seed)
        g, c = self.dims.grid, self.dims.feature_dim
        chunks = []
        for s in range(0, len(prompts), batch_size):
            part = list(prompts[s:s + batch_size])
            ids, mask = self._pad(self._generation_ids(part, training=False), left=True)
            hidden = self._query_states(ids, mask)
            # the unconditional branch: the projection of zero hidden states (BLIP3o's
            # sample_images passes zeros to its DiT, which projects them)
            both = parts.caption_projection(torch.cat([hidden, torch.zeros_like(hidden)]))
            x = torch.randn((len(part), c, g, g), generator=gen_rng).to(self.device,
                                                                        self.dtype)
            # a scheduler holds the step state of one sampling run: a fresh copy of the given
            # one per chunk, so the backbone's own stays untouched between calls
            sched = type(self.scheduler).from_config(self.scheduler.config)
            steps = self.sample_steps
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(),
                                device=self.device)
            for t in sched.timesteps:
                sigma = (t / 1000).expand(2 * len(part)).to(self.dtype)
                v_c, v_u = self._velocity(torch.cat([x, x]), sigma, both).chunk(2)
                x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
            pixels = parts.decoder(x.float() if parts.decoder.proj.weight.dtype ==
                                   torch.float32 else x)
            chunks.append((pixels.float() * 255).round().clamp(0, 255).to(torch.uint8)
                          .permute(0, 2, 3, 1).cpu().numpy())
        size = self.image_size
        return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradient reaches ``module``'s parameters from what runs inside (autograd records
    no edge to a parameter that does not require grad); gradients still flow through it to
    its inputs. Restores the parameters' flags on leaving."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)

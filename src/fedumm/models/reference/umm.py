"""The reference unified multimodal model (UMM): one decoder that answers and generates.

Layout (module names follow Janus / LLaVA-style UMMs, so LoRA targets look like real ones):

* ``vision_model``  SigLIP encoder layers over a convolutional patch stem -> (B, 64, Dv)
* ``aligner``       2x2 patch merge + MLP into the decoder width -> (B, 16, D)
* ``alignment``     learnable alignment tokens prepended to every decoder input -> (A, D)
* ``image_pos``     a learned embedding per image token (grid cell), so words such as "top left"
  can address a cell whatever the question's length
* ``language_model`` a Llama decoder; ``lm_head`` reads text tokens out
* ``gen_embed`` / ``gen_head`` embed and predict discrete image codes (a k-means patch codebook,
  see :mod:`fedumm.models.reference.vq`),
  autoregressively in raster order, with classifier-free guidance
* ``vision_probe``  auxiliary per-patch shape/colour head used only while pretraining
* ``ground_head``   auxiliary per-image-token head used only while pretraining: does this cell
  hold what the question names?
* ``gen_probe``     auxiliary head used only while pretraining: the shape and colour of the cell
  whose code comes next, a factorised target next to the code itself

Sequences (padding sits in the middle and is masked; positions skip it):

* understanding: ``[align][pad..][question][SEP][image][SEP] -> answer [EOS]``; the question
  comes first so that every image token can check itself against it (grounding), and the
  answer then only has to gather the cells that matched
* generation:    ``[align][pad..][prompt][BOI] -> code_0 .. code_{L-1}``
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder


@dataclass
class UMMConfig:
    image_size: int = 48
    vision_patch: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 384
    hidden: int = 160
    layers: int = 4
    heads: int = 5
    intermediate: int = 448
    text_vocab: int = 78
    image_codes: int = 256
    gen_patch: int = 16
    alignment_tokens: int = 4
    probe_classes: int = 18  # 7 shape classes (incl. none) + 11 colour classes (incl. none)
    max_positions: int = 256

    @property
    def vision_grid(self) -> int:
        return self.image_size // self.vision_patch

    @property
    def image_tokens(self) -> int:
        return (self.vision_grid // 2) ** 2

    @property
    def gen_tokens(self) -> int:
        return (self.image_size // self.gen_patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class VisionEmbeddings(nn.Module):
    """Convolutional stem + learned positions: a stronger start than a bare patch projection."""

    def __init__(self, cfg: UMMConfig) -> None:
        super().__init__()
        # a stride-2 convolution first (cheap on a CPU, unlike a full-resolution one), then the
        # patch projection over the remaining vision_patch / 2 pixels
        self.stem = nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1)
        half = cfg.vision_patch // 2
        self.patch_embedding = nn.Conv2d(32, cfg.vision_hidden, half, stride=half)
        self.position_embedding = nn.Embedding(cfg.vision_grid**2, cfg.vision_hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(F.gelu(self.stem(pixels)))  # (B, Dv, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, Dv)
        return x + self.position_embedding.weight[None]


class VisionModel(nn.Module):
    def __init__(self, cfg: UMMConfig) -> None:
        super().__init__()
        vcfg = SiglipVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size, patch_size=cfg.vision_patch, attn_implementation="sdpa",
        )
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(vcfg)
        self.post_layernorm = nn.LayerNorm(cfg.vision_hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.encoder(inputs_embeds=self.embeddings(pixels)).last_hidden_state
        return self.post_layernorm(h)


class Aligner(nn.Module):
    """Merge 2x2 neighbouring patches (as InternVL's pixel shuffle) and project to the decoder."""

    def __init__(self, cfg: UMMConfig) -> None:
        super().__init__()
        self.grid = cfg.vision_grid
        self.fc1 = nn.Linear(4 * cfg.vision_hidden, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, _, d = feats.shape
        g = self.grid
        x = feats.reshape(b, g // 2, 2, g // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (g // 2) ** 2, 4 * d)
        return self.fc2(F.gelu(self.fc1(x)))


class AlignmentTokens(nn.Module):
    def __init__(self, cfg: UMMConfig) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(cfg.alignment_tokens, cfg.hidden) * 0.02)

    def forward(self, batch: int) -> torch.Tensor:
        return self.tokens[None].expand(batch, -1, -1)


class ReferenceUMM(nn.Module):
    """The unified model. Inputs are token ids and uint8 images; see the module docstring."""

    def __init__(self, cfg: UMMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)
        self.aligner = Aligner(cfg)
        self.alignment = AlignmentTokens(cfg)
        lcfg = LlamaConfig(
            vocab_size=cfg.text_vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
            pad_token_id=0, attn_implementation="sdpa",
        )
        self.language_model = LlamaModel(lcfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.text_vocab, bias=False)
        self.gen_embed = nn.Embedding(cfg.image_codes, cfg.hidden)
        self.gen_pos = nn.Embedding(cfg.gen_tokens, cfg.hidden)  # which cell comes next
        self.gen_head = nn.Linear(cfg.hidden, cfg.image_codes)
        self.missing_image = nn.Parameter(torch.zeros(cfg.hidden))
        self.image_pos = nn.Embedding(cfg.image_tokens, cfg.hidden)
        nn.init.normal_(self.image_pos.weight, std=0.02)  # the scale of the text embeddings
        self.vision_probe = nn.Linear(cfg.vision_hidden, cfg.probe_classes)
        self.ground_head = nn.Linear(cfg.hidden, 1)
        self.gen_probe = nn.Linear(cfg.hidden, cfg.probe_classes)

    # ------------------------------------------------------------------ pieces
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) -> decoder tokens (B, 16, D) and patch features (B, 64, Dv)."""
        pixels = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        pixels = pixels.to(self.alignment.tokens.dtype)  # bfloat16 models take bfloat16 pixels
        feats = self.vision_model(pixels)
        return self.aligner(feats), feats

    def _embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def _decode(self, embeds, mask, cache=None, positions=None):
        if positions is None:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=positions, cache=cache,
                                  use_cache=cache is not None)
        return out.last_hidden_state, positions

    def _understanding_prefix(self, images, q_ids, q_mask, image_present=None):
        """``[align][question ending in SEP][image][SEP]``; ``q_ids`` is left-padded, so its
        last column is every row's SEP, repeated after the image to read the answer from."""
        b = q_ids.shape[0]
        img_tok, feats = self.encode_image(images)
        if image_present is not None:  # missing-modality samples see a learned placeholder
            keep = image_present.to(img_tok.dtype)[:, None, None]
            img_tok = img_tok * keep + self.missing_image * (1 - keep)
        img_tok = img_tok + self.image_pos.weight[None]
        embeds = torch.cat([self.alignment(b), self._embed_text(q_ids), img_tok,
                            self._embed_text(q_ids[:, -1:])], dim=1)
        head = q_mask.new_ones(b, self.config.alignment_tokens)
        tail = q_mask.new_ones(b, img_tok.shape[1] + 1)
        return embeds, torch.cat([head, q_mask, tail], dim=1), feats

    # ------------------------------------------------------------------ losses
    def understanding_loss(self, images, q_ids, q_mask, a_ids, a_mask, image_present=None,
                           probe=None, probe_weight: float = 0.5, ground=None,
                           ground_weight: float = 1.0):
        """Cross-entropy of the answer tokens (answer + EOS) given image and question. Auxiliary
        pretraining losses: ``probe`` (B, patches, 2) labels supervise the vision encoder per
        patch; ``ground`` (B, image tokens) marks the cells the question refers to, predicted
        from the decoder's hidden state at each image token."""
        logits, hidden, start, feats = self._answer_logits(images, q_ids, q_mask, a_ids, a_mask,
                                                           image_present)
        labels = a_ids.masked_fill(a_mask == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if probe is not None:
            loss = loss + probe_weight * self._probe_loss(feats, probe)
        if ground is not None:
            if ground.shape[1] != self.config.image_tokens:
                raise ValueError(f"ground labels have {ground.shape[1]} cells, the model "
                                 f"{self.config.image_tokens} image tokens")
            cells = hidden[:, start - self.config.image_tokens:start]
            pred = self.ground_head(cells).squeeze(-1)
            loss = loss + ground_weight * F.binary_cross_entropy_with_logits(pred, ground.float())
        return loss

    def _answer_logits(self, images, q_ids, q_mask, a_ids, a_mask, image_present=None):
        """Teacher-forced logits (B, A, V) of the answer tokens, the decoder's hidden states,
        the position that predicts the first answer token, and the vision features."""
        prefix, mask, feats = self._understanding_prefix(images, q_ids, q_mask, image_present)
        embeds = torch.cat([prefix, self._embed_text(a_ids)], dim=1)
        hidden, _ = self._decode(embeds, torch.cat([mask, a_mask], dim=1))
        start = prefix.shape[1] - 1  # the final SEP predicts the first answer token
        return self.lm_head(hidden[:, start:start + a_ids.shape[1]]), hidden, start, feats

    @torch.no_grad()
    def answer_log_likelihood(self, images, q_ids, q_mask, a_ids, a_mask,
                              image_present=None) -> torch.Tensor:
        """(B,) summed log-probability of each row's answer tokens (``a_mask`` marks them)."""
        logits, *_ = self._answer_logits(images, q_ids, q_mask, a_ids, a_mask, image_present)
        logp = logits.float().log_softmax(-1).gather(-1, a_ids[..., None]).squeeze(-1)
        return (logp * a_mask).sum(1)

    def _generation_prefix(self, p_ids, p_mask):
        b = p_ids.shape[0]
        embeds = torch.cat([self.alignment(b), self._embed_text(p_ids)], dim=1)
        embeds[:, -1] = embeds[:, -1] + self.gen_pos.weight[0]  # BOI predicts cell 0
        ones = p_mask.new_ones(b, self.config.alignment_tokens)
        return embeds, torch.cat([ones, p_mask], dim=1)

    def _gen_hidden(self, p_ids, p_mask, codes):
        """Teacher-forced hidden states (B, L, D) of the positions predicting each code."""
        prefix, mask = self._generation_prefix(p_ids, p_mask)
        n = codes.shape[1]
        code_in = self.gen_embed(codes[:, :-1]) + self.gen_pos.weight[1:n][None]
        embeds = torch.cat([prefix, code_in], dim=1)
        full = torch.cat([mask, torch.ones_like(codes[:, :-1])], dim=1)
        hidden, _ = self._decode(embeds, full)
        return hidden[:, prefix.shape[1] - 1:]

    def generation_loss(self, p_ids, p_mask, codes, cells=None, cell_weight: float = 0.5):
        """Cross-entropy of the image codes (B, L) given the prompt (left-padded, ends in BOI);
        with ``cells`` (B, L, 2) shape/colour labels, plus the factorised pretraining loss."""
        hidden = self._gen_hidden(p_ids, p_mask, codes)
        logits = self.gen_head(hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        if cells is not None:
            loss = loss + cell_weight * self._attribute_loss(self.gen_probe(hidden), cells)
        return loss

    @torch.no_grad()
    def generation_accuracy(self, p_ids, p_mask, codes) -> float:
        """Teacher-forced top-1 accuracy of the image codes: a cheap held-out quality."""
        pred = self.gen_head(self._gen_hidden(p_ids, p_mask, codes)).argmax(-1)
        return float((pred == codes).float().mean())

    def _probe_loss(self, feats: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        return self._attribute_loss(self.vision_probe(feats), probe)

    @staticmethod
    def _attribute_loss(logits: torch.Tensor, probe: torch.Tensor, num_shapes: int = 7):
        """Shape + colour cross-entropy of (B, N, 7 + 11) logits against (B, N, 2) labels."""
        ls = F.cross_entropy(logits[..., :num_shapes].reshape(-1, num_shapes),
                             probe[..., 0].reshape(-1))
        nc = logits.shape[-1] - num_shapes
        lc = F.cross_entropy(logits[..., num_shapes:].reshape(-1, nc), probe[..., 1].reshape(-1))
        return ls + lc

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def answer(self, images, q_ids, q_mask, eos_id: int, max_new_tokens: int = 3,
               image_present=None) -> list[list[int]]:
        """Greedy answers (token ids without EOS) for a batch of questions."""
        embeds, mask, _ = self._understanding_prefix(images, q_ids, q_mask, image_present)
        cache = DynamicCache()
        hidden, pos = self._decode(embeds, mask, cache)
        b = q_ids.shape[0]
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=q_ids.device)
        last = pos[:, -1:]
        for _ in range(max_new_tokens):
            tok = self.lm_head(hidden[:, -1]).argmax(-1)
            for i in range(b):
                if not done[i] and tok[i].item() != eos_id:
                    out[i].append(int(tok[i]))
            done |= tok == eos_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            last = last + 1
            hidden, _ = self._decode(self._embed_text(tok[:, None]), mask, cache, last)
        return out

    @torch.no_grad()
    def generate_codes(self, p_ids, p_mask, u_ids, u_mask, *, cfg_scale: float = 3.0,
                       temperature: float = 0.7, top_k: int = 20,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample image codes (B, L) with classifier-free guidance against the unconditional
        prompt ``u_ids`` (``[BOI]`` alone, padded to the same length)."""
        b, n = p_ids.shape[0], self.config.gen_tokens
        embeds, mask = self._generation_prefix(torch.cat([p_ids, u_ids]),
                                               torch.cat([p_mask, u_mask]))
        cache = DynamicCache()
        hidden, pos = self._decode(embeds, mask, cache)
        last = pos[:, -1:]
        codes = torch.zeros(b, n, dtype=torch.long, device=p_ids.device)
        for t in range(n):
            logits = self.gen_head(hidden[:, -1]).float()
            logits = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
            logits = logits / max(temperature, 1e-5)
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            codes[:, t] = nxt
            if t + 1 == n:
                break
            step = self.gen_embed(nxt.repeat(2)) + self.gen_pos.weight[t + 1]
            mask = torch.cat([mask, mask.new_ones(2 * b, 1)], dim=1)
            last = last + 1
            hidden, _ = self._decode(step[:, None], mask, cache, last)
        return codes

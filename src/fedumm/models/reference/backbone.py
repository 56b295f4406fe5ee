"""The reference backbone: our small UMM with its tokenizer and image codebook, one folder.

Checkpoint folder: ``model.safetensors`` (weights), ``config.json`` (model config + how it was
made), ``tokenizer.json`` (text tokenizer) and ``codebook.safetensors`` (image tokenizer).

Generation quality (for the quality-weighted rule): teacher-forced top-1 accuracy of the image
codes of held-out generation targets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.models.batching import pad_sequences, split_tasks
from fedumm.models.checksums import verify_checksums, write_checksums
from fedumm.models.groups import AdapterGroup, DecoderLayers
from fedumm.models.placement import (
    ModelPlacement,
    base_state_dict,
    in_eval_mode,
    state_fingerprint,
)
from fedumm.models.protocol import Batch
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.reference.umm import ReferenceUMM, UMMConfig
from fedumm.models.reference.vq import PatchCodebook

WEIGHTS, CONFIG, TOKENIZER, CODEBOOK = (
    "model.safetensors", "config.json", "tokenizer.json", "codebook.safetensors")
SHIPPED_BASE = Path(__file__).resolve().parents[2] / "assets" / "base"

# Module names follow Janus / LLaVA-style UMMs, so the targets look like real ones. The vision
# tower only sees understanding samples, the generation head only generation samples; the
# decoder and the alignment tokens see both.
REFERENCE_GROUPS = (
    AdapterGroup("vision", r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj"
                           r"|mlp\.fc[12])|aligner\.fc[12]", (UNDERSTANDING,), needs_images=True),
    AdapterGroup("language", r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj"
                             r"|mlp\.(gate|up|down)_proj)", (UNDERSTANDING, GENERATION)),
    AdapterGroup("generation", r"gen_embed|gen_head", (GENERATION,)),
    AdapterGroup("alignment", None, (UNDERSTANDING, GENERATION), ("alignment",)),
)
_CODE_CHUNK = 512  # images quantised per call (bounded memory)


def resolve_checkpoint(name: str | Path) -> Path:
    """``"base"`` names the shipped checkpoint; anything else is a folder path."""
    path = SHIPPED_BASE if str(name) == "base" else Path(name)
    missing = [f for f in (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a fedumm reference checkpoint: missing {missing}")
    return path


class ReferenceBackbone(ModelPlacement):
    """Model + tokenizer + codebook, behind the :class:`~fedumm.models.protocol.Backbone`
    protocol."""

    kind = "reference"

    def __init__(self, model: ReferenceUMM, tokenizer: TextTokenizer, codebook: PatchCodebook,
                 meta: dict | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.meta = dict(meta or {})
        self._codes: dict[str, torch.Tensor] = {}  # sample id -> image codes of its target

    @property
    def config(self) -> UMMConfig:
        return self.model.config

    @property
    def groups(self) -> tuple[AdapterGroup, ...]:
        return REFERENCE_GROUPS

    @property
    def decoder_layers(self) -> DecoderLayers:
        return DecoderLayers(r"language_model\.layers\.(\d+)\.", self.config.layers)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def input_size(self) -> int:
        """The reference model takes images of exactly this side (no resizing)."""
        return self.config.image_size

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None
           ) -> ReferenceBackbone:
        self.model.to(device=device, dtype=dtype)
        return self

    # --------------------------------------------------------------- persistence
    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.base_state().items()}
        save_file(state, str(path / WEIGHTS))
        info = {"model": self.config.to_dict(), **self.meta, **(meta or {}),
                "fingerprint": state_fingerprint(state)}
        (path / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save(path / TOKENIZER)
        self.codebook.save(path / CODEBOOK)
        write_checksums(path, (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK))
        return path

    @classmethod
    def load(cls, name: str | Path) -> ReferenceBackbone:
        """A checkpoint folder, every file checked against its SHA256SUMS.json and the weights
        against their fingerprint (a clear error naming a corrupt or missing file)."""
        from safetensors.torch import load_file

        path = resolve_checkpoint(name)
        verify_checksums(path, (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK))
        info = json.loads((path / CONFIG).read_text())
        if "fingerprint" not in info:
            raise ValueError(f"{path / CONFIG} has no fingerprint of the weights; the checkpoint "
                             "cannot be verified")
        model = ReferenceUMM(UMMConfig(**info["model"]))
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        model.eval()
        meta = {k: v for k, v in info.items() if k != "model"}
        bb = cls(model, TextTokenizer.load(path / TOKENIZER), PatchCodebook.load(path / CODEBOOK),
                 meta)
        if bb.fingerprint() != info["fingerprint"]:
            raise ValueError(f"{path}: weights do not match the fingerprint in {CONFIG}")
        return bb

    def base_state(self) -> dict[str, torch.Tensor]:
        """The frozen weights (without any LoRA / adapter copies), as saved in a checkpoint."""
        return base_state_dict(self.model)

    def fingerprint(self) -> str:
        return state_fingerprint(self.base_state())

    # --------------------------------------------------------------- batches
    def _target_codes(self, samples: Sequence[Sample]) -> torch.Tensor:
        missing = [s for s in samples if s.id not in self._codes]
        if missing:
            self.prepare(missing)
        return torch.stack([self._codes[s.id] for s in samples])

    def prepare(self, samples: Sequence[Sample],
                progress: Callable[[int, int], None] | None = None) -> None:
        """Quantise the target images of generation samples once (the codebook is frozen);
        ``progress(done, total)`` after each chunk of images."""
        gen = [s for s in samples if s.task == GENERATION and s.id not in self._codes]
        for i in range(0, len(gen), _CODE_CHUNK):
            chunk = gen[i:i + _CODE_CHUNK]
            codes = self.codebook.encode(np.stack([s.load_image() for s in chunk]))
            self._codes.update({s.id: c for s, c in zip(chunk, codes, strict=True)})
            if progress is not None:
                progress(i + len(chunk), len(gen))

    def _images(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, S, S, 3) and whether each sample has its image (a missing one is zeros)."""
        size = self.config.image_size
        arrays = []
        for s in samples:
            img = s.load_image() if s.image is not None else np.zeros((size, size, 3), np.uint8)
            if img.shape != (size, size, 3):
                raise ValueError(f"sample {s.id}: image of shape {img.shape}, the reference "
                                 f"model takes {size}x{size} RGB images")
            arrays.append(img)
        present = torch.tensor([s.image is not None for s in samples], dtype=torch.bool)
        return torch.from_numpy(np.stack(arrays)), present

    def collate(self, samples: Sequence[Sample], drop_text: Sequence[bool] | None = None
                ) -> Batch:
        tok, dev = self.tokenizer, self.device
        und, gen = split_tasks(samples, drop_text)
        batch = Batch()
        if und:
            images, present = self._images(und)
            q_ids, q_mask = pad_sequences([tok.encode(s.text) + [tok.sep_id] for s in und], True)
            a_ids, a_mask = pad_sequences(self.answer_token_ids([s.answer for s in und]),
                                          False)
            batch.parts[UNDERSTANDING] = {
                "images": images.to(dev), "q_ids": q_ids.to(dev), "q_mask": q_mask.to(dev),
                "a_ids": a_ids.to(dev), "a_mask": a_mask.to(dev),
                "image_present": present.to(dev)}
            batch.counts[UNDERSTANDING] = len(und)
        if gen:
            seqs = [[tok.boi_id] if (d or s.text is None) else tok.encode(s.text) + [tok.boi_id]
                    for s, d in gen]
            p_ids, p_mask = pad_sequences(seqs, left=True)
            batch.parts[GENERATION] = {"p_ids": p_ids.to(dev), "p_mask": p_mask.to(dev),
                                       "codes": self._target_codes([s for s, _ in gen]).to(dev)}
            batch.counts[GENERATION] = len(gen)
        return batch

    @property
    def answer_head(self) -> torch.nn.Module:
        """The text head the answer tokens are read from (its logits: the text vocabulary)."""
        return self.model.lm_head

    def answer_token_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """The supervised ids of each answer: its words and EOS."""
        return [self.tokenizer.encode(a) + [self.tokenizer.eos_id] for a in answers]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = {}
        if UNDERSTANDING in batch.parts:
            u = batch.parts[UNDERSTANDING]
            out[UNDERSTANDING] = self.model.understanding_loss(
                u["images"], u["q_ids"], u["q_mask"], u["a_ids"], u["a_mask"],
                u["image_present"])
        if GENERATION in batch.parts:
            g = batch.parts[GENERATION]
            out[GENERATION] = self.model.generation_loss(g["p_ids"], g["p_mask"], g["codes"])
        return out

    @torch.no_grad()
    def generation_quality(self, samples: Sequence[Sample]) -> float:
        """Teacher-forced top-1 accuracy of the held-out targets' image codes."""
        g = self.collate(samples).parts[GENERATION]
        return self.model.generation_accuracy(g["p_ids"], g["p_mask"], g["codes"])

    # --------------------------------------------------------------- capabilities
    def _question_batch(self, images: Sequence[np.ndarray | None], questions: Sequence[str]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images (uint8), left-padded question ids and mask, and which images are present
        (None when all are); a None image is a missing one (the model's learned placeholder)."""
        tok, dev = self.tokenizer, self.device
        size = self.config.image_size
        present = None
        if any(im is None for im in images):
            present = torch.tensor([im is not None for im in images], device=dev)
            images = [np.zeros((size, size, 3), np.uint8) if im is None else im for im in images]
        q_ids, q_mask = pad_sequences([tok.encode(q) + [tok.sep_id] for q in questions], True)
        pixels = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(dev)
        return pixels, q_ids.to(dev), q_mask.to(dev), present

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer maps to ``[UNK]`` (not in its vocabulary after
        lower-casing). ``answer`` decodes greedily over the whole text vocabulary, so an answer
        is producible only if all its words are known."""
        return self.tokenizer.unknown_words(text)

    @torch.no_grad()
    @in_eval_mode
    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
               batch_size: int = 64) -> list[str]:
        """Greedy answers; a None image is a missing one (the model's learned placeholder)."""
        tok = self.tokenizer
        out: list[str] = []
        for s in range(0, len(questions), batch_size):
            pixels, q_ids, q_mask, present = self._question_batch(
                images[s:s + batch_size], questions[s:s + batch_size])
            ids = self.model.answer(pixels, q_ids, q_mask, tok.eos_id, image_present=present)
            out += [tok.decode(x) for x in ids]
        return out

    @torch.no_grad()
    @in_eval_mode
    def answer_likelihoods(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
                           candidates: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, C) log-likelihood of each candidate answer (its tokens and EOS) per question."""
        tok, dev = self.tokenizer, self.device
        out = np.zeros((len(questions), len(candidates)), dtype=np.float64)
        for s in range(0, len(questions), batch_size):
            pixels, q_ids, q_mask, present = self._question_batch(
                images[s:s + batch_size], questions[s:s + batch_size])
            for j, cand in enumerate(candidates):
                a = torch.tensor(tok.encode(cand) + [tok.eos_id], device=dev)
                a_ids = a.expand(q_ids.shape[0], -1)
                ll = self.model.answer_log_likelihood(pixels, q_ids, q_mask, a_ids,
                                                      torch.ones_like(a_ids), present)
                out[s:s + len(ll), j] = ll.double().cpu().numpy()
        return out

    @torch.no_grad()
    @in_eval_mode
    def generate(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 64,
                 cfg_scale: float | None = None, temperature: float = 0.7, top_k: int = 20
                 ) -> np.ndarray:
        """Images (N, S, S, 3) uint8 for prompts; deterministic in ``seed``. ``cfg_scale``:
        the classifier-free guidance scale (None: 3.0)."""
        cfg_scale = 3.0 if cfg_scale is None else cfg_scale
        gen = torch.Generator().manual_seed(seed)
        size, tok, dev = self.config.image_size, self.tokenizer, self.device
        chunks = []
        for s in range(0, len(prompts), batch_size):
            part = prompts[s:s + batch_size]
            p_ids, p_mask = pad_sequences([tok.encode(p) + [tok.boi_id] for p in part], True)
            # the unconditional prompt ([BOI] alone), left-padded to the same length
            n = p_ids.shape[1]
            u_ids = torch.zeros(len(part), n, dtype=torch.long)
            u_ids[:, -1] = tok.boi_id
            u_mask = torch.zeros(len(part), n, dtype=torch.long)
            u_mask[:, -1] = 1
            codes = self.model.generate_codes(
                p_ids.to(dev), p_mask.to(dev), u_ids.to(dev), u_mask.to(dev),
                cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, generator=gen)
            chunks.append(self.codebook.decode(codes.cpu(), size))
        return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)

"""The Backbone: a frozen UMM with its tokenizer and image codebook, saved as one folder.

Checkpoint folder: ``model.safetensors`` (weights), ``config.json`` (model config + how it was
made), ``tokenizer.json`` (text tokenizer) and ``codebook.safetensors`` (image tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedumm.models.batching import SampleEncoder
from fedumm.models.text_tokenizer import TextTokenizer
from fedumm.models.umm import ReferenceUMM, UMMConfig
from fedumm.models.vq import PatchCodebook

WEIGHTS, CONFIG, TOKENIZER, CODEBOOK = (
    "model.safetensors", "config.json", "tokenizer.json", "codebook.safetensors")
SHIPPED_BASE = Path(__file__).resolve().parent.parent / "assets" / "base"


def resolve_checkpoint(name: str | Path) -> Path:
    """``"base"`` names the shipped checkpoint; anything else is a folder path."""
    path = SHIPPED_BASE if str(name) == "base" else Path(name)
    missing = [f for f in (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a fedumm checkpoint: missing {missing}")
    return path


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Backbone:
    """Model + tokenizer + codebook, with the two capabilities of a UMM."""

    def __init__(self, model: ReferenceUMM, tokenizer: TextTokenizer, codebook: PatchCodebook,
                 meta: dict | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.encoder = SampleEncoder(tokenizer, codebook, model.config.vision_patch)
        self.meta = dict(meta or {})
        self._base_fingerprint: str | None = None

    @property
    def config(self) -> UMMConfig:
        return self.model.config

    # --------------------------------------------------------------- persistence
    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.base_state().items()}
        save_file(state, str(path / WEIGHTS))
        info = {"model": self.config.to_dict(), **self.meta, **(meta or {}),
                "fingerprint": state_fingerprint(state)}
        (path / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save(path / TOKENIZER)
        self.codebook.save(path / CODEBOOK)
        return path

    @classmethod
    def load(cls, name: str | Path) -> Backbone:
        path = resolve_checkpoint(name)
        info = json.loads((path / CONFIG).read_text())
        model = ReferenceUMM(UMMConfig(**info["model"]))
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state, strict=True)
        model.eval()
        meta = {k: v for k, v in info.items() if k != "model"}
        bb = cls(model, TextTokenizer.load(path / TOKENIZER), PatchCodebook.load(path / CODEBOOK),
                 meta)
        if "fingerprint" in info and bb.fingerprint() != info["fingerprint"]:
            raise ValueError(f"{path}: weights do not match the fingerprint in {CONFIG}")
        return bb

    def base_state(self) -> dict[str, torch.Tensor]:
        """The frozen weights (without any LoRA / adapter copies), as saved in a checkpoint."""
        from fedumm.models.lora import base_state_dict

        return base_state_dict(self.model)

    def fingerprint(self) -> str:
        """sha256 of the frozen weights, so clients can refuse a backbone they don't expect."""
        return state_fingerprint(self.base_state())

    # --------------------------------------------------------------- capabilities
    @torch.no_grad()
    def answer(self, images: np.ndarray, questions: Sequence[str], batch_size: int = 64,
               image_present: Sequence[bool] | None = None) -> list[str]:
        """Answer questions about images (uint8 (N, H, W, 3)); greedy decoding."""
        was = self.model.training
        self.model.eval()
        out: list[str] = []
        for s in range(0, len(questions), batch_size):
            b = self.encoder.question_batch(images[s:s + batch_size], questions[s:s + batch_size])
            present = None
            if image_present is not None:
                present = torch.tensor(list(image_present[s:s + batch_size]), dtype=torch.bool)
            ids = self.model.answer(b["images"], b["q_ids"], b["q_mask"], self.tokenizer.eos_id,
                                    image_present=present)
            out += [self.tokenizer.decode(x) for x in ids]
        self.model.train(was)
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 64,
                 cfg_scale: float = 3.0, temperature: float = 0.7, top_k: int = 20) -> np.ndarray:
        """Images (N, S, S, 3) uint8 for prompts; deterministic in ``seed``."""
        was = self.model.training
        self.model.eval()
        gen = torch.Generator().manual_seed(seed)
        size = self.config.image_size
        chunks = []
        for s in range(0, len(prompts), batch_size):
            b = self.encoder.prompt_batch(prompts[s:s + batch_size])
            codes = self.model.generate_codes(b["p_ids"], b["p_mask"], b["u_ids"], b["u_mask"],
                                              cfg_scale=cfg_scale, temperature=temperature,
                                              top_k=top_k, generator=gen)
            chunks.append(self.codebook.decode(codes, size))
        self.model.train(was)
        return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)

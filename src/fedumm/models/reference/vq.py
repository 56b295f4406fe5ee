"""A discrete image tokenizer for generation: a k-means codebook over square pixel patches.

As in Chameleon / Janus, images become a grid of codes that the decoder predicts
autoregressively; here the codebook is fitted with k-means (no encoder network), which is enough
for ShapesWorld's flat-coloured scenes and fits in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class PatchCodebook:
    """Codes for ``patch x patch`` RGB patches; an image of side S becomes (S/patch)^2 codes."""

    def __init__(self, codebook: torch.Tensor, patch: int) -> None:
        self.codebook = codebook.float()  # (num_codes, patch*patch*3), values in [0, 1]
        self.patch = patch

    @property
    def num_codes(self) -> int:
        return int(self.codebook.shape[0])

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, L, patch*patch*3) float in [0, 1]."""
        b, h, w, _ = images.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = images.float().div(255.0).reshape(b, h // p, p, w // p, p, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * 3)

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, L) int64 codes (nearest codebook entry)."""
        x = self._patches(torch.as_tensor(np.asarray(images)))
        d = torch.cdist(x.reshape(-1, x.shape[-1]), self.codebook)
        return d.argmin(dim=1).reshape(x.shape[0], x.shape[1])

    def decode(self, codes: torch.Tensor, size: int) -> np.ndarray:
        """(B, L) codes -> (B, size, size, 3) uint8."""
        p, g = self.patch, size // self.patch
        x = self.codebook[codes.long()].reshape(codes.shape[0], g, g, p, p, 3)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(codes.shape[0], size, size, 3)
        return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()

    def save(self, path: str | Path) -> None:
        save_file({"codebook": self.codebook.contiguous()}, str(path),
                  metadata={"patch": str(self.patch)})

    @classmethod
    def load(cls, path: str | Path) -> PatchCodebook:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            patch = int(f.metadata()["patch"])
        return cls(load_file(str(path))["codebook"], patch)

    @classmethod
    def fit(cls, images: np.ndarray, patch: int, num_codes: int, seed: int = 0,
            iters: int = 20) -> PatchCodebook:
        """k-means (k-means++ seeding) over all patches of ``images``; deterministic in seed."""
        gen = torch.Generator().manual_seed(seed)
        x = cls(torch.zeros(1, patch * patch * 3), patch)._patches(torch.as_tensor(images))
        x = x.reshape(-1, x.shape[-1])
        # unique patches weighted by frequency keep k-means cheap on mostly-flat images
        uniq, counts = torch.unique(x, dim=0, return_counts=True)
        w = counts.float()
        k = min(num_codes, len(uniq))
        centers = uniq[torch.multinomial(w, 1, generator=gen)]
        d2 = torch.cdist(uniq, centers).squeeze(1) ** 2
        for _ in range(1, k):  # k-means++
            nxt = uniq[torch.multinomial(w * d2 + 1e-12, 1, generator=gen)]
            centers = torch.cat([centers, nxt])
            d2 = torch.minimum(d2, (torch.cdist(uniq, nxt).squeeze(1) ** 2))
        for _ in range(iters):
            assign = torch.cdist(uniq, centers).argmin(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, assign, uniq * w[:, None])
            mass = torch.zeros(k).index_add_(0, assign, w)
            keep = mass > 0
            centers[keep] = sums[keep] / mass[keep, None]
        if k < num_codes:  # pad so the vocabulary size is what the config says
            centers = torch.cat([centers, centers[:1].repeat(num_codes - k, 1)])
        return cls(centers, patch)

"""Janus's generation targets: the image as its generation encoder sees it, and its VQ codes.

* The image: Janus's implementation details (arXiv 2410.13848; Janus-Pro, 2501.17811, keeps
  them) resize a generation image's short side to the image size and crop the long side to
  it, where understanding images are resized on the long side and padded (the processor's
  letterbox, ``VLMImageProcessor``). Pixels in
  [-1, 1], what the VQ tokenizer (and ``decode_image_tokens``) works in.
* The codes: the official tokenizer (``janus/models/vq_model.py``, ``VectorQuantizer.forward``
  with ``codebook_l2_norm=True``, as ``VQ_16`` builds it) l2-normalises each latent vector and
  each codebook row before the nearest-row lookup. transformers' ``JanusVQVAE.encode`` looks
  up the raw vectors, which picks other rows wherever the codebook's norms differ, so the
  lookup is done here on its ``encoder`` and ``quant_conv``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: ``image`` (H, W, 3) with its short side resized to ``size``
    (bicubic) and the centre of its long side kept."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(pil)[top:top + size, left:left + size]


def target_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1]: the centre-cropped generation targets."""
    arr = np.stack([centre_crop(im, size) for im in images]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def vq_codes(vqmodel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, h * w) codes of ``pixels`` (B, 3, S, S): the nearest l2-normalised codebook row to
    each l2-normalised latent vector (distances in float32, row-major as the decoder reads)."""
    z = vqmodel.quant_conv(vqmodel.encoder(pixels))  # (B, C, h, w)
    z = F.normalize(z.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, h * w, C)
    book = F.normalize(vqmodel.quantize.embedding.weight.float(), dim=-1)  # (N, C)
    dist = z.pow(2).sum(-1, keepdim=True) + book.pow(2).sum(-1) - 2 * z @ book.T
    return dist.argmin(-1)

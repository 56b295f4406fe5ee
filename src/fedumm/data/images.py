"""Opening images lazily: a file or a member of a tar archive, as a uint8 RGB array."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def decode_image(data: bytes | Path | str, where: str) -> np.ndarray:
    """Bytes or a file -> uint8 (H, W, 3); ``where`` names the source in errors."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"image not found: {where}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {where}: {exc}") from exc


def load_image(path: str | Path, member: str = "", offset: int = -1, size: int = 0
               ) -> np.ndarray:
    """An image file, or ``member`` of the tar archive at ``path`` (read directly at
    ``offset`` when the archive was indexed, else found by scanning it)."""
    if not member:
        return decode_image(Path(path), str(path))
    where = f"{path}::{member}"
    if offset >= 0:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"archive not found: {path}") from exc
        if len(data) != size:
            raise ValueError(f"{where}: archive is shorter than its index (changed since?)")
        return decode_image(data, where)
    try:
        with tarfile.open(path) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise ValueError(f"{where} is not a file")
            return decode_image(f.read(), where)
    except KeyError as exc:
        raise FileNotFoundError(f"image not found: {where}") from exc

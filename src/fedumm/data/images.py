"""Opening images lazily: a file or a member of a tar archive, as a uint8 RGB array.

:func:`decode_image` is the one place every image file passes through: the size its header
declares is checked against a pixel budget before anything is decoded (a small file can declare
20000 x 20000 pixels), every mode and bit depth becomes 8-bit RGB without clipping (16-bit PNGs
are scaled), and a truncated or unreadable file is a :class:`DataFileError` naming it.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL warns past this many pixels (and refuses past twice as many): far above a training image,
# and a decoded RGB image of this size already takes 256 MiB
MAX_PIXELS = 89_478_485
# modes PIL converts to RGB exactly as stored (alpha dropped, palette and CMYK looked up)
_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr",
              "LAB", "HSV")


class DataFileError(ValueError):
    """A data file, or one record of it, is not what its format expects."""

    def __init__(self, path: str | Path, where: str, problem: str) -> None:
        self.path, self.where = str(path), where
        problem = " ".join(problem.split())  # one line, whatever a library's message held
        super().__init__(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")


@contextmanager
def _opened(data: bytes | Path | str, where: str) -> Iterator[Image.Image]:
    """The image with its header read and its size within :data:`MAX_PIXELS`; every failure
    (not found aside) is a DataFileError naming ``where``."""
    try:
        with warnings.catch_warnings():  # the budget below says it, naming the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"image not found: {where}") from exc
    except Image.DecompressionBombError as exc:
        raise DataFileError(where, "", f"refused before decoding: {exc}") from None
    except Exception as exc:  # PIL's plugins raise many kinds for bytes that are no image
        raise DataFileError(where, "", f"not a readable image ({_reason(exc)})") from None
    with im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise DataFileError(where, "", f"declares {w} x {h} pixels, above the budget of "
                                f"{MAX_PIXELS} pixels; refused before decoding")
        if w < 1 or h < 1:
            raise DataFileError(where, "", f"declares {w} x {h} pixels")
        yield im


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def check_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (nothing decoded): readers
    check every image this way, so a file that is no image or declares too many pixels stops
    the run before training starts."""
    with _opened(Path(path), str(path)) as im:
        return im.size


def _to_rgb(im: Image.Image, where: str) -> np.ndarray:
    """uint8 (H, W, 3) of any mode: 8-bit modes as PIL converts them; 16-bit grayscale scaled
    to 8 bits by its high byte (as PIL reads 16-bit RGB), not clipped to white."""
    mode = im.mode
    if mode in _EIGHT_BIT:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit PNG / TIFF) and I (32-bit int)
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataFileError(where, "", f"integer pixels outside 0..65535 (mode {mode}); "
                                "save it as an 8- or 16-bit image")
        if mode != "I" or (a.size and a.max() > 255):  # 16-bit values (an I image: past 255)
            a = a.astype(np.uint32) >> 8
        gray = a.astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    raise DataFileError(where, "", f"unsupported pixel mode {mode} (float or unusual pixels "
                        "have no single 8-bit reading); save it as an 8- or 16-bit image")


def decode_image(data: bytes | Path | str, where: str, *, exif: bool = False) -> np.ndarray:
    """Bytes or a file -> uint8 (H, W, 3); ``where`` names the source in errors. ``exif``:
    turn the image as its EXIF orientation says (as GenEval's scorer does)."""
    with _opened(data, where) as im:
        try:
            im.load()  # decodes: a truncated file fails here
            return _to_rgb(ImageOps.exif_transpose(im) if exif else im, where)
        except DataFileError:
            raise
        except Exception as exc:  # truncated data, a corrupt stream, an unsupported codec
            raise DataFileError(where, "", f"cannot decode the image ({_reason(exc)})"
                                ) from None


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
            raise DataFileError(where, "", "the archive is shorter than its index (changed "
                                "since it was read?)")
        return decode_image(data, where)
    try:
        with tarfile.open(path) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise DataFileError(where, "", "not a file in the archive")
            return decode_image(f.read(), where)
    except KeyError as exc:
        raise FileNotFoundError(f"image not found: {where}") from exc
    except (tarfile.TarError, EOFError) as exc:  # a damaged or truncated archive
        raise DataFileError(path, "", f"not a readable tar archive ({_reason(exc)})") from None

"""Property tests of image decoding: every mode and bit depth becomes uint8 RGB without
clipping (8-bit files exactly as PIL reads them), and random, truncated or oversized files are
a DataFileError naming the file, refused quickly (a header declaring a huge size is refused
before anything is decoded)."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fedumm.data.images import MAX_PIXELS, DataFileError, decode_image
from makers import png

SIDE = st.integers(min_value=1, max_value=12)


@st.composite
def arrays(draw: st.DrawFn, channels: int, dtype=np.uint8) -> np.ndarray:
    h, w = draw(SIDE), draw(SIDE)
    hi = np.iinfo(dtype).max
    seed = draw(st.integers(0, 2**32 - 1))
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape, dtype=np.int64
                                                ).astype(dtype)


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@given(arrays(3), st.sampled_from(["PNG", "BMP", "TIFF"]))
def test_8bit_rgb_reads_back_exactly(a, fmt):
    out = decode_image(encoded(Image.fromarray(a, "RGB"), fmt), "x")
    assert out.dtype == np.uint8 and np.array_equal(out, a)


@given(st.sampled_from(["L", "LA", "P", "RGBA", "CMYK", "1", "PA"]), arrays(4),
       st.sampled_from(["PNG", "TIFF", "WEBP", "GIF", "JPEG"]))
def test_every_8bit_mode_reads_as_pil_converts_it(mode, a, fmt):
    im = Image.fromarray(a, "RGBA").convert(mode)
    try:
        data = encoded(im, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot store this mode
        return
    out = decode_image(data, "x")
    with Image.open(io.BytesIO(data)) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert out.shape == (*a.shape[:2], 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)


@given(arrays(1, np.uint16))
def test_16bit_grayscale_png_is_scaled_not_clipped(a):
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    out = decode_image(png(a.shape[1], a.shape[0], 0, 16, raw), "x")
    expected = (a >> 8).astype(np.uint8)
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))


@given(arrays(3, np.uint16), st.booleans())
def test_16bit_rgb_png_keeps_the_high_byte(a, alpha):
    if alpha:
        a4 = np.concatenate([a, np.full(a.shape[:2] + (1,), 65535, np.uint16)], axis=2)
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a4)
        data = png(a.shape[1], a.shape[0], 6, 16, raw)
    else:
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
        data = png(a.shape[1], a.shape[0], 2, 16, raw)
    assert np.array_equal(decode_image(data, "x"), (a >> 8).astype(np.uint8))


@given(st.integers(min_value=1, max_value=2**31 - 1), st.integers(min_value=1,
                                                                   max_value=2**31 - 1))
@settings(max_examples=60)
def test_a_declared_size_past_the_budget_is_refused_before_decoding(w, h):
    data = png(w, h, 0, 8, b"")  # a few dozen bytes declaring w x h pixels
    try:
        decode_image(data, "big.png")
    except DataFileError as exc:
        assert "big.png" in str(exc)
        if w * h > MAX_PIXELS:
            assert "refused before decoding" in str(exc)
    else:
        raise AssertionError("an image without pixel data decoded")


@given(arrays(3), st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]), st.data())
def test_truncated_files_decode_fully_or_name_the_file(a, fmt, data):
    whole = encoded(Image.fromarray(a, "RGB"), fmt)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))
    try:
        out = decode_image(whole[:cut], "cut.img")
    except DataFileError as exc:
        assert "cut.img" in str(exc) and "\n" not in str(exc)
    else:
        assert out.dtype == np.uint8 and out.shape == (*a.shape[:2], 3)


@given(st.binary(max_size=200), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                                  b"GIF89a", b"BM", b"II*\x00", b"RIFF"]))
@settings(max_examples=150)
def test_random_bytes_name_the_file(junk, magic):
    try:
        out = decode_image(magic + junk, "junk.bin")
    except DataFileError as exc:
        assert "junk.bin" in str(exc) and "\n" not in str(exc)
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3

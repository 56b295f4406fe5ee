"""Images as the readers and the model see them: every mode and bit depth as 8-bit RGB without
clipping, and files that are no image, cut short or declaring too many pixels refused with the
file named (while reading the data, before training, where a record points to them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedumm.config import load_config
from fedumm.data.images import MAX_PIXELS, DataFileError, decode_image, load_image
from fedumm.data.readers import read_samples
from makers import png


def test_16bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 255, 256, 40000], [65535, 1000, 32768, 65280]], np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(png(4, 2, 0, 16, b"".join(b"\x00" + r.astype(">u2").tobytes()
                                                for r in values)))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 3)
    assert out[..., 0].tolist() == [[0, 0, 1, 156], [255, 3, 128, 255]]  # the high byte
    with Image.open(path) as im:
        assert np.asarray(im.convert("RGB")).min() == 0  # PIL's own convert: 255 past 255


def test_8bit_files_read_exactly_as_before(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    for mode in ("RGB", "RGBA", "L", "LA", "P", "CMYK"):
        im = Image.fromarray(a, "RGBA").convert(mode)
        path = tmp_path / f"x_{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
        im.save(path)
        with Image.open(path) as ref:
            assert np.array_equal(load_image(path), np.asarray(ref.convert("RGB"), np.uint8))


def test_a_declared_size_past_the_budget_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(20000, 20000, 0, 8, b""))  # 70 bytes declaring 400 M pixels
    with pytest.raises(DataFileError, match=r"bomb\.png: refused before decoding"):
        load_image(path)
    side = int(MAX_PIXELS ** 0.5) + 1  # past our budget, below PIL's own error
    path.write_bytes(png(side, side, 0, 8, b""))
    with pytest.raises(DataFileError, match=rf"bomb\.png: declares {side} x {side} pixels, "
                                            r"above the budget"):
        load_image(path)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7).save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"cut\.png: cannot decode the image"):
        load_image(cut)
    with pytest.raises(DataFileError, match=r"where\.jpg: not a readable image"):
        decode_image(b"hello", "where.jpg")
    float_tiff = tmp_path / "f.tiff"
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(float_tiff)
    with pytest.raises(DataFileError, match=r"f\.tiff: unsupported pixel mode F"):
        load_image(float_tiff)


def test_a_record_pointing_to_a_bad_image_is_refused_while_reading(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bomb.png").write_bytes(png(20000, 20000, 0, 8, b""))
    (tmp_path / "text.png").write_text("no image")
    for bad in ("bomb.png", "text.png"):
        recs = [{"id": "a", "image": "ok.png", "question": "q", "answer": "a"},
                {"id": "b", "image": bad, "question": "q", "answer": "a"}]
        data = tmp_path / "u.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = load_config(None, ["data.format=files", f"data.understanding={data}",
                                 "data.heldout_fraction=0"]).data
        with pytest.raises(DataFileError, match=rf"u\.jsonl: line 2: .*{bad}: "):
            read_samples(cfg, "all")


def test_extra_csv_cells_and_non_utf8_text_name_the_row(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    table = tmp_path / "t.csv"
    table.write_text("image,question,answer\nok.png,what is it,a, b\n")
    cfg = load_config(None, ["data.format=files", f"data.understanding={table}",
                             "data.heldout_fraction=0"]).data
    with pytest.raises(DataFileError, match=r"t\.csv: row 2: 4 cells, the header has 3"):
        read_samples(cfg, "all")
    table.write_bytes(b"image,question,answer\nok.png,caf\xe9,a\n")
    with pytest.raises(DataFileError, match=r"t\.csv: .*not UTF-8 text"):
        read_samples(cfg, "all")


def test_images_are_read_the_same_through_every_path(tmp_path):
    """A tar member and a file give the same array (one decoder)."""
    import tarfile

    a = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "m.png")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "m.png", arcname="k.png")
    assert np.array_equal(load_image(tmp_path / "s.tar", "k.png"), a)
    assert np.array_equal(load_image(Path(tmp_path / "m.png")), a)

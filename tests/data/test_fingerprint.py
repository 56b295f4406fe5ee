"""The data fingerprint a resumed run compares: it changes when a file the config reads is
edited, added or removed (or the generator's settings change), and not otherwise."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from fedumm.config import load_config
from fedumm.data.fingerprint import (
    changed_files,
    data_fingerprint,
    data_manifest,
    describe_change,
)
from fedumm.data.readers import read_samples


def _files_cfg(tmp_path, *extra):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    data = tmp_path / "u.jsonl"
    if not data.exists():
        data.write_text(json.dumps({"id": "1", "image": "a.png", "question": "q",
                                    "answer": "x"}) + "\n")
    return load_config(None, ["data.format=files", f"data.understanding={data}",
                              *extra]).data


def test_generated_data_is_fingerprinted_by_its_settings():
    a = load_config(None, []).data
    assert data_fingerprint(a) == data_fingerprint(load_config(None, []).data)
    assert data_fingerprint(a) != data_fingerprint(load_config(None, ["data.seed=1"]).data)
    assert data_fingerprint(a) != data_fingerprint(
        load_config(None, ["data.train_scenes=7"]).data)


def test_an_edited_data_file_changes_the_fingerprint(tmp_path):
    cfg = _files_cfg(tmp_path)
    before = data_manifest(cfg)
    fp = data_fingerprint(cfg)
    data = tmp_path / "u.jsonl"
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, unchanged
    assert data_fingerprint(cfg) == fp  # small files are identified by their content
    data.write_text(data.read_text().replace('"x"', '"y"'))
    assert data_fingerprint(cfg) != fp
    assert changed_files(before, data_manifest(cfg)) == [str(data)]
    assert describe_change(before, data_manifest(cfg)) == f"changed: {data}"


def test_images_the_samples_use_and_folders_count(tmp_path):
    cfg = _files_cfg(tmp_path)
    samples = read_samples(cfg, "all")
    fp = data_fingerprint(cfg, samples)
    assert data_fingerprint(cfg) != fp  # the image is in it
    Image.fromarray(np.ones((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(1, 10**18))  # a new mtime whatever the clock
    assert data_fingerprint(cfg, samples) != fp
    # a folder named by data.images: a file added under it is a change
    cfg2 = _files_cfg(tmp_path, f"data.images={tmp_path}")
    fp2 = data_fingerprint(cfg2)
    (tmp_path / "new.png").write_bytes(b"x")
    assert data_fingerprint(cfg2) != fp2
    (tmp_path / "new.png").unlink()
    assert data_fingerprint(cfg2) == fp2

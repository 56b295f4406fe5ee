"""Readers: every data source becomes a list of :class:`~fedumm.data.records.Sample` records.

One module per format; :func:`read_samples` picks one from the data config. With
``data.format=files`` each of ``data.understanding`` / ``data.generation`` is a file, a folder
or a glob, and its format is detected from what is there:

=================  ===========================================================================
understanding      a VQA v2 folder or questions file (``v2_OpenEnded_mscoco_*_questions.json``);
                   a conversation file (``.json`` / ``.jsonl``: LLaVA, sharegpt, TRL, or
                   question/answer records; ``.csv`` with question, answer, image columns);
                   FedMLLM's datasets (Hateful Memes ``.jsonl``, CrisisMMD ``.tsv``, VQA-RAD
                   ``.json``, see :mod:`fedumm.data.readers.fedmllm`)
generation         an image folder with ``metadata.jsonl``; a ``.jsonl`` / ``.json`` / ``.csv``
                   table of image path + text; WebDataset ``.tar`` shards (or a folder of them)
either             a Hugging Face dataset folder (``save_to_disk``) or ``.parquet`` files
                   (the optional ``hf`` extra: ``pip install fedumm[hf]``)
=================  ===========================================================================

Held-out samples come from ``data.understanding_val`` / ``data.generation_val`` when given, else
from a seeded split of the training files (``data.heldout_fraction`` of the images; all
questions about one image stay on one side).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedumm.data.readers.common import DataFileError, ImageResolver, image_root
from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import DataConfig

__all__ = ["DataFileError", "ROLES", "detect_format", "heldout_split", "read_files",
           "read_path", "read_samples"]

ROLES = ("train", "val", "all")  # "all": every record of the training files (no held-out split)
Reader = Callable[[Path, "DataConfig"], list[Sample]]


def read_samples(cfg: DataConfig, role: str = "train") -> list[Sample]:
    """The training (``role="train"``), held-out (``"val"``) or all (``"all"``) samples a data
    config describes; understanding samples first, then generation samples."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if cfg.format == "shapes":
        from fedumm.data.readers.shapes import shapes_samples, shapes_world

        return shapes_samples(shapes_world(cfg, "val" if role == "val" else "train"))
    return read_files(cfg, role)


def read_files(cfg: DataConfig, role: str = "train") -> list[Sample]:
    """The user's files (``data.format=files``) for one role, every record checked."""
    out: list[Sample] = []
    for modality, train, val in ((UNDERSTANDING, cfg.understanding, cfg.understanding_val),
                                 (GENERATION, cfg.generation, cfg.generation_val)):
        if not train:
            continue
        if val and role == "val":
            out += read_path(modality, val, cfg)
        elif val or role == "all":
            out += read_path(modality, train, cfg)
        else:
            train_part, val_part = heldout_split(read_path(modality, train, cfg),
                                                 cfg.heldout_fraction, cfg.seed)
            out += val_part if role == "val" else train_part
    seen: dict[str, Sample] = {}
    for s in out:
        if s.id in seen:  # ids key caches (e.g. a backbone's image codes): they must be unique
            raise ValueError(f"two samples share the id {s.id!r} ({seen[s.id].task} and "
                             f"{s.task}); record ids must be unique across data files")
        seen[s.id] = s
    return out


def heldout_split(samples: list[Sample], fraction: float, seed: int
                  ) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): ``fraction`` of the images (or text-only samples) go to held-out,
    drawn with ``seed``; every sample about one image stays on one side, both keep file order."""
    keys = [s.labels.get("image_id") or (s.image.describe() if s.image is not None else s.id)
            for s in samples]  # an image_id field groups rows that embed the same image
    unique = list(dict.fromkeys(keys))
    n_val = int(round(len(unique) * fraction))
    if fraction > 0 and len(unique) >= 2:
        n_val = max(1, n_val)
    rng = np.random.default_rng([seed, 23])
    held = {unique[i] for i in rng.permutation(len(unique))[:n_val]}
    return ([s for s, k in zip(samples, keys, strict=True) if k not in held],
            [s for s, k in zip(samples, keys, strict=True) if k in held])


def expand(spec: str, key: str) -> list[Path]:
    """A path or a glob -> the paths it names (sorted), which must exist."""
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"data.{key}={spec!r}: the pattern matches no file")
        return paths
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data.{key}: no such file or folder: {spec}")
    return [path]


def read_path(modality: str, spec: str, cfg: DataConfig) -> list[Sample]:
    """Every sample of the files ``spec`` names (a path or a glob), for one modality."""
    out: list[Sample] = []
    for path in expand(spec, modality):
        out += detect_format(modality, path)(path, cfg)
    if not out:
        raise ValueError(f"data.{modality}={spec!r}: no samples")
    return out


def detect_format(modality: str, path: Path) -> Reader:
    """The reader for one path of ``modality`` data, from what is there (see the module doc)."""
    from fedumm.data.readers import fedmllm, hf, vqa
    from fedumm.data.readers.text_image import metadata_file

    if hf.is_hf_dataset(path):
        return lambda p, cfg: hf.read_hf(p, modality, cfg.images, cfg.max_samples)
    if modality == UNDERSTANDING:
        if vqa.find_vqa_split(path) is not None:
            return _read_vqa
        kind = fedmllm.detect(path)
        if kind is not None:
            return lambda p, cfg: fedmllm.read_fedmllm(
                p, kind, ImageResolver(image_root(cfg.images, p)), cfg.max_samples)
        if path.is_file() and path.suffix in (".json", ".jsonl", ".csv"):
            return _read_conversations
        expected = ("a VQA v2 folder or questions file, a .json/.jsonl/.csv conversation file, "
                    "Hateful Memes .jsonl, CrisisMMD .tsv, VQA-RAD .json, a Hugging Face "
                    "dataset folder or .parquet file")
    else:
        if path.is_dir() and metadata_file(path):
            return _read_image_folder
        if path.is_dir() and any(path.glob("*.tar")):
            return _read_shards
        if path.is_file() and path.suffix == ".tar":
            return _read_shards
        if path.is_file() and path.suffix in (".json", ".jsonl", ".csv"):
            return _read_text_image
        expected = ("an image folder with metadata.jsonl, a .jsonl/.json/.csv table of image "
                    "and text, WebDataset .tar shards, a Hugging Face dataset folder or .parquet "
                    "file")
    raise DataFileError(path, "", f"unknown {modality} data; expected {expected}")


def _read_vqa(path: Path, cfg: DataConfig) -> list[Sample]:
    from fedumm.data.readers.vqa import read_vqa

    return read_vqa(path, cfg.images, cfg.max_samples)


def _read_conversations(path: Path, cfg: DataConfig) -> list[Sample]:
    from fedumm.data.readers.conversations import read_conversations

    return read_conversations(path, ImageResolver(image_root(cfg.images, path)), cfg.max_samples)


def _read_text_image(path: Path, cfg: DataConfig) -> list[Sample]:
    from fedumm.data.readers.text_image import read_text_image_table

    return read_text_image_table(path, ImageResolver(image_root(cfg.images, path)),
                                 cfg.max_samples)


def _read_image_folder(path: Path, cfg: DataConfig) -> list[Sample]:
    from fedumm.data.readers.text_image import metadata_file, read_text_image_table

    return read_text_image_table(metadata_file(path), ImageResolver(cfg.images or path),
                                 cfg.max_samples)


def _read_shards(path: Path, cfg: DataConfig) -> list[Sample]:
    from fedumm.data.readers.webdataset import read_shard

    out: list[Sample] = []
    for shard in sorted(path.glob("*.tar")) if path.is_dir() else [path]:
        out += read_shard(shard, cfg.max_samples - len(out) if cfg.max_samples else 0)
        if cfg.max_samples and len(out) >= cfg.max_samples:
            break
    return out

"""Readers: every data source becomes a list of :class:`~fedumm.data.records.Sample` records.

One module per format, each registering a :class:`Reader` in :data:`fedumm.registry.READERS`
(the built-in ones are imported by :mod:`fedumm.data.readers.builtin`). ``data.format`` names a
source: ``shapes`` generates ShapesWorld (:mod:`fedumm.data.readers.shapes`); with ``files``
each of ``data.understanding`` / ``data.generation`` is a file, a folder or a glob, and its
format is detected from what is there, by asking the registered file formats in turn:

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedumm.data.progress import report
from fedumm.data.readers.common import DataFileError, Reader
from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.registry import READERS

if TYPE_CHECKING:
    from fedumm.config import DataConfig

__all__ = ["DataFileError", "ROLES", "READERS", "Reader", "check_unique_ids", "detect_format",
           "file_formats", "heldout_split", "read_each", "read_files", "read_path",
           "read_samples", "sources"]

ROLES = ("train", "val", "all")  # "all": every record of the training files (no held-out split)


def read_samples(cfg: DataConfig, role: str = "train") -> list[Sample]:
    """The training (``role="train"``), held-out (``"val"``) or all (``"all"``) samples a data
    config describes, from the source ``data.format`` names; understanding samples first, then
    generation samples."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    reader: Reader = READERS.get(cfg.format)
    if reader.source is None:
        raise ValueError(f"data.format={cfg.format!r} is a file format, detected from the "
                         f"paths; the sources are {', '.join(sources())} (data.format=files "
                         "with data.understanding / data.generation reads your files)")
    return reader.source(cfg, role)


def sources() -> list[str]:
    """The registered names ``data.format`` can take (the readers with a source)."""
    return [n for n in READERS.names() if READERS.get(n).source is not None]


def file_formats(modality: str) -> list[str]:
    """The registered file formats of ``modality``, in the order they are detected."""
    found = [(r.order, n) for n in READERS.names()
             if (r := READERS.get(n)).detect is not None and modality in r.modalities]
    return [n for _, n in sorted(found)]


def read_files(cfg: DataConfig, role: str = "train") -> list[Sample]:
    """The user's files (``data.format=files``) for one role, every record checked. Sample ids
    must be unique over everything the role's split reads: the training files before the
    seeded held-out split, and with ``data.*_val`` files the held-out files too (read by the
    ``train`` role to check), so no record is both trained on and scored."""
    out: list[Sample] = []
    read: list[tuple[str, list[Sample]]] = []  # (file and key, its samples): ids checked over
    for modality, train, val in ((UNDERSTANDING, cfg.understanding, cfg.understanding_val),
                                 (GENERATION, cfg.generation, cfg.generation_val)):
        if not train:
            continue
        files = _labelled(read_each(modality, val if val and role == "val" else train, cfg),
                          f"data.{modality}_val" if val and role == "val" else
                          f"data.{modality}")
        read += files
        if val or role == "all":
            out += _flat(files)
            if val and role == "train":
                read += _labelled(read_each(modality, val, cfg), f"data.{modality}_val")
        else:
            train_part, val_part = heldout_split(_flat(files), cfg.heldout_fraction, cfg.seed)
            out += val_part if role == "val" else train_part
    check_unique_ids(read)
    return out


def _labelled(files: list[tuple[Path, list[Sample]]], key: str) -> list[tuple[str, list[Sample]]]:
    return [(f"{path} ({key})", samples) for path, samples in files]


def check_unique_ids(files: list[tuple[str, list[Sample]]]) -> None:
    """Every sample id occurs once over ``files`` ((file, samples) pairs); a DataFileError
    names the id and both files otherwise. Ids key caches (a backbone's image codes) and the
    held-out split, so they must be unique."""
    seen: dict[str, tuple[str, Sample]] = {}
    for path, samples in files:
        for s in samples:
            first = seen.setdefault(s.id, (path, s))
            if first[1] is not s:
                where = f"twice in {path}" if first[0] == path else \
                    f"in {first[0]} and in {path}"
                raise DataFileError(path, "", f"two samples share the id {s.id!r} ({where}: "
                                    f"{first[1].task} and {s.task}); record ids must be unique "
                                    "across the training and held-out data files")


def _flat(files: list[tuple[Any, list[Sample]]]) -> list[Sample]:
    return [s for _, samples in files for s in samples]


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
    return _flat(read_each(modality, spec, cfg))


def read_each(modality: str, spec: str, cfg: DataConfig) -> list[tuple[Path, list[Sample]]]:
    """(path, its samples) of every path ``spec`` names (a path or a glob), for one modality."""
    out: list[tuple[Path, list[Sample]]] = []
    paths = expand(spec, modality)
    for i, path in enumerate(paths):
        read = READERS.get(detect_format(modality, path)).read
        assert read is not None  # a file format: it has read and detect
        out.append((path, read(path, modality, cfg)))
        if len(paths) > 1:
            report(f"reading data.{modality} files", i + 1, len(paths))
    if not any(samples for _, samples in out):
        raise ValueError(f"data.{modality}={spec!r}: no samples")
    return out


def detect_format(modality: str, path: Path) -> str:
    """The name of the registered file format that reads ``path`` as ``modality`` data: the
    first of :func:`file_formats` whose ``detect`` recognises it."""
    for name in file_formats(modality):
        detect = READERS.get(name).detect
        if detect is not None and detect(path):
            return name
    # the formats of this modality first, then those of both (a Hugging Face dataset)
    listed = sorted((len(r.modalities) > 1, r.order, n) for n in file_formats(modality)
                    if (r := READERS.get(n)).expected)
    expected = ", ".join(READERS.get(n).expected for _, _, n in listed)
    raise DataFileError(path, "", f"unknown {modality} data; expected {expected}")


READERS.register("files", Reader(source=read_files))

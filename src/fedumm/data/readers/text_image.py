"""Generation samples (a prompt and its target image) from the layouts text-to-image data
comes in:

* an image folder with ``metadata.jsonl`` (or ``metadata.csv``): ``{"file_name", "text"}`` per
  image, paths relative to the folder (the Hugging Face ``imagefolder`` convention), whatever
  ``data.images`` says;
* a JSONL / JSON / CSV table with an image-path column and a text column;
* WebDataset ``.tar`` shards: ``<key>.jpg`` (or png/webp) with ``<key>.txt`` (the BLIP3o-60k
  layout), in :mod:`fedumm.data.readers.webdataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedumm.data.readers.common import (
    DataFileError,
    ImageResolver,
    Reader,
    extra_labels,
    iter_records,
    pick_key,
    shared_labels,
    table_format,
)
from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION
from fedumm.registry import READERS

if TYPE_CHECKING:
    from fedumm.config import DataConfig

IMAGE_KEYS = ("file_name", "image", "image_path", "path", "img")
TEXT_KEYS = ("text", "prompt", "caption")


def generation_sample(sid: str, text: str, image, rec: dict | None = None) -> Sample:
    """One prompt-image pair, labelled by its ``tag`` (``image`` when the record has none)."""
    labels = shared_labels({"tag": "image", **extra_labels(rec)})
    return Sample(id=sid, task=GENERATION, text=text, image=image, labels=labels)


def read_text_image_table(path: Path, resolve: ImageResolver, max_samples: int = 0
                          ) -> list[Sample]:
    """Every row of a table (``metadata.jsonl``, JSONL, JSON list or CSV) with an image path
    column (one of :data:`IMAGE_KEYS`) and a text column (one of :data:`TEXT_KEYS`)."""
    out: list[Sample] = []
    for where, rec in iter_records(path):
        if not isinstance(rec, dict):
            raise DataFileError(path, where, f"expected an object, got {type(rec).__name__}")
        ikey, tkey = pick_key(rec, IMAGE_KEYS), pick_key(rec, TEXT_KEYS)
        if ikey is None or tkey is None:
            missing = "an image column" if ikey is None else "a text column"
            wanted = IMAGE_KEYS if ikey is None else TEXT_KEYS
            raise DataFileError(path, where, f"no {missing} (one of {', '.join(wanted)}); "
                                f"this record has {sorted(rec)}")
        sid = str(rec.get("id", f"{path.stem}:{where.split()[-1]}"))
        out.append(generation_sample(sid, str(rec[tkey]), resolve(rec[ikey], path, where), rec))
        if max_samples and len(out) >= max_samples:
            break
    return out


def metadata_file(folder: Path) -> Path | None:
    """The ``metadata.jsonl`` (or ``.csv``) of an image folder, if it has one."""
    return next((p for p in (folder / "metadata.jsonl", folder / "metadata.csv") if p.is_file()),
                None)


def _read_image_folder(path: Path, modality: str, cfg: DataConfig) -> list[Sample]:
    """An image folder's ``file_name`` s are relative to the folder holding its metadata file,
    as in ``datasets``' ``imagefolder``: ``data.images`` (the root of LLaVA / VQA image paths)
    does not apply, or a folder next to LLaVA data would be read from the wrong root."""
    table = metadata_file(path)
    assert table is not None  # detected before it is read
    resolve = ImageResolver(table.parent,
                            "an image folder's file_name is relative to its metadata file")
    return read_text_image_table(table, resolve, cfg.max_samples)


READERS.register("image_folder", Reader(
    read=_read_image_folder, detect=lambda path: path.is_dir() and metadata_file(path) is not None,
    modalities=(GENERATION,), order=20, expected="an image folder with metadata.jsonl"))
READERS.register("text_image", table_format(
    read_text_image_table, GENERATION, "a .jsonl/.json/.csv table of image and text"))

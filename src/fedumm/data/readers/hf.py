"""Samples from Hugging Face datasets on disk: a ``save_to_disk`` folder or ``.parquet`` files
(the optional ``hf`` extra: ``pip install 'fedumm[hf]'``).

What a path may be:

* a ``Dataset.save_to_disk`` folder (``dataset_info.json`` + ``state.json``), or a
  ``DatasetDict`` folder (``dataset_dict.json``) with one split; with several splits, give the
  split's folder (``path/train``);
* a ``.parquet`` file, or a folder of them (all one split: a folder holding ``train-*`` and
  ``test-*`` files is refused; give a glob such as ``path/train-*.parquet``). Parquet files are
  converted once to Arrow in the ``datasets`` cache (``HF_DATASETS_CACHE``) and read from there.

Columns, by modality (the same records as the JSON readers, so labels and turn splitting match):

* understanding: ``question`` + ``answer`` (+ ``image``, optional ``answers`` and label
  columns); sharegpt/TRL ``messages`` (+ ``images``, a list of at most one image); LLaVA
  ``conversations`` (+ ``image``);
* generation: an image column (one of ``file_name``, ``image``, ``image_path``, ``path``,
  ``img``) and a text column (``text``, ``prompt`` or ``caption``).

An image column holds images (a ``datasets.Image`` feature, or a struct of ``bytes`` and
``path``), raw image bytes, or image paths (strings, resolved under ``data.images``, else the
dataset's folder, and checked to exist). Images stay in the memory-mapped Arrow files: indexing
reads the other columns and only which rows have image bytes; a sample's image is decoded when
it is loaded (:class:`HFImages`). Sample ids come from an ``id`` (or ``question_id``) column,
else ``<name>:<row>`` with rows counted from 0, as are the ``row N`` of errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedumm.data.images import decode_image
from fedumm.data.readers.common import DataFileError, ImageResolver, Reader
from fedumm.data.readers.conversations import detect_layout, record_samples
from fedumm.data.readers.text_image import IMAGE_KEYS, TEXT_KEYS, generation_sample
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.registry import READERS

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

__all__ = ["HFImages", "is_hf_dataset", "read_hf"]

BATCH = 1000  # rows read per step while indexing
HF_INSTALL = "pip install 'fedumm[hf]'"  # the optional extra that brings `datasets`
# The image column of each understanding layout, in order of preference
UNDERSTANDING_IMAGE_KEYS = {"qa": ("image", "images"), "llava": ("image", "images"),
                            "messages": ("images", "image")}
# A parquet file name's split (``train-00000-of-00004.parquet``, the Hub's naming)
_SPLIT_NAME = re.compile(r"^(train|training|validation|valid|val|dev|test|eval)(?=[-_.])")


def is_hf_dataset(path: Path) -> bool:
    """``path`` is a ``save_to_disk`` folder, a ``.parquet`` file or a folder of them (a look
    at the names only: ``datasets`` is not imported)."""
    if path.is_file():
        return path.suffix == ".parquet"
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file():
        return True
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return True
    return any(p.is_file() for p in path.glob("*.parquet"))


def read_hf(path: Path, modality: str, images: str, max_samples: int = 0) -> list[Sample]:
    """Every sample of one Hugging Face dataset (the first ``max_samples``; 0: all), checked
    while reading. ``images`` is the root of relative image paths (default: the dataset's
    folder)."""
    ds = _load(path, modality)
    root = Path(images) if images else (path if path.is_dir() else path.parent)
    if modality == UNDERSTANDING:
        return _understanding(ds, path, ImageResolver(root), max_samples)
    if modality == GENERATION:
        return _generation(ds, path, ImageResolver(root), max_samples)
    raise ValueError(f"modality must be {UNDERSTANDING!r} or {GENERATION!r}, got {modality!r}")


class HFImages:
    """One image column of a dataset, read one row at a time: the bytes stay in the
    memory-mapped Arrow file until :meth:`image` decodes a row's image. Samples hold it as
    ``ImageRef(table=..., row=...)``; it pickles as a reference to the dataset's files."""

    def __init__(self, ds: Dataset, column: str, source: str) -> None:
        self.column, self.source = column, source
        # Arrow format: rows come back as stored ({"bytes", "path"}), never decoded by datasets
        self._rows = ds.select_columns([column]).with_format("arrow")

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"HFImages({self.source!r}, column={self.column!r}, rows={len(self)})"

    def image(self, row: int) -> np.ndarray:
        """Row ``row``'s image as a uint8 (H, W, 3) RGB array."""
        value = self._rows[row].column(0)[0].as_py()
        if isinstance(value, list):  # an ``images`` list (at most one image, checked on read)
            value = value[0] if value else None
        if isinstance(value, dict):
            value = value.get("bytes")
        where = f"{self.source} row {row} column {self.column!r}"
        if not value:
            raise ValueError(f"{where}: no image bytes")
        return decode_image(bytes(value), where)


# -- loading -----------------------------------------------------------------------------------

def _datasets(path: Path) -> Any:
    """The ``datasets`` module, or an error saying how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"reading {path} (a Hugging Face dataset) needs the optional 'hf' "
                          f"extra: {HF_INSTALL}") from exc
    return datasets


def _load(path: Path, modality: str) -> Dataset:
    """The one split ``path`` holds, memory-mapped."""
    datasets = _datasets(path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataFileError(path / "dataset_dict.json", "", f"unreadable ({exc})") from exc
        if len(splits) != 1:
            raise DataFileError(path, "", f"a DatasetDict with splits {splits}; give one split's "
                                f"folder, e.g. data.{modality}={path / str(splits[0])}"
                                if splits else "a DatasetDict with no split")
        path = path / str(splits[0])
    if path.is_dir() and not (path / "state.json").is_file():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise DataFileError(path, "", "not a Hugging Face dataset folder (expected "
                                "state.json, dataset_dict.json or .parquet files)")
        names = sorted({m.group(1) for p in files if (m := _SPLIT_NAME.match(p.name))})
        if len(names) > 1:  # the Hub's layout of several splits in one folder: never mix them
            raise DataFileError(path, "", f"parquet files of several splits ({', '.join(names)});"
                                f" give one split's files, e.g. data.{modality}="
                                f"'{path}/{names[-1]}-*.parquet'")
        return _from_parquet(datasets, path, files)
    if path.is_file():
        return _from_parquet(datasets, path, [path])
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several kinds for a damaged folder
        raise DataFileError(path, "", f"cannot load the saved dataset ({exc})") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataFileError(path, "", f"expected one dataset split, got {type(ds).__name__}")
    return ds


def _from_parquet(datasets: Any, path: Path, files: list[Path]) -> Dataset:
    try:
        # converted once to Arrow in the datasets cache, then memory-mapped (not kept in memory)
        return datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=False)
    except Exception as exc:  # pyarrow / datasets errors for a file that is not parquet
        raise DataFileError(path, "", f"cannot read as parquet ({exc})") from exc


# -- image columns -----------------------------------------------------------------------------

def _image_kind(t: pa.DataType) -> str | None:
    """How a column of type ``t`` holds images: ``struct`` ({"bytes", "path"}, the Image
    feature), ``bytes``, ``path`` (strings), or None when it holds no images."""
    import pyarrow as pa

    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    return None


def _column_kind(ds: Dataset, column: str) -> tuple[str | None, bool]:
    """(how the column holds images, whether it is a list of them per row)."""
    import pyarrow as pa

    t = ds.data.schema.field(column).type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _image_kind(t.value_type), True
    return _image_kind(t), False


def _image_refs(ds: Dataset, column: str, kind: str, is_list: bool, path: Path,
                resolve: ImageResolver, table: HFImages | None) -> Iterator[ImageRef | None]:
    """Each row's image, reading only which rows have bytes and their paths (never the bytes):
    an ``ImageRef`` into ``table``, a checked file, or None for a row without an image."""
    import pyarrow.compute as pc

    start = 0
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=BATCH):
        col = batch.column(0)
        if is_list:
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_pylist()
            flat = pc.list_flatten(col)  # each row's elements in turn (none for empty rows)
        else:
            lengths, flat = None, col
        if kind == "struct":
            has_bytes = pc.fill_null(pc.greater(pc.binary_length(pc.struct_field(flat, "bytes")),
                                                0), False).to_pylist()
            paths = pc.struct_field(flat, "path").to_pylist()
        elif kind == "bytes":
            has_bytes = pc.fill_null(pc.greater(pc.binary_length(flat), 0), False).to_pylist()
            paths = [None] * len(has_bytes)
        else:
            paths = flat.to_pylist()
            has_bytes = [False] * len(paths)
        j = 0
        for i in range(batch.num_rows):
            row = start + i
            n = 1 if lengths is None else lengths[i]
            if n > 1:  # checked row by row, so max_samples stops before a later bad row
                raise DataFileError(path, f"row {row}", f"{n} images in {column!r}; fedumm "
                                    "trains one image per question (split or filter such rows)")
            if n == 0:
                yield None
            elif has_bytes[j]:
                yield ImageRef(path=str(path), table=table, row=row)
            elif paths[j]:
                yield resolve(paths[j], path, f"row {row}")
            else:
                yield None
            j += n
        start += batch.num_rows


def _images_of(ds: Dataset, column: str | None, path: Path, resolve: ImageResolver
               ) -> Iterator[ImageRef | None]:
    """Each row's image from ``column`` (None for every row when there is no such column)."""
    if column is None:
        return iter([None] * len(ds))
    kind, is_list = _column_kind(ds, column)
    if kind is None:
        raise DataFileError(path, "", f"column {column!r} holds "
                            f"{ds.data.schema.field(column).type}; expected images (an Image "
                            "feature or {bytes, path} struct), image bytes or image paths")
    table = HFImages(ds, column, str(path)) if kind != "path" else None
    return _image_refs(ds, column, kind, is_list, path, resolve, table)


def _rows(ds: Dataset, skip: str | None) -> Iterator[dict]:
    """Every row as a dict, without the image column (so no image is read or decoded)."""
    rows = ds.remove_columns([skip]) if skip else ds
    for batch in rows.iter(batch_size=BATCH):
        keys = list(batch)
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(keys, values, strict=True))


def _row_id(rec: dict, path: Path, row: int) -> str:
    for key in ("id", "question_id"):
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return f"{path.name}:{row}"


# -- samples -----------------------------------------------------------------------------------

def _understanding(ds: Dataset, path: Path, resolve: ImageResolver, max_samples: int
                   ) -> list[Sample]:
    cols = ds.column_names
    if "conversations" in cols:
        family = "llava"
    elif "messages" in cols:
        family = "messages"
    elif "question" in cols and "answer" in cols:
        family = "qa"
    else:
        raise DataFileError(path, "", f"no understanding columns (this dataset has {cols}); "
                            "expected 'question' + 'answer' (+ 'image'), sharegpt/TRL "
                            "'messages' (+ 'images') or LLaVA 'conversations' (+ 'image')")
    image_col = next((k for k in UNDERSTANDING_IMAGE_KEYS[family] if k in cols), None)
    out: list[Sample] = []
    layout = None
    refs = _images_of(ds, image_col, path, resolve)
    for row, (rec, image) in enumerate(zip(_rows(ds, image_col), refs, strict=True)):
        where = f"row {row}"
        kind = detect_layout(rec, path, where)
        layout = layout or kind
        if kind != layout:
            raise DataFileError(path, where, f"a {kind} row in a dataset whose first row is "
                                f"{layout}")
        out += record_samples(rec, layout, _row_id(rec, path, row), image, path, where)
        if max_samples and len(out) >= max_samples:
            return out[:max_samples]
    return out


def _generation(ds: Dataset, path: Path, resolve: ImageResolver, max_samples: int
                ) -> list[Sample]:
    cols = ds.column_names
    kinds = {k: _column_kind(ds, k) for k in IMAGE_KEYS if k in cols}
    # stored images before path strings (a dataset may keep both an Image and its file_name)
    image_col = next((k for k, (kind, _) in kinds.items() if kind in ("struct", "bytes")),
                     next((k for k, (kind, _) in kinds.items() if kind == "path"), None))
    text_col = next((k for k in TEXT_KEYS if k in cols), None)
    if image_col is None or text_col is None:
        missing = (f"image column (one of {', '.join(IMAGE_KEYS)})" if image_col is None
                   else f"text column (one of {', '.join(TEXT_KEYS)})")
        raise DataFileError(path, "", f"no {missing}; this dataset has {cols}")
    out: list[Sample] = []
    refs = _images_of(ds, image_col, path, resolve)
    for row, (rec, image) in enumerate(zip(_rows(ds, image_col), refs, strict=True)):
        text = rec.get(text_col)
        if text in (None, ""):
            raise DataFileError(path, f"row {row}", f"empty {text_col!r}")
        if image is None:
            raise DataFileError(path, f"row {row}", f"no image in {image_col!r}")
        out.append(generation_sample(_row_id(rec, path, row), str(text), image, rec))
        if max_samples and len(out) >= max_samples:
            break
    return out


READERS.register("hf", Reader(
    read=lambda path, modality, cfg: read_hf(path, modality, cfg.images, cfg.max_samples),
    detect=is_hf_dataset, order=10, requires=(("datasets", HF_INSTALL),),
    expected="a Hugging Face dataset folder or .parquet file"))

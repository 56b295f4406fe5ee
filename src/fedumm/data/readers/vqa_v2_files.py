"""VQA v2's own files: its record (:class:`VQARecord`, the annotation schema the official
metric scores) and its file layout, read and written here; read as samples by
:mod:`fedumm.data.readers.vqa_v2`.

A split ``<split>`` (e.g. ``val2014``) is three parts under ``root``:

* ``v2_OpenEnded_mscoco_<split>_questions.json``: ``{"info", "task_type", "data_type",
  "license", "data_subtype", "questions": [{"question_id", "image_id", "question"}]}``;
* ``v2_mscoco_<split>_annotations.json``: ``{"info", "license", "data_type", "data_subtype",
  "annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}]}]}``;
* an image folder (default ``root/<split>``) of ``COCO_<split>_<image_id:012d>.jpg``.

The reader also looks in ``root/Questions`` and ``root/Annotations`` (the layout of the official
demo scripts) and accepts ``.png`` images; the writer writes ``.png`` (lossless) with the COCO
stem. ShapesWorld records keep their ``family`` as an extra annotation key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedumm.data.images import decode_image
from fedumm.data.official import VQARecord

__all__ = [
    "VQARecord", "VQAv2Dataset", "annotations_filename", "image_filename", "load_vqa_v2",
    "questions_filename", "write_vqa_v2",
]

IMAGE_SUFFIXES = (".png", ".jpg")  # .png first: that is what write_vqa_v2 produces
_ANNOTATION_KEYS = (
    "question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers",
)


def questions_filename(split: str) -> str:
    """Official name of the open-ended questions file of ``split``."""
    return f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotations_filename(split: str) -> str:
    """Official name of the annotations file of ``split``."""
    return f"v2_mscoco_{split}_annotations.json"


def image_filename(split: str, image_id: int, suffix: str = ".jpg") -> str:
    """COCO image file name, e.g. ``COCO_val2014_000000000042.jpg``."""
    return f"COCO_{split}_{image_id:012d}{suffix}"


class VQAv2Dataset:
    """VQA v2 records with lazily loaded images.

    Parameters
    ----------
    records : list of VQARecord
        One record per annotated question, in annotation-file order.
    image_dir : Path
        Folder of the COCO-named images.
    split : str
        Split name used in the image file names.
    cache_images : bool
        Keep decoded images in memory (returned read-only so the cache cannot be altered).
    """

    def __init__(
        self,
        records: list[VQARecord],
        image_dir: str | Path,
        split: str,
        cache_images: bool = False,
        _cache: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.records = records
        self.image_dir = Path(image_dir)
        self.split = split
        self.cache_images = cache_images
        self._cache: dict[int, np.ndarray] = {} if _cache is None else _cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VQARecord:
        return self.records[index]

    def __iter__(self) -> Iterator[VQARecord]:
        return iter(self.records)

    @property
    def image_ids(self) -> list[int]:
        """Distinct image ids, in first-use order."""
        return list(dict.fromkeys(r.image_id for r in self.records))

    def image_path(self, image_id: int) -> Path:
        """Path of an image (``.png`` or ``.jpg``); FileNotFoundError names the id if absent."""
        tried = [self.image_dir / image_filename(self.split, image_id, s) for s in IMAGE_SUFFIXES]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"image {image_id} not found: tried {', '.join(str(p) for p in tried)}"
        )

    def image(self, image_id: int) -> np.ndarray:
        """The image as a ``uint8`` array of shape ``(H, W, 3)``."""
        if image_id in self._cache:
            return self._cache[image_id]
        path = self.image_path(image_id)
        arr = np.array(decode_image(path, str(path)))  # COCO has a few grey/CMYK jpgs
        if self.cache_images:
            arr.flags.writeable = False
            self._cache[image_id] = arr
        return arr

    def subset(
        self, count: int | None = None, question_ids: Iterable[int] | None = None
    ) -> VQAv2Dataset:
        """A dataset over part of the records (sharing the image cache).

        Parameters
        ----------
        count : int, optional
            Keep the first ``count`` records (after the ``question_ids`` filter).
        question_ids : iterable of int, optional
            Keep the records with these ids, in dataset order.

        Raises
        ------
        ValueError
            If an id is unknown, or ``count`` is negative or exceeds the available records.
        """
        records = self.records
        if question_ids is not None:
            wanted = set(question_ids)
            unknown = wanted - {r.question_id for r in records}
            if unknown:
                raise ValueError(f"unknown question ids: {sorted(unknown)[:20]}")
            records = [r for r in records if r.question_id in wanted]
        if count is not None:
            if not 0 <= count <= len(records):
                raise ValueError(f"count must be in [0, {len(records)}], got {count}")
            records = records[:count]
        return VQAv2Dataset(
            list(records), self.image_dir, self.split, self.cache_images, self._cache
        )


def _find_file(root: Path, subdir: str, name: str) -> Path:
    """``root/name``, else ``root/subdir/name`` (official demo layout)."""
    for path in (root / name, root / subdir / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"VQA v2 file not found: {root / name} (nor {root / subdir / name})")


def read_json(path: Path) -> Any:
    """A JSON file's content; a ValueError naming the file when it cannot be parsed (also the
    official results files the metric reads)."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # a number past int's digit limit, deep nesting
        raise ValueError(f"{path}: cannot parse JSON ({' '.join(str(e).split())[:200]})"
                         ) from None


def _read_list(path: Path, key: str) -> list[Any]:
    """The list under top-level ``key`` of a JSON file, with errors naming the file."""
    data = read_json(path)
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: missing top-level key {key!r}")
    if not isinstance(data[key], list):
        raise ValueError(f"{path}: {key!r} is not a list")
    return data[key]


def _check_keys(entry: Any, keys: Iterable[str], path: Path, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is not an object")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{path}: {where} has no key {key!r}")
        kind = _KINDS.get(key)
        value = entry[key]
        if kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"{path}: {where}: {key} is {shown}; expected "
                             f"{'an integer' if kind is int else 'a string'}")


# The official files' types (ids key dicts and name image files; the rest is text)
_KINDS: dict[str, type] = {"question_id": int, "image_id": int, "question": str,
                           "question_type": str, "answer_type": str,
                           "multiple_choice_answer": str, "answer": str}


def _family(ann: dict, path: Path, where: str) -> str:
    """The ShapesWorld family an exported annotation keeps (not an official key)."""
    family = ann.get("family", "")
    if not isinstance(family, str):
        raise ValueError(f"{path}: {where}: family is {family!r:.60}; expected a string")
    return family


def load_vqa_v2(
    root: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    cache_images: bool = False,
) -> VQAv2Dataset:
    """Read a VQA v2 split from the official files.

    Parameters
    ----------
    root : str or Path
        Folder holding the questions and annotations files.
    split : str
        Split name as in the file names, e.g. ``"val2014"``.
    image_dir : str or Path, optional
        Image folder; default ``root/<split>``. Images are only opened when requested.
    cache_images : bool
        Keep decoded images in memory.

    Returns
    -------
    VQAv2Dataset
        One record per annotation, in annotation-file order.

    Raises
    ------
    FileNotFoundError
        If the questions or annotations file is missing.
    ValueError
        On malformed JSON, a missing key or a value of another type than the official files'
        (file, list entry index and key are named), an empty or repeated annotation, or an
        annotation whose question is not in the questions file. Questions without an
        annotation are left out, as the official VQA API does.
    """
    root = Path(root)
    q_path = _find_file(root, "Questions", questions_filename(split))
    a_path = _find_file(root, "Annotations", annotations_filename(split))

    questions: dict[int, dict[str, Any]] = {}
    for i, q in enumerate(_read_list(q_path, "questions")):
        _check_keys(q, ("question_id", "image_id", "question"), q_path, f"questions entry {i}")
        questions[q["question_id"]] = q

    records: list[VQARecord] = []
    seen: dict[int, int] = {}
    for i, ann in enumerate(_read_list(a_path, "annotations")):
        where = f"annotations entry {i}"
        _check_keys(ann, _ANNOTATION_KEYS, a_path, where)
        qid = ann["question_id"]
        if qid in seen:
            raise ValueError(f"{a_path}: {where}: question id {qid} is annotated twice "
                             f"(also entry {seen[qid]})")
        seen[qid] = i
        q = questions.get(qid)
        if q is None:
            raise ValueError(f"{a_path}: {where}: question id {qid} is not in {q_path}")
        if q["image_id"] != ann["image_id"]:
            raise ValueError(f"{a_path}: {where}: image id differs from the one in {q_path}")
        if not isinstance(ann["answers"], list):
            raise ValueError(f"{a_path}: {where}: 'answers' is not a list")
        for j, a in enumerate(ann["answers"]):
            _check_keys(a, ("answer",), a_path, f"{where} answer {j}")
        records.append(
            VQARecord(
                question_id=qid,
                image_id=ann["image_id"],
                question=q["question"],
                question_type=ann["question_type"],
                answer_type=ann["answer_type"],
                multiple_choice_answer=ann["multiple_choice_answer"],
                answers=[a["answer"] for a in ann["answers"]],
                family=_family(ann, a_path, where),
            )
        )
    if not records and questions:
        raise ValueError(f"{a_path}: no annotations (an empty list) for the {len(questions)} "
                         f"questions of {q_path}")
    # Questions without an annotation are left out, as the official VQA API does (a questions
    # file may cover more than an annotation file filtered by type or subsampled).
    image_dir = root / split if image_dir is None else Path(image_dir)
    return VQAv2Dataset(records, image_dir, split, cache_images)


def write_vqa_v2(
    root: str | Path,
    split: str,
    records: list[VQARecord],
    images: dict[int, np.ndarray],
    image_dir: str | Path | None = None,
) -> None:
    """Write records and images in the official VQA v2 layout (readable by :func:`load_vqa_v2`).

    Parameters
    ----------
    root : str or Path
        Output folder (created if needed).
    split : str
        Split name used in the file names and ``data_subtype``.
    records : list of VQARecord
        Records to write; question ids must be distinct.
    images : dict of int to ndarray
        ``uint8`` ``(H, W, 3)`` image per image id; every record's image must be present.
    image_dir : str or Path, optional
        Image folder; default ``root/<split>``. Images are written as lossless ``.png``.

    Raises
    ------
    ValueError
        On repeated question ids, missing images or images of the wrong dtype/shape.
    """
    root = Path(root)
    qids = [r.question_id for r in records]
    if len(set(qids)) != len(qids):
        raise ValueError("records contain repeated question ids")
    missing = sorted({r.image_id for r in records} - set(images))
    if missing:
        raise ValueError(f"no image given for image ids {missing[:20]}")
    arrays = {}
    for image_id, img in images.items():
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"image {image_id}: expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}"
            )
        arrays[image_id] = arr

    # Metadata blocks exist in the official files; their content is informative only.
    info = {"description": "VQA v2-format export written by fedumm", "version": "2.0"}
    license_ = {"name": "see the source data", "url": ""}
    questions = {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": license_,
        "data_subtype": split, "questions": [r.question_entry() for r in records],
    }
    annotations = []
    for r in records:
        ann = r.annotation()
        if r.family:  # not an official key: only written when there is something to keep
            ann["family"] = r.family
        annotations.append(ann)
    ann_file = {
        "info": info, "license": license_, "data_type": "mscoco", "data_subtype": split,
        "annotations": annotations,
    }

    root.mkdir(parents=True, exist_ok=True)
    with (root / questions_filename(split)).open("w", encoding="utf-8") as f:
        json.dump(questions, f)
    with (root / annotations_filename(split)).open("w", encoding="utf-8") as f:
        json.dump(ann_file, f)
    out_dir = root / split if image_dir is None else Path(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_id, arr in arrays.items():
        path = out_dir / image_filename(split, image_id, ".png")
        Image.fromarray(np.ascontiguousarray(arr)).save(path)

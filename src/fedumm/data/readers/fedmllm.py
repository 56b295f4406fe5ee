"""FedMLLM's datasets (arXiv 2411.14717) in their published layouts, as understanding samples.

* **Hateful Memes** (``train.jsonl`` / ``dev_seen.jsonl``: ``{"id", "img", "label", "text"}``):
  a binary task. The meme's text is the sample's text modality (``Sample.context``), the
  question is fixed ("is this meme hateful?"), the answer ``yes`` (label 1) or ``no``.
* **CrisisMMD** (``task_<name>_text_img_<split>.tsv``: ``tweet_text``, ``image`` and ``label``
  columns, tab-separated): the informative (binary) or humanitarian (multi-class) task. The
  tweet is the text modality, the answer the label with underscores as spaces.
* **VQA-RAD** (``VQA_RAD Dataset Public.json``: a list of ``{"qid", "image_name", "question",
  "answer", "answer_type", ...}``): radiology questions, closed (yes/no) and open.

Every sample is labelled with its task (``family``: ``hateful_memes``, ``crisismmd_<name>``,
``vqa_rad_closed`` / ``vqa_rad_open``), so ``eval.classification`` can name it; images are
resolved (and checked) under ``data.images`` or the file's folder.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedumm.data.readers.common import (
    DataFileError,
    ImageResolver,
    Reader,
    image_root,
    iter_records,
    require,
    shared_labels,
    understanding_labels,
)
from fedumm.data.records import Sample
from fedumm.data.scenarios import UNDERSTANDING
from fedumm.registry import READERS

if TYPE_CHECKING:
    from fedumm.config import DataConfig

HATEFUL_QUESTION = "is this meme hateful?"
_CRISIS_FILE = re.compile(r"task_(?P<task>[a-z]+)_text_img_")


def detect(path: Path) -> str | None:
    """``hateful_memes``, ``crisismmd`` or ``vqa_rad`` when ``path`` is such a file."""
    if not path.is_file():
        return None
    if path.suffix == ".tsv":
        return "crisismmd" if {"tweet_text", "image", "label"} <= set(_tsv_header(path)) \
            else None
    if path.suffix not in (".json", ".jsonl"):
        return None
    try:
        first = next(iter_records(path), (None, None))[1]
    except DataFileError:
        return None
    if isinstance(first, dict) and {"img", "text"} <= set(first) and "id" in first:
        return "hateful_memes"
    if isinstance(first, dict) and {"image_name", "question", "answer"} <= set(first):
        return "vqa_rad"
    return None


def _tsv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return next(csv.reader(f, delimiter="\t"), [])
    except (OSError, UnicodeDecodeError, csv.Error):  # not this format's file
        return []


def read_fedmllm(path: Path, kind: str, resolve: ImageResolver, max_samples: int = 0
                 ) -> list[Sample]:
    """Every record of one FedMLLM dataset file (``kind`` from :func:`detect`)."""
    records = {"hateful_memes": _hateful_memes, "crisismmd": _crisismmd,
               "vqa_rad": _vqa_rad}[kind](path, resolve)
    out: list[Sample] = []
    for s in records:
        out.append(s)
        if max_samples and len(out) >= max_samples:
            break
    return out


def _labels(question: str, answer: str, family: str, rec: dict | None = None,
            **extra: str) -> dict[str, str]:
    return shared_labels({**understanding_labels(question, answer, rec), "family": family,
                          **extra})


def _hateful_memes(path: Path, resolve: ImageResolver) -> Iterator[Sample]:
    for where, rec in iter_records(path):
        require(rec, ("id", "img", "text"), path, where, "Hateful Memes record")
        label = rec.get("label")
        if label not in (0, 1, "0", "1"):
            raise DataFileError(path, where, f"label {label!r}: expected 0 or 1 (the unlabelled "
                                "test files cannot train or score)")
        answer = "yes" if int(label) == 1 else "no"
        yield Sample(id=f"hm{rec['id']}", task=UNDERSTANDING, text=HATEFUL_QUESTION,
                     image=resolve(rec["img"], path, where), answer=answer,
                     context=str(rec["text"]),
                     labels=_labels(HATEFUL_QUESTION, answer, "hateful_memes"))


def _crisismmd(path: Path, resolve: ImageResolver) -> Iterator[Sample]:
    m = _CRISIS_FILE.search(path.name)
    task = m.group("task") if m else "crisis"
    question = f"which {task} category does this post belong to?"
    for i, (where, row) in enumerate(iter_records(path)):
        require(row, ("tweet_text", "image", "label"), path, where, "CrisisMMD row")
        answer = row["label"].strip().replace("_", " ")
        rid = row.get("image_id") or row.get("tweet_id") or f"{path.stem}:{i}"
        yield Sample(id=f"crisis{rid}", task=UNDERSTANDING, text=question,
                     image=resolve(row["image"], path, where), answer=answer,
                     context=row["tweet_text"],
                     labels=_labels(question, answer, f"crisismmd_{task}",
                                    domain=row.get("event_name") or "crisis"))


def _vqa_rad(path: Path, resolve: ImageResolver) -> Iterator[Sample]:
    for where, rec in iter_records(path):
        require(rec, ("image_name", "question", "answer"), path, where, "VQA-RAD record")
        closed = str(rec.get("answer_type", "")).upper() == "CLOSED"
        answer = str(rec["answer"]).strip().lower()
        organ: Any = rec.get("image_organ")
        yield Sample(id=f"rad{rec.get('qid', where.split()[-1])}", task=UNDERSTANDING,
                     text=str(rec["question"]), image=resolve(rec["image_name"], path, where),
                     answer=answer,
                     labels=_labels(str(rec["question"]), answer,
                                    "vqa_rad_closed" if closed else "vqa_rad_open",
                                    **({"domain": str(organ).lower()} if organ else {})))


def _read(path: Path, modality: str, cfg: DataConfig) -> list[Sample]:
    kind = detect(path)
    assert kind is not None  # detected before it is read
    return read_fedmllm(path, kind, ImageResolver(image_root(cfg.images, path)), cfg.max_samples)


READERS.register("fedmllm", Reader(
    read=_read, detect=lambda path: detect(path) is not None,
    modalities=(UNDERSTANDING,), order=30,
    expected="Hateful Memes .jsonl, CrisisMMD .tsv, VQA-RAD .json"))

"""What every reader shares: its registration (:class:`Reader`), record iteration with
positions, clear errors, image paths, and the partition labels a real record can give.

Errors name the file, the record (``line N`` of a JSONL file, ``index N`` of a JSON list,
``row N`` of a CSV file) and what was expected, and are raised while reading, before training.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedumm.data.answers import normalize_answer
from fedumm.data.images import DataFileError, check_image
from fedumm.data.progress import report
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING

if TYPE_CHECKING:
    from fedumm.config import DataConfig

JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".json", ".jsonl", ".csv")
# Record keys copied into a sample's partition labels when a file has them
LABEL_KEYS = ("domain", "tag", "question_type", "answer_type", "category", "source", "image_id")


@dataclass(frozen=True)
class Reader:
    """One data format, registered by name in :data:`fedumm.registry.READERS`, so that
    :func:`~fedumm.data.readers.read_samples` and :func:`~fedumm.data.readers.detect_format`
    walk the registry instead of a list of formats: a new format is one module that registers
    its reader (and a line in :mod:`fedumm.data.readers.builtin`).

    A *source* (``source`` set) is what ``data.format`` names: it makes every sample of a role
    (``train``, ``val``, ``all``) from the config; ShapesWorld generates them, ``files`` reads
    the user's paths. A *file format* (``read`` and ``detect`` set) is recognised from one path
    of ``data.understanding`` / ``data.generation``: the file formats of that modality are asked
    in ``order`` (lower first, so that a catch-all such as any ``.json`` file comes last) and
    the first whose ``detect`` says yes reads the path; ``expected`` describes its files for the
    error when none does; ``requires`` lists the optional packages it needs.
    """

    source: Callable[[DataConfig, str], list[Sample]] | None = None  # (cfg, role)
    read: Callable[[Path, str, DataConfig], list[Sample]] | None = None  # (path, modality, cfg)
    detect: Callable[[Path], bool] | None = None
    modalities: tuple[str, ...] = (UNDERSTANDING, GENERATION)
    expected: str = ""
    order: int = 50
    # (import name, install command) of optional packages the format needs: config
    # validation refuses a path detected as this format when one is missing
    requires: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.source is None and (self.read is None or self.detect is None):
            raise ValueError("a reader needs a source, or both read and detect")
        unknown = sorted(set(self.modalities) - {UNDERSTANDING, GENERATION})
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; expected {UNDERSTANDING} and/or "
                             f"{GENERATION}")


_TABLES = {".csv": ",", ".tsv": "\t"}  # delimited text tables with a header row


def iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(position, record) of a JSONL file (one object per line), a JSON list, or a CSV / TSV
    file with a header row. A JSONL file is streamed; a JSON list is parsed whole. Text that is not
    UTF-8, malformed JSON or CSV, and nesting too deep to parse are DataFileErrors naming the
    file and the record."""
    try:
        f = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DataFileError(path, "", f"cannot open ({exc.strerror})") from exc
    where = ""
    try:
        with f:
            for where, rec in _records(f, path):
                yield where, rec
    except UnicodeDecodeError as exc:
        raise DataFileError(path, where and f"after {where}",
                            f"not UTF-8 text (byte {exc.start} of a read block)") from None
    except csv.Error as exc:
        raise DataFileError(path, where and f"after {where}",
                            f"malformed {path.suffix[1:].upper()} ({exc})") from None
    except OSError as exc:  # e.g. a folder named like a file, an I/O error
        raise DataFileError(path, "", f"cannot read ({exc.strerror or exc})") from None


def _records(f, path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix in _TABLES:
        reader = csv.DictReader(f, delimiter=_TABLES[path.suffix])
        if not reader.fieldnames:
            raise DataFileError(path, "", f"empty {path.suffix[1:].upper()} file (expected a "
                                "header row)")
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns (DictReader keys them None)
                n = len(reader.fieldnames)
                raise DataFileError(path, f"row {i + 2}", f"{n + len(row[None])} cells, the "
                                    f"header has {n} columns (an unquoted comma?)")
            yield f"row {i + 2}", row  # the header is row 1
        return
    first = _first_char(f)
    if first == "[":  # a JSON list (the LLaVA layout)
        data = _json(f.read(), path, 0)
        if not isinstance(data, list):
            raise DataFileError(path, "", "expected a JSON list of records")
        for i, rec in enumerate(data):
            yield f"index {i}", rec
        return
    for n, line in enumerate(f, 1):
        if line.strip():
            yield f"line {n}", _json(line, path, n)


def _json(text: str, path: Path, line: int) -> Any:
    """One JSON document (``line`` > 0: the line of a JSONL file it is)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; expected one JSON object per line" if line else ""
        raise DataFileError(path, f"line {line or exc.lineno}", f"malformed JSON ({exc.msg})"
                            f"{hint}") from None
    except (ValueError, RecursionError) as exc:  # a number past int's digit limit, deep nesting
        raise DataFileError(path, f"line {line or 1}" if line else "",
                            f"cannot parse JSON ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


def _first_char(f) -> str:
    """The first non-space character of a text file, leaving the file at its start."""
    while True:
        c = f.read(1)
        if not c or not c.isspace():
            f.seek(0)
            return c


def require(rec: Any, keys: tuple[str, ...], path: Path, where: str, what: str) -> None:
    """``rec`` is an object holding every one of ``keys``."""
    if not isinstance(rec, dict):
        raise DataFileError(path, where, f"expected a JSON object ({what}), got "
                            f"{type(rec).__name__}")
    missing = [k for k in keys if rec.get(k) in (None, "")]
    if missing:
        raise DataFileError(path, where, f"no {missing[0]!r} (a {what} has keys "
                            f"{', '.join(map(repr, keys))}; this one has {sorted(rec)})")


def pick_key(rec: dict, candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` that ``rec`` holds with a value."""
    return next((k for k in candidates if rec.get(k) not in (None, "")), None)


_REPORT_EVERY = 500  # images checked between progress reports


class ImageResolver:
    """Relative image paths -> checked :class:`ImageRef` s. The root is ``data.images``, else
    the data file's folder (an image folder's ``metadata.jsonl``: always its own folder);
    every file is checked while reading (it exists, its header is an image's, its size is
    within the pixel budget), so a bad image stops the run before training starts. Each
    file's header is read once however many records share it."""

    def __init__(self, root: str | Path, hint: str = "set data.images to change it") -> None:
        self.root = str(root)
        self.hint = hint  # how the user changes the root (an image folder's is fixed)
        self._checked: set[str] = set()

    def __call__(self, value: Any, path: Path, where: str) -> ImageRef:
        if not isinstance(value, str) or not value:
            raise DataFileError(path, where, f"expected an image path, got {value!r:.80}")
        full = value if os.path.isabs(value) else os.path.join(self.root, value)
        if full not in self._checked:
            try:
                is_file = os.path.isfile(full)
            except ValueError:  # an embedded NUL byte
                is_file = False
            if not is_file:
                raise DataFileError(path, where, f"image not found: {full} (relative paths "
                                    f"are resolved under {self.root}; {self.hint})")
            try:
                check_image(full)
            except DataFileError as exc:
                raise DataFileError(path, where, str(exc)) from None
            self._checked.add(full)
            if len(self._checked) % _REPORT_EVERY == 0:
                report("checking images", len(self._checked))
        return ImageRef(path=full)


def image_root(images: str, data_file: Path) -> Path:
    """Where relative image paths of ``data_file`` point: ``data.images`` or the file's folder."""
    return Path(images) if images else data_file.parent


def table_format(read: Callable[[Path, ImageResolver, int], list[Sample]], modality: str,
                 expected: str) -> Reader:
    """A format of one modality read from any .json / .jsonl / .csv table (images resolved
    under ``data.images`` or the table's folder), asked after the specific formats."""
    return Reader(
        read=lambda path, _modality, cfg: read(
            path, ImageResolver(image_root(cfg.images, path)), cfg.max_samples),
        detect=lambda path: path.is_file() and path.suffix in TABLE_SUFFIXES,
        modalities=(modality,), order=90, expected=expected)


def understanding_labels(question: str, answer: str, rec: dict | None = None
                         ) -> dict[str, str]:
    """Partition labels of a question/answer pair: the normalised answer (``long`` past five
    words, so free-form answers do not each make a class), its VQA answer type (yes/no,
    number, other), the question type (its first two words, lower case) and any of
    :data:`LABEL_KEYS` the record carries."""
    norm = normalize_answer(answer)
    kind = "yes/no" if norm in ("yes", "no") else "number" if norm.isdigit() else "other"
    words = question.lower().replace("<image>", " ").split()
    labels = {"answer": norm if len(norm.split()) <= 5 else "long", "answer_type": kind,
              "question_type": " ".join(words[:2]) or "none"}
    labels.update(extra_labels(rec))
    return shared_labels(labels)


_LABELS: dict[tuple, dict[str, str]] = {}


def shared_labels(labels: dict[str, str]) -> dict[str, str]:
    """One dict object per distinct set of labels: records share them (a real dataset has far
    fewer label combinations than records, and the index of a large file stays small). The
    dicts are shared, so they are never modified after reading."""
    key = tuple(labels.items())
    found = _LABELS.get(key)
    if found is None:
        if len(_LABELS) >= 1_000_000:  # bound the cache (labels with per-record values)
            _LABELS.clear()
        found = _LABELS[key] = {k: sys.intern(v) for k, v in labels.items()}
    return found


def extra_labels(rec: dict | None) -> dict[str, str]:
    """The :data:`LABEL_KEYS` a record carries, as strings."""
    if not rec:
        return {}
    return {k: str(rec[k]) for k in LABEL_KEYS if k in rec and isinstance(rec[k], (str, int))}

"""GenEval's own files: the prompt record, ``evaluation_metadata.jsonl`` and the image
folder layout, read and written here; scored in :mod:`fedumm.eval.geneval`.

GenEval (djghosh13/geneval) describes each generation prompt as one JSON object per line of
``evaluation_metadata.jsonl``::

    {"tag": "position", "include": [{"class": "kite", "count": 1},
     {"class": "wine glass", "count": 1, "position": ["above", 0]}], "prompt": "..."}

``include`` clauses may carry ``color`` (a colour name) and ``position`` (``[relation, index]``
where ``index`` points to an earlier include clause); ``exclude`` clauses carry ``class`` and
``count`` only. Generated images live in ``<root>/<index:05d>/samples/<sample:04d>.png`` with the
prompt's metadata in ``<root>/<index:05d>/metadata.jsonl``.

What is accepted follows GenEval's ``evaluate_images.py``: any ``tag`` string (``counting``
selects the stricter threshold; any other tag is scored as its own task by ``summary_scores.py``,
so a tag outside the six of the paper is kept, not refused), any class and colour name (one the
detector does not know is never found), prompt folders named by any digits (``00000``, ``0``),
sample files ``<digits>.png``. Stricter than the official, and refused with the file and line
named: unknown keys (a misspelt ``exclude`` would silently change the prompt), ``count`` other
than a positive integer, ``color`` / ``position`` in an ``exclude`` clause (ignored by the
official) and a ``position`` index that does not point to an earlier include clause.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedumm.data.official import GENEVAL_TAGS, POSITION_RELATIONS, GenEvalRecord

_TOP_KEYS = {"tag", "include", "exclude", "prompt"}
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}
_SAMPLE_RE = re.compile(r"^(\d+)\.png$")


class GenEvalFormatError(ValueError):
    """A line of a GenEval metadata file does not follow the format."""


def _check_clause(clause: Any, kind: str, pos: int, n_before: int) -> str | None:
    """Return a problem description for one clause, or ``None`` when it is valid."""
    where = f"{kind}[{pos}]"
    if not isinstance(clause, dict):
        return f"{where} must be an object, got {type(clause).__name__}"
    allowed = _INCLUDE_KEYS if kind == "include" else _EXCLUDE_KEYS
    unknown = sorted(set(clause) - allowed)
    if unknown:
        return f"{where} has unknown key(s) {unknown}"
    for key in ("class", "count"):
        if key not in clause:
            return f"{where} is missing key {key!r}"
    if not isinstance(clause["class"], str) or not clause["class"]:
        return f"{where}: 'class' must be a non-empty string, got {clause['class']!r}"
    count = clause["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"{where}: 'count' must be a positive int, got {count!r}"
    if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"]):
        return f"{where}: 'color' must be a non-empty string, got {clause['color']!r}"
    if "position" in clause:
        p = clause["position"]
        if not (isinstance(p, list) and len(p) == 2):
            return f"{where}: 'position' must be [relation, index], got {p!r}"
        rel, idx = p
        if rel not in POSITION_RELATIONS:
            return f"{where}: unknown relation {rel!r} (expected one of {POSITION_RELATIONS})"
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n_before:
            return (
                f"{where}: position index {idx!r} must point to an earlier include clause "
                f"(0..{n_before - 1})"
            )
    return None


def record_from_json(obj: Any) -> GenEvalRecord:
    """Validate one decoded metadata object and build a :class:`GenEvalRecord`.

    Raises
    ------
    GenEvalFormatError
        With a message describing the first problem found (without file/line context).
    """
    if not isinstance(obj, dict):
        raise GenEvalFormatError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise GenEvalFormatError(f"unknown key(s) {unknown}")
    for key in ("tag", "include", "prompt"):
        if key not in obj:
            raise GenEvalFormatError(f"missing key {key!r}")
    if not isinstance(obj["tag"], str) or not obj["tag"].strip():
        raise GenEvalFormatError(f"'tag' must be a non-empty string (one of {GENEVAL_TAGS}), "
                                 f"got {obj['tag']!r}")
    if not isinstance(obj["prompt"], str):
        raise GenEvalFormatError(f"'prompt' must be a string, got {obj['prompt']!r}")
    include, exclude = obj["include"], obj.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise GenEvalFormatError("'include' must be a non-empty list of clauses")
    if not isinstance(exclude, list):
        raise GenEvalFormatError("'exclude' must be a list of clauses")
    for kind, clauses in (("include", include), ("exclude", exclude)):
        for i, clause in enumerate(clauses):
            problem = _check_clause(clause, kind, i, i)
            if problem:
                raise GenEvalFormatError(problem)
    return GenEvalRecord(
        tag=obj["tag"],
        prompt=obj["prompt"],
        include=[dict(c) for c in include],
        exclude=[dict(c) for c in exclude],
    )


def load_geneval_metadata(path: str | Path) -> list[GenEvalRecord]:
    """Read GenEval's ``evaluation_metadata.jsonl`` (one JSON object per line).

    Parameters
    ----------
    path
        The metadata file. Blank lines are skipped.

    Returns
    -------
    list of GenEvalRecord
        In file order (the record's position is GenEval's prompt index).

    Raises
    ------
    GenEvalFormatError
        Naming the file and the 1-based line number of malformed JSON, a missing or unknown
        key, an unknown tag or an invalid clause.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    records: list[GenEvalRecord] = []
    lineno = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    records.append(_record_of_line(line, path, lineno))
    except UnicodeDecodeError as exc:
        raise GenEvalFormatError(f"{path}:{lineno + 1}: not UTF-8 text (byte {exc.start} of a "
                                 "read block)") from None
    except IsADirectoryError:
        raise GenEvalFormatError(f"{path}: a folder, not a metadata file") from None
    return records


def _record_of_line(line: str, path: Path, lineno: int) -> GenEvalRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise GenEvalFormatError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # past int's digit limit, nesting too deep
        raise GenEvalFormatError(f"{path}:{lineno}: cannot parse JSON ({exc})"[:300]) from None
    try:
        return record_from_json(obj)
    except GenEvalFormatError as exc:
        raise GenEvalFormatError(f"{path}:{lineno}: {exc}") from None


def write_geneval_metadata(path: str | Path, records: Iterable[GenEvalRecord]) -> None:
    """Write records in GenEval's format (key order ``tag, include, [exclude], prompt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_json()) + "\n")


def tag_counts(records: Iterable[GenEvalRecord]) -> dict[str, int]:
    """Number of records per tag, in :data:`GENEVAL_TAGS` order (absent tags omitted)."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.tag] = counts.get(rec.tag, 0) + 1
    order = {t: i for i, t in enumerate(GENEVAL_TAGS)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def geneval_prompt_dir(root: str | Path, index: int) -> Path:
    """Folder of prompt ``index``: ``root/<index:05d>``."""
    return Path(root) / f"{index:05d}"


def geneval_image_path(root: str | Path, index: int, sample: int = 0) -> Path:
    """Path of one generated image: ``root/<index:05d>/samples/<sample:04d>.png``."""
    return geneval_prompt_dir(root, index) / "samples" / f"{sample:04d}.png"


def geneval_prompt_dirs(root: str | Path) -> dict[int, Path]:
    """Prompt index -> folder, for every sub-folder of ``root`` named by digits.

    GenEval's evaluator takes every folder whose name ``isdigit()``; its generator writes
    ``<index:05d>``, other writers ``<index>``: both are found here.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a folder.
    GenEvalFormatError
        If two folders name the same prompt (``1`` and ``00001``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"missing GenEval image folder {root}")
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.isascii() and p.name.isdigit():
            index = int(p.name)
            if index in found:
                raise GenEvalFormatError(f"{root}: folders {found[index].name} and {p.name} "
                                         f"are both prompt {index}")
            found[index] = p
    return found


def list_geneval_samples(root: str | Path, index: int, folder: Path | None = None
                         ) -> list[Path]:
    """The ``<digits>.png`` files of prompt ``index``, sorted by sample number.

    GenEval's evaluator accepts any ``\\d+.png`` name (its README shows 4 digits, its diffusers
    script writes 5), so both are found here. ``folder`` is the prompt's folder when it is not
    ``root/<index:05d>`` (see :func:`geneval_prompt_dirs`).
    """
    folder = (geneval_prompt_dir(root, index) if folder is None else folder) / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _SAMPLE_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def read_prompt_metadata(path: str | Path) -> GenEvalRecord:
    """A prompt folder's ``metadata.jsonl``: the one JSON object GenEval's generator dumps
    there (its evaluator reads it with ``json.load``).

    Raises
    ------
    GenEvalFormatError
        Naming the file, when it is not one valid metadata object.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise GenEvalFormatError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise GenEvalFormatError(f"{path}: malformed JSON (one object expected): {exc.msg} "
                                 f"at line {exc.lineno}") from None
    except (ValueError, RecursionError) as exc:
        raise GenEvalFormatError(f"{path}: cannot parse JSON ({exc})"[:300]) from None
    try:
        return record_from_json(obj)
    except GenEvalFormatError as exc:
        raise GenEvalFormatError(f"{path}: {exc}") from None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {arr.shape}")
    return arr


def write_geneval_sample_dir(
    root: str | Path, index: int, record: GenEvalRecord, images: Sequence[np.ndarray]
) -> list[Path]:
    """Write one prompt's folder in GenEval's layout.

    Parameters
    ----------
    root
        The image folder (``<IMAGE_FOLDER>`` in GenEval's README).
    index
        The prompt's index in the metadata file.
    record
        Written as one JSON object to ``root/<index:05d>/metadata.jsonl``.
    images
        ``uint8`` arrays (floats are taken as values in [0, 1]), saved as
        ``samples/0000.png``, ``samples/0001.png``, ...

    Returns
    -------
    list of Path
        The written image paths.
    """
    from PIL import Image

    folder = geneval_prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(record.to_json()) + "\n", encoding="utf-8")
    paths = []
    for i, image in enumerate(images):
        p = geneval_image_path(root, index, i)
        Image.fromarray(_to_uint8(image)).save(p)
        paths.append(p)
    return paths

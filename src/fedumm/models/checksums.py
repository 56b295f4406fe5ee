"""Checksums of checkpoint folders: ``SHA256SUMS.json`` written by every save, verified at load,
so a corrupt or swapped file is a clear error naming it instead of a silently wrong model.

Checksums catch a file changed after it was written; :func:`check_tensor_file` and
:func:`check_finite` catch what a checksum cannot: a file written empty, cut short, or holding
non-finite values (a diverged model saved with valid sums).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SUMS = "SHA256SUMS.json"


def write_checksums(path: Path, names: Sequence[str]) -> dict[str, str]:
    """``SHA256SUMS.json`` of the named files of a checkpoint folder."""
    sums = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in sorted(names)}
    (path / SUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    return sums


def verify_checksums(path: Path, required: Sequence[str], optional: bool = False) -> None:
    """Every file ``SHA256SUMS.json`` lists (which must include ``required``) is present and
    unchanged. ``optional``: a folder without the file passes (one fedumm did not write)."""
    if optional and not (path / SUMS).is_file():
        return
    if not (path / SUMS).is_file():
        raise ValueError(f"{path} has no {SUMS}: the checkpoint cannot be verified (save it "
                         "again with this version of fedumm)")
    sums = _read_sums(path / SUMS)
    missing = [n for n in required if n not in sums]
    if missing:
        raise ValueError(f"{path / SUMS} does not list {missing}")
    for name, digest in sorted(sums.items()):
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing (listed in {SUMS})")
        if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{f} is corrupt: its sha256 differs from {SUMS}")


def _read_sums(file: Path) -> dict[str, str]:
    """``SHA256SUMS.json``: file names inside the folder mapped to hex digests."""
    try:
        sums = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ValueError(f"{file} cannot be read ({_reason(exc)})") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in sums.items()):
        raise ValueError(f"{file}: expected an object of file name -> sha256")
    outside = [n for n in sums if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise ValueError(f"{file} lists {outside[0]!r}, outside its folder")
    return sums


def _reason(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


def nonfinite_entry(tree: Any, prefix: str = "") -> str | None:
    """The dotted name of the first floating tensor (or float) in a nested state (dicts, lists,
    tuples) holding NaN or infinity, or None when all are finite."""
    if isinstance(tree, torch.Tensor):
        finite = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if finite else prefix or "the tensor"
    if isinstance(tree, float):
        return None if math.isfinite(tree) else prefix or "the value"
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        bad = nonfinite_entry(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def check_finite(state: Any, where: str | Path, floats: bool = True) -> None:
    """ValueError naming ``where`` and the entry when a tensor in ``state`` is not finite
    (``floats``: plain Python floats too)."""
    bad = nonfinite_entry(state if floats else _tensors_only(state))
    if bad is not None:
        raise ValueError(f"{where}: {bad} holds NaN or infinite values (a diverged or damaged "
                         "model); refusing to use it")


def _tensors_only(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tensors_only(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tensors_only(v) for v in tree]
    return tree if isinstance(tree, torch.Tensor) else None


def check_tensor_file(file: Path) -> None:
    """A ``.safetensors`` file reads whole and holds finite values: an empty, truncated or
    non-finite file is a ValueError naming it (instead of the library's traceback)."""
    from safetensors import safe_open

    if not file.is_file():
        raise ValueError(f"{file} is missing")
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty")
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                check_finite({key: f.get_tensor(key)}, file)
    except ValueError:
        raise
    except Exception as exc:  # SafetensorError: a header or length that does not add up
        raise ValueError(f"{file} cannot be read: truncated or not a safetensors file "
                         f"({_reason(exc)})") from None


def write_folder_checksums(path: Path) -> dict[str, str]:
    """``SHA256SUMS.json`` of every file under ``path`` (names relative to it)."""
    names = [str(f.relative_to(path)) for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != SUMS]
    return write_checksums(path, names)

"""Checksums of checkpoint folders: ``SHA256SUMS.json`` written by every save, verified at load,
so a corrupt or swapped file is a clear error naming it instead of a silently wrong model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

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
    sums = json.loads((path / SUMS).read_text())
    missing = [n for n in required if n not in sums]
    if missing:
        raise ValueError(f"{path / SUMS} does not list {missing}")
    for name, digest in sorted(sums.items()):
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing (listed in {SUMS})")
        if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{f} is corrupt: its sha256 differs from {SUMS}")


def write_folder_checksums(path: Path) -> dict[str, str]:
    """``SHA256SUMS.json`` of every file under ``path`` (names relative to it)."""
    names = [str(f.relative_to(path)) for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != SUMS]
    return write_checksums(path, names)

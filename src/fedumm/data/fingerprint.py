"""A fingerprint of the data a config reads, so a resumed run can refuse data that changed
since it started (a file edited, added or removed between a kill and ``--resume``).

Cheap on large data: only file metadata is read. A data file a path names directly (or a glob
matches) is identified by its content hash when small (under :data:`HASHED_BELOW` bytes, so
touching it without a change is no change), else by its size and modification time; every
file under a folder a path names (an image folder, a VQA v2 split, a Hugging Face dataset,
``data.images``) and every image the samples use, by size and modification time. ShapesWorld
data is generated: its fingerprint is the generator's settings.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedumm.config import DataConfig
    from fedumm.data.records import Sample

HASHED_BELOW = 1 << 20  # bytes: files this small are hashed (a JSON or CSV of records)
# The settings of data.format=files that name files; the rest of DataConfig is the generator's
# (shapes) or how records are used, which the config hash already covers.
FILE_KEYS = ("understanding", "generation", "images", "understanding_val", "generation_val")


def data_fingerprint(cfg: DataConfig, samples: Iterable[Sample] | None = None) -> str:
    """A hex digest that changes when the data ``cfg`` reads changes. ``samples`` (optional,
    the samples read from ``cfg``) adds the image files they use, wherever they live (a
    JSONL's images sit beside it by default, outside any folder the config names)."""
    digest = hashlib.sha256()
    for name, identity in sorted(data_manifest(cfg, samples).items()):
        digest.update(f"{name}\0{identity}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def data_manifest(cfg: DataConfig, samples: Iterable[Sample] | None = None
                  ) -> dict[str, str]:
    """What :func:`data_fingerprint` hashes: a name (a file path, or ``generator``) -> its
    identity. Comparing two manifests names the files that changed."""
    if cfg.format != "files":  # generated data: the settings are the data
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FILE_KEYS}
        return {"generator": json.dumps(settings, sort_keys=True, default=str)}
    out: dict[str, str] = {}
    for key in FILE_KEYS:
        spec = getattr(cfg, key)
        if spec:
            for path in _named(spec):
                _add(out, path, hash_small=key != "images")
    for s in samples or ():
        ref = s.image
        if ref is not None and ref.path and ref.path not in out:
            out[ref.path] = _stat(ref.path)
    return out


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The names whose identity differs between two manifests (added and removed too)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _named(spec: str) -> list[str]:
    """The paths a data setting names: a glob's matches (sorted) or the path itself."""
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec)) or [spec]  # no match: recorded as missing
    return [spec]


def _add(out: dict[str, str], path: str, hash_small: bool) -> None:
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()  # a fixed walk order (the manifest is sorted anyway)
            for name in files:
                full = os.path.join(root, name)
                out[full] = _stat(full)
        return
    out[path] = _identity(path) if hash_small else _stat(path)


def _identity(path: str) -> str:
    """The content hash of a small file, else its size and modification time."""
    try:
        if os.path.getsize(path) >= HASHED_BELOW:
            return _stat(path)
        with open(path, "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return "missing"


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # gone, or a name the OS cannot take
        return "missing"
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def describe_change(old: dict[str, str], new: dict[str, str], limit: int = 3) -> str:
    """``changed: a, b, c (+N more)``: the first files that differ, for an error message."""
    names = changed_files(old, new)
    shown = ", ".join(str(Path(n)) for n in names[:limit])
    return f"changed: {shown}" + (f" (+{len(names) - limit} more)" if len(names) > limit
                                  else "")

"""Generation samples from WebDataset ``.tar`` shards: files sharing a key (the member name up to
the first dot of its base name) form a sample; ``<key>.txt`` (or ``.caption`` / ``.json`` with
a ``prompt``, ``caption`` or ``text`` key) is the prompt and ``<key>.jpg`` (or png, jpeg, webp)
the image. This is the BLIP3o-60k layout.

Reading a shard indexes it once: the prompts (small) are read, the images are not; each image
keeps its byte offset so a batch reads it directly from the archive.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedumm.data.progress import report
from fedumm.data.readers.common import DataFileError, Reader
from fedumm.data.readers.text_image import TEXT_KEYS, generation_sample
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import GENERATION
from fedumm.registry import READERS

if TYPE_CHECKING:
    from fedumm.config import DataConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption", "json")


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): the WebDataset key and extension."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _prompt(raw: bytes, ext: str, shard: Path, member: str) -> str:
    text = raw.decode("utf-8", errors="replace")
    if ext != "json":
        return text.strip()
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(shard, f"member {member}", f"malformed JSON ({exc.msg})") from exc
    key = next((k for k in TEXT_KEYS if isinstance(rec, dict) and rec.get(k)), None)
    if key is None:
        raise DataFileError(shard, f"member {member}", f"no prompt (one of {TEXT_KEYS})")
    return str(rec[key]).strip()


def read_shard(shard: Path, max_samples: int = 0) -> list[Sample]:
    """Every complete (image, prompt) sample of one shard, in archive order."""
    images: dict[str, tuple[str, int, int]] = {}
    prompts: dict[str, str] = {}
    order: list[str] = []
    # offsets address the archive's bytes only when it is not compressed
    direct = not shard.name.endswith((".gz", ".tgz", ".bz2", ".xz"))
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if key not in images and key not in prompts:
                    order.append(key)
                if ext in IMAGE_EXTS:
                    images[key] = (m.name, m.offset_data if direct else -1, m.size)
                elif ext in TEXT_EXTS and key not in prompts:
                    f = tar.extractfile(m)
                    prompts[key] = _prompt(f.read() if f else b"", ext, shard, m.name)
    except (OSError, tarfile.TarError) as exc:
        raise DataFileError(shard, "", f"not a readable tar archive ({exc})") from exc
    out = []
    for key in order:
        if key not in images or key not in prompts:
            has = "an image" if key in images else "a prompt"
            lacks = "prompt (.txt)" if key in images else f"image ({', '.join(IMAGE_EXTS)})"
            raise DataFileError(shard, f"sample {key}", f"has {has} but no {lacks}")
        name, offset, size = images[key]
        ref = ImageRef(path=str(shard), member=name, offset=offset, size=size)
        out.append(generation_sample(f"{shard.stem}/{key}", prompts[key], ref))
        if max_samples and len(out) >= max_samples:
            break
    if not out:
        raise DataFileError(shard, "", "no samples (expected <key>.jpg with <key>.txt members)")
    return out


def is_webdataset(path: Path) -> bool:
    """``path`` is a ``.tar`` shard or a folder holding some."""
    return (path.is_file() and path.suffix == ".tar") or (path.is_dir()
                                                          and any(path.glob("*.tar")))


def read_shards(path: Path, modality: str, cfg: DataConfig) -> list[Sample]:
    """Every sample of a shard, or of a folder's shards in name order, up to
    ``data.max_samples`` in all."""
    out: list[Sample] = []
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    for i, shard in enumerate(shards):
        out += read_shard(shard, cfg.max_samples - len(out) if cfg.max_samples else 0)
        report("indexing shards", i + 1, len(shards))
        if cfg.max_samples and len(out) >= cfg.max_samples:
            break
    return out


READERS.register("webdataset", Reader(
    read=read_shards, detect=is_webdataset, modalities=(GENERATION,), order=30,
    expected="WebDataset .tar shards"))

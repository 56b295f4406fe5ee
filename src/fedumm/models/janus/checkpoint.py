"""Janus checkpoint folders in the Hugging Face layout (``config.json``, the weights, the
tokenizer and the processor config, e.g. deepseek-community/Janus-Pro-1B): what a folder must
hold, loading it through transformers, and writing one (with fedumm's checksum list)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedumm.models.checksums import verify_checksums, write_folder_checksums

_REQUIRED = {"config.json": "the model config"}
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_folder(path: Path) -> None:
    """A clear error naming what a Janus checkpoint folder lacks."""
    if not path.is_dir():
        raise FileNotFoundError(f"backbone.path={str(path)!r} is not a folder (expected a Janus "
                                "checkpoint in the Hugging Face layout)")
    missing = [f"{f} ({why})" for f, why in _REQUIRED.items() if not (path / f).is_file()]
    if not any((path / f).is_file() for f in _WEIGHTS):
        missing.append(f"the weights (one of {', '.join(_WEIGHTS)})")
    if not any((path / f).is_file() for f in _PROCESSOR):
        missing.append(f"the image processor config (one of {', '.join(_PROCESSOR)})")
    if not any((path / f).is_file() for f in _TOKENIZER):
        missing.append(f"the tokenizer (one of {', '.join(_TOKENIZER)})")
    if missing:
        raise FileNotFoundError(f"{path} is not a Janus checkpoint folder: missing "
                                + "; ".join(missing))
    kind = json.loads((path / "config.json").read_text()).get("model_type")
    if kind != "janus":
        raise ValueError(f"{path}/config.json has model_type={kind!r}, expected 'janus' (the "
                         "transformers layout, e.g. deepseek-community/Janus-Pro-1B)")


def folder_config(path: Path):
    """The ``JanusConfig`` of a checkpoint folder (no weights read)."""
    from transformers import JanusConfig

    check_folder(path)
    return JanusConfig.from_pretrained(str(path), local_files_only=True)


def load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(``JanusForConditionalGeneration`` in ``dtype``, ``JanusProcessor``) from a folder."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    check_folder(path)
    verify_checksums(path, (), optional=True)  # a folder fedumm wrote lists its files
    processor = JanusProcessor.from_pretrained(str(path), local_files_only=True)
    model = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype,
                                                          local_files_only=True)
    return model, processor


def save_folder(model, processor, path: Path) -> Path:
    """Write ``model`` (no PEFT wrapper) and ``processor`` as a folder :func:`load_folder`
    reads back."""
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    write_folder_checksums(path)
    return path

"""``fedumm backbone check PATH``: a checkpoint folder against what its backbone kind needs, in
seconds, from its small files and the safetensors headers (the weights stay on disk; only a
Janus VQ codebook is read). One check per line, each OK, WARN or FAIL with a short message:

* the kind (janus: transformers' ``JanusForConditionalGeneration`` layout; blip3o: BLIP3o's
  published layout; reference: fedumm's own UMM), detected from ``config.json`` or given;
* the files, the weights' tensors, the dimensions against the kind's presets, the tokens the
  backbone's prompts use and the chat template;
* per kind: the Janus codebook's row norms (:mod:`.janus`), BLIP3o's understanding and
  generation parts (:mod:`.blip3o`), the reference's checksums and codebook (:mod:`.reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from fedumm.models.conformance import blip3o, janus, reference
from fedumm.models.conformance.common import FAIL, OK, WARN, Check, Report, read_json
from fedumm.models.reference.backbone import CODEBOOK, SHIPPED_BASE

KINDS: dict[str, Callable[[Path], Iterator[Check]]] = {
    "janus": janus.checks, "blip3o": blip3o.checks, "reference": reference.checks}


def detect_kind(path: Path) -> tuple[str | None, str]:
    """(the kind the folder is, or None, and why)."""
    if not (path / "config.json").is_file():
        what = "an empty folder" if not any(path.iterdir()) else "a folder"
        return None, (f"{what} without config.json: not a janus, blip3o or reference "
                      "checkpoint folder")
    try:
        config = read_json(path / "config.json")
    except ValueError as exc:
        return None, f"config.json does not parse ({exc})"
    model_type = str(config.get("model_type", ""))
    if model_type == "janus":
        return "janus", "config.json model_type 'janus' (transformers' Janus layout)"
    if "n_query" in config and model_type.startswith(("qwen2_5_vl", "blip3o")):
        return "blip3o", f"config.json model_type {model_type!r} with n_query (BLIP3o's layout)"
    if isinstance(config.get("model"), dict) and (path / CODEBOOK).is_file():
        return "reference", f"config.json with a model section, and {CODEBOOK} (fedumm's UMM)"
    return None, (f"config.json (model_type={config.get('model_type')!r}) is none of janus "
                  "(model_type 'janus'), blip3o (model_type qwen2_5_vl / blip3o_qwen and "
                  "n_query) or reference (a model section and codebook.safetensors)")


def resolve(path: str | Path) -> Path:
    """``base`` names the shipped reference checkpoint; a path that is no folder is an
    error."""
    folder = SHIPPED_BASE if str(path) == "base" else Path(path)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise FileNotFoundError(f"{path}: {what} (expected a checkpoint folder)")
    return folder


def check_backbone(path: str | Path, kind: str | None = None) -> Report:
    """Every check of the folder ``path`` (``base``: the shipped reference checkpoint), as the
    kind it is, or as ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: checks exist for {sorted(KINDS)}")
    folder = resolve(path)
    detected, why = detect_kind(folder)
    report = Report(str(path), kind or detected)
    if kind is None and detected is None:
        report.checks.append(Check("kind", FAIL, why))
        return report
    if kind is None or kind == detected:
        report.checks.append(Check("kind", OK, f"{report.kind}: {why}"))
    else:
        report.checks.append(Check("kind", WARN, f"{kind} as asked (detected: "
                                   f"{detected or 'none'}; {why})"))
    report.checks.extend(KINDS[report.kind](folder))
    return report


__all__ = ["FAIL", "KINDS", "OK", "WARN", "Check", "Report", "check_backbone", "detect_kind"]

"""Readers: every data source becomes a list of :class:`~fedumm.data.records.Sample` records.

One module per format; :func:`read_samples` picks one from the data config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedumm.data.records import Sample

if TYPE_CHECKING:
    from fedumm.config import DataConfig


def read_samples(cfg: DataConfig, role: str = "train") -> list[Sample]:
    """The training (``role="train"``) or held-out (``"val"``) samples a config describes."""
    if cfg.dataset == "shapes":
        from fedumm.data.readers.shapes import shapes_samples, shapes_world

        return shapes_samples(shapes_world(cfg, role))
    raise ValueError(
        f"data.dataset={cfg.dataset!r} has no federated builder yet; load VQA v2 files with "
        "fedumm.data.vqa_v2.load_vqa_v2"
    )

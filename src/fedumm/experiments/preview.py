"""PNG previews of a ShapesWorld dataset: sample images with their questions / prompts.

A figure, so it sits with the other plots above the data layer (data imports nothing above
it); it reads the dataset as the samples every other part of the code sees.
"""

from __future__ import annotations

from pathlib import Path

from fedumm.data.readers.shapes import ShapesWorldData, shapes_samples
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.experiments.plots import image_grid
from fedumm.outputs import OutputFolder

COMMAND = "data-preview"  # the marker of a preview folder: .fedumm-data-preview


def write_preview(data: ShapesWorldData, out_dir: str | Path, **kwargs) -> Path:
    """``out_dir/preview_<split>.png`` (see :func:`preview_grid`), in a new or empty folder or
    one an earlier preview made (the output policy, :mod:`fedumm.outputs`)."""
    OutputFolder(out_dir, COMMAND).claim()
    return preview_grid(data, Path(out_dir) / f"preview_{data.split}.png", **kwargs)


def preview_grid(data: ShapesWorldData, out: str | Path, *, num_vqa: int = 12,
                 num_gen: int = 12, cols: int = 6) -> Path:
    """Write a grid: understanding samples (image, question -> answer, domain), then generation
    samples (prompt -> target image). Returns the PNG path."""
    samples = shapes_samples(data)
    und = [s for s in samples if s.task == UNDERSTANDING][:num_vqa]
    gen = [s for s in samples if s.task == GENERATION][:num_gen]
    items = [(s.load_image(), f"[{s.labels['family']}] {s.text} -> {s.answer} "
              f"({s.labels['domain']})") for s in und]
    items += [(s.load_image(), f"[{s.labels['tag']}] {s.text}") for s in gen]
    if not items:
        raise ValueError("the dataset has no samples to preview")
    return image_grid([img for img, _ in items], [t for _, t in items], out, cols=cols,
                      title=f"ShapesWorld — {data.split} split")

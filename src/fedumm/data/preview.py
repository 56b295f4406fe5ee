"""PNG previews of a dataset: sample images with their questions / prompts."""

from __future__ import annotations

from pathlib import Path

from fedumm.data.dataset import MultimodalDataset
from fedumm.experiments.plots import image_grid


def preview_grid(data: MultimodalDataset, out: str | Path, *, num_vqa: int = 12,
                 num_gen: int = 12, cols: int = 6) -> Path:
    """Write a grid: understanding samples (image, question -> answer), then generation samples
    (prompt -> target image). Returns the PNG path."""
    domains = data.sample_domains()
    items = [(data.image(r.image_id), f"[{r.family or r.question_type}] {r.question} -> "
              f"{r.multiple_choice_answer} ({domains[i]})")
             for i, r in enumerate(data.vqa[:num_vqa])]
    items += [(data.image(i), f"[{g.tag}] {g.prompt}") for g, i in
              zip(data.gen[:num_gen], data.gen_image[:num_gen], strict=True)]
    if not items:
        raise ValueError("the dataset has no samples to preview")
    return image_grid([img for img, _ in items], [t for _, t in items], out, cols=cols,
                      title=f"ShapesWorld — {data.split} split")

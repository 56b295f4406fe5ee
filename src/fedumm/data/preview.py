"""PNG previews of a dataset: sample images with their questions / prompts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from fedumm.data.dataset import MultimodalDataset  # noqa: E402


def preview_grid(data: MultimodalDataset, out: str | Path, *, num_vqa: int = 12,
                 num_gen: int = 12, cols: int = 6) -> Path:
    """Write a grid: understanding samples (image, question -> answer), then generation samples
    (prompt -> target image). Returns the PNG path."""
    items = [(data.image(r.image_id), f"[{r.family or r.question_type}] {r.question}\n"
              f"-> {r.multiple_choice_answer}  ({data.domains[data._row[r.image_id]]})")
             for r in data.vqa[:num_vqa]]
    items += [(data.image(i), f"[{g.tag}] {g.prompt}") for g, i in
              zip(data.gen[:num_gen], data.gen_image[:num_gen], strict=True)]
    if not items:
        raise ValueError("the dataset has no samples to preview")
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, text) in zip(axes.flat, items, strict=False):
        ax.imshow(img, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(text, 30)), fontsize=7)
    fig.suptitle(f"ShapesWorld — {data.split} split", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""Plots for the command line and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from fedumm.runtime.report import save_figure  # noqa: E402


def partition_heatmap(summary: dict, out: str | Path, title: str = "") -> Path:
    """Clients x labels heat map of sample counts from a partition summary; a large
    population's summary has no row per client: its histogram of client sizes instead."""
    if "clients" not in summary:
        hist = summary["client_sizes"]["histogram"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.stairs(hist["counts"], hist["edges"], fill=True)
        ax.set_xlabel("samples per client")
        ax.set_ylabel("clients")
        ax.set_title(f"{title}  {summary['num_clients']} clients".strip())
        return save_figure(fig, out)
    clients = summary["clients"]
    labels = sorted({lab for c in clients for lab in c["label_counts"]})
    mat = np.array([[c["label_counts"].get(lab, 0) for lab in labels] for c in clients])
    fig_w = min(4 + 0.28 * len(labels), 24)
    fig_h = min(2 + 0.25 * len(clients), 24)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    step = max(1, len(clients) // 32)
    ax.set_yticks(range(0, len(clients), step), [str(c["id"]) for c in clients[::step]],
                  fontsize=7)
    ax.set_xlabel("label")
    ax.set_ylabel("client")
    tv = summary["heterogeneity"].get("tv_mean", float("nan"))
    ax.set_title(f"{title}  samples per client and label (tv_mean={tv:.3f})".strip())
    fig.colorbar(im, ax=ax, label="samples")
    return save_figure(fig, out)


def image_grid(images, titles, out: str | Path, cols: int = 6, scale: float = 2.2,
               title: str = "") -> Path:
    """A PNG grid of images with wrapped titles (e.g. generated samples and their prompts)."""
    import textwrap

    n = len(images)
    if n == 0:
        raise ValueError("no images to draw")
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, min(cols, n), figsize=(min(cols, n) * scale, rows * scale * 1.2),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(text, 28)), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, out)

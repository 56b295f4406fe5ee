"""Pixel rendering of ShapesWorld scenes: shape masks, colours and visual domains.

Masks are computed on a 4x super-sampled grid and thresholded at half coverage, so shapes are
crisp (one colour per pixel, which keeps colour recovery exact) but geometrically accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
# GenEval's ten colours, as RGB on a mid-grey background where all of them stay visible.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 180),
    "pink": (255, 130, 200),
    "brown": (120, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
BACKGROUND = (128, 128, 128)
DOMAINS = ("clean", "textured", "noise", "shift")
SIZES = {"small": 0.30, "large": 0.44}  # radius as a fraction of a grid cell
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and where it sits (pixel centre, radius, grid cell)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.radius, self.cy - self.radius,
                self.cx + self.radius, self.cy + self.radius)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in coordinates normalised by its radius (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":  # apex up
        return (v >= -0.9) & (v <= 0.8) & (np.abs(u) <= (v + 0.9) / 1.7 * 0.95)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.32) & (b <= 0.95)) | ((b <= 0.32) & (a <= 0.95))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.5**2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _object_mask(obj: SceneObject, size: int) -> tuple[int, int, int, int, np.ndarray]:
    """Pixels an object covers (at least half covered), as a window and a boolean mask."""
    s = _SUPERSAMPLE
    coords = (np.arange(size * s, dtype=np.float32) + 0.5) / s  # sub-pixel centres
    x0, x1 = int(max(0, obj.cx - obj.radius - 1)), int(min(size, obj.cx + obj.radius + 2))
    y0, y1 = int(max(0, obj.cy - obj.radius - 1)), int(min(size, obj.cy + obj.radius + 2))
    u = (coords[x0 * s:x1 * s][None, :] - obj.cx) / obj.radius
    v = (coords[y0 * s:y1 * s][:, None] - obj.cy) / obj.radius
    fine = shape_mask(obj.shape, u, v).astype(np.float32)
    cover = fine.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return y0, y1, x0, x1, cover >= 0.5


def object_id_map(objects: list[SceneObject], size: int) -> np.ndarray:
    """(size, size) int map: index of the object drawn at each pixel, -1 for background."""
    ids = np.full((size, size), -1, dtype=np.int64)
    for k, obj in enumerate(objects):
        y0, y1, x0, x1, mask = _object_mask(obj, size)
        ids[y0:y1, x0:x1][mask] = k
    return ids


def _background(size: int, domain: str) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    if domain == "textured":  # diagonal stripes of two greys
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = ((xx + yy) // 3) % 2 == 0
        img[stripes] = (108, 108, 116)
        img[~stripes] = (146, 146, 138)
    return img


def render_scene(
    objects: list[SceneObject], size: int, domain: str = "clean",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render objects onto a domain's background; returns uint8 (size, size, 3)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    img = _background(size, domain)
    for obj in objects:
        y0, y1, x0, x1, mask = _object_mask(obj, size)
        img[y0:y1, x0:x1][mask] = COLORS[obj.color]
    if domain == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        img += rng.normal(0.0, 10.0, img.shape).astype(np.float32)
    elif domain == "shift":  # dimmer, warmer light
        img = img * np.array([1.0, 0.88, 0.78], dtype=np.float32) * 0.85 + 12.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)

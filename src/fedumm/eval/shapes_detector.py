"""A GenEval detector plugin for ShapesWorld images, by analysis-by-synthesis.

GenEval detects objects with Mask2Former and names colours with CLIP; on ShapesWorld images a
classical pipeline plays both roles:

1. background = mean of the pixels near the median colour; foreground = pixels far from it;
2. 8-connected components; tiny ones (noise) dropped; same-coloured pieces that together still
   fit one object (a ring broken in a generated image) merged; each re-thresholded half way
   between the background and its own colour (render.py's half-coverage rule, for blurred edges);
3. colour = nearest palette colour (:data:`fedumm.data.render.COLORS`) to the component's core,
   white-balanced by the background;
4. shape = best IoU against a bank of templates rendered with
   :func:`fedumm.data.render.shape_mask` for every shape, both ShapesWorld sizes and sub-pixel
   centre offsets; when nothing fits well (off-size generated objects) each shape is also fitted
   freely (centroid and area), at an IoU handicap;
5. score = fit quality x margin over the runner-up shape x plausibility of the size.

The box is the fitted object box ``(cx - r, cy - r, cx + r, cy + r)``, as
:attr:`fedumm.data.render.SceneObject.box`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from fedumm.data.render import BACKGROUND, COLORS, GRID, SHAPES, SIZES, shape_mask
from fedumm.eval.geneval import Detection

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_EIGHT = np.ones((3, 3), dtype=bool)


def _shape_moments(n: int = 801) -> dict[str, tuple[float, float, float]]:
    """Per shape, (area, centroid u, centroid v) in radius-normalised units."""
    t = (np.arange(n) + 0.5) / n * 2.4 - 1.2
    step = (2.4 / n) ** 2
    u, v = t[None, :], t[:, None]
    out = {}
    for shape in SHAPES:
        m = shape_mask(shape, u, v)
        ys, xs = np.nonzero(m)
        out[shape] = (m.sum() * step, float(t[xs].mean()), float(t[ys].mean()))
    return out


_MOMENTS = _shape_moments()


class ShapesDetector:
    """Detect ShapesWorld objects: shape, GenEval colour, box and confidence.

    Parameters
    ----------
    fg_threshold
        Euclidean RGB distance from the background colour above which a pixel is foreground
        (every palette colour is more than 100 away from the mid-grey background).
    min_area_frac
        Components smaller than ``max(3, min_area_frac * cell**2)`` pixels are dropped as noise
        (``cell`` = image side / 3); the smallest clean object covers about ``0.17 * cell**2``.
    accept
        When the best template IoU is below this, shapes are also fitted freely (any radius).
    free_penalty
        IoU handicap of a free fit against the two ShapesWorld sizes.
    """

    def __init__(
        self, fg_threshold: float = 48.0, min_area_frac: float = 0.03, accept: float = 0.9,
        free_penalty: float = 0.1,
    ) -> None:
        self.fg_threshold = float(fg_threshold)
        self.min_area_frac = float(min_area_frac)
        self.accept = float(accept)
        self.free_penalty = float(free_penalty)

    # ------------------------------------------------------------------------- public API
    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detections of one image (HxWx3 uint8; HxW, HxWx4 and floats in [0, 1] accepted)."""
        img = _as_rgb(image)
        h, w = img.shape[:2]
        cell = (h + w) / 2 / GRID
        bg = _background(img)
        dist = np.linalg.norm(img - bg, axis=2)
        fg = dist > self.fg_threshold
        if not fg.any():
            return []
        labels, _ = ndimage.label(fg, structure=_EIGHT)
        min_area = max(3.0, self.min_area_frac * cell * cell)
        comps = []
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[sl] == lab
            if mask.sum() < min_area:
                continue
            # the component's own colour from its core (blurred edges lean to the background)
            d = dist[sl][mask]
            core = np.median(img[sl][mask][d >= np.median(d)], axis=0)
            comps.append([sl[0].start, sl[1].start, mask, _nearest_color(core, bg), core])
        comps = _merge_pieces(comps, max_extent=0.95 * cell + 1.0)
        out = []
        for y0, x0, mask, color, core in comps:
            y0, x0, mask = _half_coverage(img, bg, fg, y0, x0, mask, core)
            if mask.sum() >= min_area:
                out.append(self._classify(img, y0, x0, mask, color, cell))
        return out

    def detect_batch(self, images: Iterable[np.ndarray]) -> list[list[Detection]]:
        """Detections of each image of a batch (a sequence or an NxHxWx3 array)."""
        return [self(img) for img in images]

    # ---------------------------------------------------------------------------- helpers
    def _classify(
        self, img: np.ndarray, y0: int, x0: int, mask: np.ndarray, color: str, cell: float
    ) -> Detection:
        """Name one component's shape: best IoU over the template bank, else a free fit."""
        h, w = img.shape[:2]
        bank = _bank(h, w)
        area = float(mask.sum())
        ys, xs = np.nonzero(mask)
        my, mx = y0 + ys.mean() + 0.5, x0 + xs.mean() + 0.5  # centroid, continuous coordinates
        half = bank.side // 2
        wy, wx = int(np.floor(my)) - half, int(np.floor(mx)) - half
        window = np.zeros((bank.side, bank.side), dtype=bool)
        ay, ax = max(y0, wy), max(x0, wx)
        by = min(y0 + mask.shape[0], wy + bank.side)
        bx = min(x0 + mask.shape[1], wx + bank.side)
        if by > ay and bx > ax:
            window[ay - wy:by - wy, ax - wx:bx - wx] = mask[ay - y0:by - y0, ax - x0:bx - x0]
        inter = bank.cols[np.flatnonzero(window)].sum(axis=0)  # no BLAS: small and threads-free
        iou = (inter / (bank.sums + area - inter)).reshape(len(SHAPES), -1)
        best = iou.argmax(axis=1)
        ious = iou[np.arange(len(SHAPES)), best]
        # tiny renders of two shapes can coincide (a 3 px square looks like a circle): the
        # likelihood of a tie is then the share of sub-pixel placements that produce the mask
        hits = (iou >= ious[:, None] - 1e-6).mean(axis=1)
        prm = bank.params[np.arange(len(SHAPES)), best]
        fits = [(wx + half + dx, wy + half + dy, r) for r, dy, dx in prm]
        if ious.max() < self.accept:  # off the size prior (e.g. generated): fit freely too
            for i, shape in enumerate(SHAPES):
                free_iou, fit = _free_fit(mask, y0, x0, my, mx, area, shape)
                if free_iou - self.free_penalty > ious[i]:
                    ious[i], fits[i] = free_iou - self.free_penalty, fit
        order = np.lexsort((-hits, -np.round(ious, 6)))
        first, second = int(order[0]), int(order[1])
        margin = float(ious[first] - ious[second])
        if margin < 1e-6:  # a tie: margin in likelihood instead
            margin = 0.04 * (hits[first] - hits[second]) / (hits[first] + hits[second])
        cx, cy, r = fits[first]
        score = _confidence(float(ious[first]), margin, r / cell)
        box = (float(cx - r), float(cy - r), float(cx + r), float(cy + r))
        return Detection(SHAPES[first], color, box, score)


class _Bank:
    """Template masks of every shape, both sizes and sub-pixel centre offsets, for one image size.

    ``cols`` is (side * side, n_shapes * n_templates), grouped by shape; ``params[i, k]`` =
    (radius, cy, cx) of template ``k`` of shape ``i``, the centre in window coordinates relative
    to ``side // 2``. Each shape's templates are placed so that its centroid sits near the window
    centre, within the centroid's rounding.
    """

    def __init__(self, h: int, w: int) -> None:
        cell = (h + w) / 2 / GRID
        radii = [f * cell for f in sorted(SIZES.values())]
        n_off = 16 if radii[-1] < 8 else (8 if radii[-1] < 16 else 4)
        offs = -0.5 + np.arange(n_off) * (2.0 / n_off)
        self.side = side = 2 * int(np.ceil(1.3 * radii[-1] + 2.0)) + 2
        s = _SUPER
        t = ((np.arange(side * s) + 0.5) / s - side // 2).astype(np.float32)
        groups, params = [], []
        for shape in SHAPES:
            _, cu, cv = _MOMENTS[shape]
            masks, prm = [], []
            for r in radii:
                oy, ox = offs - cv * r, offs - cu * r
                u = (t[None, None, None, :] - ox[None, :, None, None]) / r
                v = (t[None, None, :, None] - oy[:, None, None, None]) / r
                fine = shape_mask(shape, u, v)  # (dy, dx, y, x)
                cover = fine.reshape(n_off, n_off, side, s, side, s).mean(axis=(3, 5)) >= 0.5
                masks.append(cover.reshape(n_off * n_off, side * side))
                prm += [(r, dy, dx) for dy in oy for dx in ox]
            groups.append(np.concatenate(masks))
            params.append(prm)
        flat = np.concatenate(groups).astype(np.float32)
        self.cols = np.ascontiguousarray(flat.T)
        self.sums = flat.sum(axis=1)
        self.params = np.array(params)


_SUPER = 4  # render.py's super-sampling factor
_BANKS: dict[tuple[int, int], _Bank] = {}


def _bank(h: int, w: int) -> _Bank:
    if (h, w) not in _BANKS:
        _BANKS[(h, w)] = _Bank(h, w)
    return _BANKS[(h, w)]


def _free_fit(
    mask: np.ndarray, y0: int, x0: int, my: float, mx: float, area: float, shape: str
) -> tuple[float, tuple[float, float, float]]:
    """IoU of ``shape`` placed by the component's centroid and sized by its area."""
    a, cu, cv = _MOMENTS[shape]
    r = float(np.sqrt(area / a))
    cx, cy = mx - cu * r, my - cv * r
    pad = np.pad(mask, 1)
    s = _SUPER if max(mask.shape) < 24 else (2 if max(mask.shape) < 48 else 1)
    u = ((x0 - 1) + (np.arange(pad.shape[1] * s) + 0.5) / s - cx) / r
    v = ((y0 - 1) + (np.arange(pad.shape[0] * s) + 0.5) / s - cy) / r
    fine = shape_mask(shape, u[None, :], v[:, None])
    cover = fine.reshape(pad.shape[0], s, pad.shape[1], s).mean(axis=(1, 3)) >= 0.5
    inter = float((cover & pad).sum())
    return inter / max(float((cover | pad).sum()), 1.0), (cx, cy, r)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """The image as float32 HxWx3 in 0..255."""
    arr = np.asarray(image)
    img = arr[:, :, None] if arr.ndim == 2 else arr
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    img = np.broadcast_to(img[:, :, :3], (*img.shape[:2], 3)).astype(np.float32)
    scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and img.max(initial=0.0) <= 1.0 else 1.0
    return img * scale


def _background(img: np.ndarray) -> np.ndarray:
    """Background colour: the mean of the pixels near the median colour (evens out stripes)."""
    flat = img.reshape(-1, 3)
    med = np.median(flat, axis=0)
    near = flat[np.linalg.norm(flat - med, axis=1) < 64.0]
    return near.mean(axis=0) if len(near) else med


def _nearest_color(rgb: np.ndarray, bg: np.ndarray) -> str:
    """Nearest palette colour, after white-balancing so that ``bg`` maps to render's grey."""
    rgb = np.clip(rgb * (np.asarray(BACKGROUND) / np.maximum(bg, 1.0)), 0.0, 255.0)
    return _COLOR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _half_coverage(
    img: np.ndarray, bg: np.ndarray, fg: np.ndarray, y0: int, x0: int, mask: np.ndarray,
    core: np.ndarray,
) -> tuple[int, int, np.ndarray]:
    """Re-threshold a component at half way from the background to its colour.

    This mirrors render.py's half-coverage rule on blurred (generated) edges; on clean renders
    the mask is unchanged. Pixels of other components are never taken.
    """
    h, w = fg.shape
    ya, xa = max(y0 - 1, 0), max(x0 - 1, 0)
    yb, xb = min(y0 + mask.shape[0] + 1, h), min(x0 + mask.shape[1] + 1, w)
    own = np.zeros((yb - ya, xb - xa), dtype=bool)
    own[y0 - ya:y0 - ya + mask.shape[0], x0 - xa:x0 - xa + mask.shape[1]] = mask
    axis = core - bg
    t = (img[ya:yb, xa:xb] - bg) @ axis / max(float(axis @ axis), 1.0)
    near = ndimage.binary_dilation(own, structure=_EIGHT)
    new = (t >= 0.5) & near & ~(fg[ya:yb, xa:xb] & ~own)
    if not new.any():
        return y0, x0, mask
    rows, cols = np.nonzero(new.any(axis=1))[0], np.nonzero(new.any(axis=0))[0]
    new = new[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return ya + int(rows[0]), xa + int(cols[0]), new


def _merge_pieces(comps: list[list], max_extent: float) -> list[list]:
    """Greedily merge same-coloured components whose union box still fits one object."""
    i = 0
    while i < len(comps):
        ya, xa, ma, ca, core = comps[i]
        for j in range(i + 1, len(comps)):
            yb, xb, mb, cb, _ = comps[j]
            y0, x0 = min(ya, yb), min(xa, xb)
            y1 = max(ya + ma.shape[0], yb + mb.shape[0])
            x1 = max(xa + ma.shape[1], xb + mb.shape[1])
            if ca == cb and max(y1 - y0, x1 - x0) <= max_extent:
                m = np.zeros((y1 - y0, x1 - x0), dtype=bool)
                m[ya - y0:ya - y0 + ma.shape[0], xa - x0:xa - x0 + ma.shape[1]] = ma
                m[yb - y0:yb - y0 + mb.shape[0], xb - x0:xb - x0 + mb.shape[1]] |= mb
                comps[i] = [y0, x0, m, ca, core]
                del comps[j]
                break
        else:
            i += 1
    return comps


def _confidence(iou: float, margin: float, rel_radius: float) -> float:
    """Confidence in [0, 1] from fit IoU, margin over the runner-up and radius / cell.

    A clean render (IoU > 0.9, runner-up more than 0.02 behind, a ShapesWorld size) scores 1.
    """
    fit = np.clip((iou - 0.4) / 0.4, 0.0, 1.0)
    sep = np.clip(0.5 + margin / 0.04, 0.0, 1.0)
    lo, hi = min(SIZES.values()) * 0.6, max(SIZES.values()) * 1.25
    size = np.clip(min(rel_radius / lo, (0.75 - rel_radius) / (0.75 - hi), 1.0), 0.0, 1.0)
    return float(fit * sep * size)

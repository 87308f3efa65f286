"""Find coloured shapes in an image: colour segmentation plus simple shape descriptors.

Each pixel is assigned to the nearest of the four palette colours or the background grey (from the
image border); each colour's connected components (scipy) of at least ``min_area`` pixels are
objects, classified by their fill ratio (area over bounding-box area: a square fills ~1, a
circle ~0.79, a triangle ~0.5) and the width of their top rows against their bottom rows.

>>> from daami2i.shapes import make_scene
>>> scene = make_scene(1)
>>> sorted((d.color, d.shape) for d in find_objects(scene.image)) == sorted((o.color, o.shape) for o in scene.objects)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .scenes import COLORS


@dataclass
class Detection:
    """A connected region of one palette colour."""

    color: str
    shape: str
    mask: np.ndarray  # (H, W) bool
    fill: float  # area / bounding-box area

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _background(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(border, axis=0)


SQUARE_FILL, CIRCLE_FILL, TAPER = 0.9, 0.66, 0.55  # the cut-offs of classify_shape


def _descriptors(mask: np.ndarray) -> tuple[float, float, float]:
    """Fill ratio (area over bounding-box area), mean width of the top and of the bottom third of
    the rows (their ratio is the taper)."""
    ys, xs = np.nonzero(mask)
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = float(mask.sum()) / float(h * w)
    rows = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].sum(1)
    third = max(1, h // 3)
    top, bottom = rows[:third].mean(), rows[-third:].mean()
    return fill, float(top), float(bottom)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    fill, top, bottom = _descriptors(mask)
    if fill >= SQUARE_FILL:
        return "square", fill
    if fill < CIRCLE_FILL or top < TAPER * bottom:
        return "triangle", fill
    return "circle", fill


def shape_margin(mask: np.ndarray) -> float:
    """How far ``mask``'s descriptors lie from the cut-offs that would change its
    :func:`classify_shape` class: the smallest change of fill ratio or taper that does. A pixel more
    or less moves the fill ratio of a 15 x 15 box by 0.004, so a small margin marks a shape that an
    image differing by rounding (another CPU) may classify otherwise.

    >>> square = np.ones((10, 10), bool)
    >>> round(shape_margin(square), 3)  # fill 1.0: 0.1 above the square cut-off
    0.1
    """
    fill, top, bottom = _descriptors(mask)
    taper = top / bottom
    if fill >= SQUARE_FILL:
        return fill - SQUARE_FILL
    if fill < CIRCLE_FILL or taper < TAPER:  # a circle needs both cut-offs crossed, a square the fill one
        return min(SQUARE_FILL - fill, max(CIRCLE_FILL - fill, TAPER - taper))
    return min(fill - CIRCLE_FILL, SQUARE_FILL - fill, taper - TAPER)


def find_objects(image: Any, min_area: int = 20) -> list[Detection]:
    """Every palette-coloured object of ``image`` (PIL or (H, W, 3) uint8 array)."""
    from scipy import ndimage

    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    names = list(COLORS)
    refs = np.array([COLORS[n] for n in names] + [_background(rgb)], dtype=np.float32)
    dist = ((rgb[:, :, None, :] - refs[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)  # index into names, len(names) = background
    out = []
    for ci, name in enumerate(names):
        comps, n = ndimage.label(label == ci)
        for k in range(1, n + 1):
            m = comps == k
            if m.sum() >= min_area:
                shape, fill = classify_shape(m)
                out.append(Detection(name, shape, m, fill))
    return out


def mask_of_color(image: Any, color: str, min_area: int = 20) -> np.ndarray | None:
    """The largest object of ``color`` in the image, or None."""
    found = [d for d in find_objects(image, min_area) if d.color == color]
    return max(found, key=lambda d: d.area).mask if found else None


def check(image: Any, objects: list[tuple[str, str]]) -> list[bool]:
    """For each requested (colour, shape): is an object of that colour with that shape in the image?"""
    found = find_objects(image)
    return [any(d.color == c and d.shape == s for d in found) for c, s in objects]

"""Regions of the latent grid as weight maps: the single input of every self-attention query.

A pixel list, a box, a polygon, several polygons and a guide heat map are all turned into one
non-negative weight map ``g`` of the grid's (height, width); the query is then ``S g / sum(g)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import QueryError

Size = tuple[int, int]  # (height, width)


def _grid_text(grid: Size) -> str:
    return f"{grid[0]}x{grid[1]} (height x width) grid"


def _is_integer(v: Any) -> bool:
    """A Python, NumPy or 0-d torch integer (not a bool)."""
    if isinstance(v, torch.Tensor):
        return v.ndim == 0 and not v.dtype.is_floating_point and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_fraction(value: Any, name: str = "threshold") -> float:
    """``value`` as a float in [0, 1), the range of a cut on a min-max normalised map, or a QueryError.

    >>> check_fraction(0.4)
    0.4
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not 0.0 <= float(value) < 1.0:  # (NaN fails the comparison)
        raise QueryError(
            f"{name} must be a number in [0, 1) (a cut on the min-max normalised map: 0.4 keeps values above 40 % "
            f"of the peak), got {value!r}"
        )
    return float(value)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive int (no bools, no floats such as 2.5), or a QueryError."""
    if not _is_integer(value) or value < 1:
        raise QueryError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def pixel_weights(pix_ids: Iterable[int] | int, grid: Size) -> torch.Tensor:
    """Weights of a list of row-major pixel ids: each id counts once per occurrence.

    Ids must be integers (Python or NumPy ints, or an integer tensor); ``1.5``, ``"3"`` and ``True``
    are errors, not silently converted.

    >>> pixel_weights([0, 5], (2, 3))
    tensor([[1., 0., 0.],
            [0., 0., 1.]])
    """
    n = grid[0] * grid[1]
    if _is_integer(pix_ids):
        pix_ids = [int(pix_ids)]  # type: ignore[arg-type]
    if isinstance(pix_ids, torch.Tensor):
        if pix_ids.dtype.is_floating_point or pix_ids.dtype.is_complex or pix_ids.dtype == torch.bool:
            raise QueryError(
                f"pixel ids must be an integer tensor (row-major latent indices), got dtype {pix_ids.dtype}"
            )
        pix_ids = pix_ids.flatten().tolist()
    elif isinstance(pix_ids, np.ndarray):
        if not np.issubdtype(pix_ids.dtype, np.integer):
            raise QueryError(
                f"pixel ids must be an integer array (row-major latent indices), got dtype {pix_ids.dtype}"
            )
        pix_ids = pix_ids.ravel().tolist()
    if isinstance(pix_ids, (str, bytes)) or not isinstance(pix_ids, Iterable):
        raise QueryError(f"pixel ids must be a list of integers (row-major latent indices), got {pix_ids!r}")
    ids = list(pix_ids)
    wrong = [i for i in ids if not _is_integer(i)]
    if wrong:
        raise QueryError(
            f"pixel ids must be integers (row-major latent indices, id = row * {grid[1]} + column), got "
            f"{wrong[:5]!r}{' ...' if len(wrong) > 5 else ''} of type {type(wrong[0]).__name__}"
        )
    ids = [int(i) for i in ids]
    if not ids:
        raise QueryError(
            f"the pixel list is empty: pass at least one row-major id in [0, {n - 1}] of the {_grid_text(grid)}"
        )
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise QueryError(
            f"pixel ids must lie in [0, {n - 1}] on the {_grid_text(grid)} (id = row * {grid[1]} + column); "
            f"got out-of-range ids {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    counts = torch.bincount(torch.tensor(ids), minlength=n).to(torch.float32)
    return counts.view(grid)


def box_cells(x1: int, y1: int, x2: int, y2: int, grid: Size, half_open: bool = False) -> tuple[int, int, int, int]:
    """The cells a latent box covers, as half-open edges ``(x1, y1, x_stop, y_stop)``: corners included
    (daam-i2i's meaning; a corner one past the last column or row is clipped to it), or with
    ``half_open=True`` Python-slice style (``x1 <= x < x2``). A QueryError says the convention.

    >>> box_cells(0, 10, 25, 64, (64, 64)), box_cells(0, 10, 25, 64, (64, 64), half_open=True)
    ((0, 10, 26, 64), (0, 10, 25, 64))
    """
    h, w = grid
    for name, v in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
        if not _is_integer(v):
            raise QueryError(f"box corner {name} must be an integer latent coordinate, got {v!r}")
    x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
    box = f"box (x1={x1}, y1={y1}, x2={x2}, y2={y2})"
    if half_open:
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise QueryError(
                f"{box} is empty or outside the {_grid_text(grid)}: expected 0 <= x1 < x2 <= {w} and "
                f"0 <= y1 < y2 <= {h} (half_open=True: x2 and y2 are exclusive, like Python slices; "
                "x is the column, y the row)"
            )
        return x1, y1, x2, y2
    if not (0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and x1 < w and y1 < h):
        raise QueryError(
            f"{box} is empty or outside the {_grid_text(grid)}: expected 0 <= x1 <= x2 <= {w - 1} and "
            f"0 <= y1 <= y2 <= {h - 1} (x is the column, y the row; both corners are inclusive, as in "
            f"daam-i2i; x2 = {w} or y2 = {h} is clipped to the last column or row; pass half_open=True "
            "for Python-slice boxes)"
        )
    return x1, y1, min(x2 + 1, w), min(y2 + 1, h)


def box_weights(x1: int, y1: int, x2: int, y2: int, grid: Size, half_open: bool = False) -> torch.Tensor:
    """Weights of the latent box columns ``x1..x2``, rows ``y1..y2``, both corners included (daam-i2i's
    meaning; see :func:`box_cells`). With ``half_open=True``: columns ``x1 <= x < x2``, rows ``y1 <= y < y2``.

    >>> box_weights(1, 0, 2, 0, (2, 3))
    tensor([[0., 1., 1.],
            [0., 0., 0.]])
    >>> box_weights(1, 0, 3, 1, (2, 3), half_open=True)
    tensor([[0., 1., 1.],
            [0., 0., 0.]])
    """
    a, b, x_stop, y_stop = box_cells(x1, y1, x2, y2, grid, half_open)
    g = torch.zeros(grid)
    g[b:y_stop, a:x_stop] = 1.0
    return g


def _as_polygon(contour: Any, image_size: Size, index: int) -> np.ndarray:
    try:
        pts = np.asarray(contour, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"contour {index} must be a list of [x, y] points, got {contour!r}") from exc
    if pts.ndim == 1 and len(pts) % 2 == 0 and len(pts) > 0:  # daam-i2i's flat [x1, y1, x2, y2, ...]
        pts = pts.reshape(-1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise QueryError(
            f"contour {index} must be a list of [x, y] points (shape (n, 2)) or a flat [x1, y1, x2, y2, ...] list, "
            f"got an array of shape {pts.shape}"
        )
    if len(np.unique(pts, axis=0)) < 3:
        raise QueryError(
            f"contour {index} needs at least 3 distinct [x, y] points to enclose an area, got {pts.tolist()}"
        )
    if not np.isfinite(pts).all():
        raise QueryError(f"contour {index} holds non-finite coordinates: {pts.tolist()}")
    h, w = image_size
    out = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
    if out.any():
        raise QueryError(
            f"contour {index} has points outside the {h}x{w} (height x width) image: {pts[out].tolist()[:5]}; "
            f"points are [x, y] image-pixel coordinates with 0 <= x <= {w} and 0 <= y <= {h}"
        )
    return pts


def _check_image_size(image_size: Any) -> Size:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"image size must be (height, width) in pixels, got {image_size!r}") from exc
    if h <= 0 or w <= 0:
        raise QueryError(f"image size must be positive (height, width), got {image_size!r}")
    return h, w


def polygon_weights(contours: Sequence[Any], image_size: Size, grid: Size) -> torch.Tensor:
    """Fraction of each latent cell covered by the union of the polygons.

    Polygons are lists of ``[x, y]`` points in image-pixel coordinates. An image pixel belongs to
    the region when its centre lies inside a polygon (matplotlib's point-in-path test); a latent
    cell's weight is the mean over the image pixels it spans (area pooling).

    >>> polygon_weights([[[0, 0], [4, 0], [4, 8], [0, 8]]], (8, 8), (2, 2))
    tensor([[1., 0.],
            [1., 0.]])
    """
    try:
        from matplotlib.path import Path as MplPath
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QueryError(
            "contour queries need matplotlib's point-in-polygon test: pip install 'daami2i[plot]'"
        ) from exc

    h, w = _check_image_size(image_size)
    if isinstance(contours, (str, bytes)) or not isinstance(contours, Sequence) or len(contours) == 0:
        raise QueryError(f"expected a non-empty list of contours (each a list of [x, y] points), got {contours!r}")
    inside = np.zeros((h, w), dtype=bool)
    for i, contour in enumerate(contours):
        pts = _as_polygon(contour, (h, w), i)
        inside |= _inside_centres(MplPath(pts), pts, (h, w))
    mask = torch.from_numpy(inside.astype(np.float32))
    cover = torch.nn.functional.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]
    if float(cover.sum()) == 0.0:
        raise QueryError(
            "the contour(s) enclose no image pixel centre: the region is empty; "
            "check that points are [x, y] in image pixels of an image of (height, width) "
            f"{(h, w)}"
        )
    return cover


def _inside_centres(path: Any, pts: np.ndarray, image_size: Size, block: int = 8) -> np.ndarray:
    """(H, W) bool: the image pixels whose centre ``path.contains_points`` puts inside the polygon.

    Pixels are tested in ``block`` x ``block`` blocks of the polygon's bounding box: inside-ness
    only changes across an edge, so a block that no edge enters is decided by one of its centres.
    Edges are sampled every half pixel; a block holding a sample, or next to one, is tested pixel
    by pixel (a chord shorter than half a pixel cannot enter a block without a sample nearby).

    >>> from matplotlib.path import Path as P
    >>> tri = np.array([[0.0, 0.0], [16.0, 0.0], [0.0, 16.0]])
    >>> fast = _inside_centres(P(tri), tri, (20, 20), block=4)
    >>> ys, xs = np.mgrid[0:20, 0:20]
    >>> slow = P(tri).contains_points(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)).reshape(20, 20)
    >>> bool((fast == slow).all()), int(fast.sum())
    (True, 136)
    """
    h, w = image_size
    out = np.zeros((h, w), dtype=bool)
    # only the pixel centres inside the polygon's bounding box can be inside it
    x0, y0 = (int(v) for v in np.floor(pts.min(0)))
    x1, y1 = (min(int(v) + 1, n) for v, n in zip(np.ceil(pts.max(0)), (w, h), strict=True))
    if x1 <= x0 or y1 <= y0:
        return out
    nby, nbx = -(-(y1 - y0) // block), -(-(x1 - x0) // block)
    # blocks that an edge enters: sample every edge every half pixel
    a, b = pts, np.roll(pts, -1, axis=0)
    n = np.maximum(2, np.ceil(np.hypot(*(b - a).T) / 0.5).astype(int) + 1)
    t = np.concatenate([np.linspace(0.0, 1.0, k) for k in n])
    seg = np.repeat(np.arange(len(pts)), n)
    samples = a[seg] + t[:, None] * (b - a)[seg]
    bx = np.clip(np.floor((samples[:, 0] - x0) / block).astype(int), 0, nbx - 1)
    by = np.clip(np.floor((samples[:, 1] - y0) / block).astype(int), 0, nby - 1)
    edge = np.zeros((nby + 2, nbx + 2), dtype=bool)
    edge[by + 1, bx + 1] = True
    near = np.zeros_like(edge)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(edge, dy, axis=0), dx, axis=1)
    near = near[1:-1, 1:-1]
    # one representative centre per block (its top-left pixel inside the box) decides the others
    rep_y = y0 + np.arange(nby) * block
    rep_x = x0 + np.arange(nbx) * block
    ry, rx = np.meshgrid(rep_y, rep_x, indexing="ij")
    rep = path.contains_points(np.stack([rx.ravel() + 0.5, ry.ravel() + 0.5], axis=1)).reshape(nby, nbx)
    blocks = np.repeat(np.repeat(rep & ~near, block, axis=0), block, axis=1)
    out[y0:y1, x0:x1] = blocks[: y1 - y0, : x1 - x0]
    # pixel by pixel where an edge passes
    mask = np.repeat(np.repeat(near, block, axis=0), block, axis=1)[: y1 - y0, : x1 - x0]
    ys, xs = np.nonzero(mask)
    if len(ys):
        hit = path.contains_points(np.stack([xs + x0 + 0.5, ys + y0 + 0.5], axis=1))
        out[ys[hit] + y0, xs[hit] + x0] = True
    return out


def guide_weights(guide: Any, grid: Size) -> torch.Tensor:
    """Check a guide heat map (tensor, array or heat-map object) and return it as float32 weights."""
    value = getattr(guide, "value", guide)
    try:
        g = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise QueryError(f"a guide must be a heat map or a {grid} tensor, got {type(guide).__name__}") from exc
    g = g.detach().cpu()
    if tuple(g.shape) != tuple(grid):
        hint = ""
        if g.ndim == 2 and g.shape[0] > grid[0]:
            hint = " (an expanded image-size map? pass the heat map object or its .value instead)"
        raise QueryError(
            f"guide must have the latent grid's shape {tuple(grid)} (height, width), got {tuple(g.shape)}{hint}"
        )
    if not torch.isfinite(g).all():
        raise QueryError("guide holds NaN or infinite values")
    if (g < 0).any():
        raise QueryError(
            f"guide weights must be non-negative, got a minimum of {float(g.min()):.4g}; "
            "shift or clamp it first (e.g. guide.clamp(min=0))"
        )
    if float(g.sum()) <= 0.0 or math.isclose(float(g.sum()), 0.0):
        raise QueryError("guide weights sum to zero: nothing to weight the self-attention columns with")
    return g

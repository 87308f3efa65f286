"""From heat maps to masks, instances (polygons with holes), boxes and COCO annotations.

Thresholds act on the min-max normalised map: DAAM's fixed ``tau`` (0.4) or Otsu's threshold after
a small Gaussian blur. Connected components become instances; fragments smaller than a fraction
of the largest are dropped; instances whose boxes overlap are merged (greedy non-maximum
suppression, the merged instance's mask is the union). Contours come from OpenCV
(``cv2.findContours``), run-length encoding, areas and IoUs from pycocotools: install them with
``pip install 'daami2i[datasets]'``.

>>> import torch
>>> heat = torch.zeros(32, 32); heat[4:12, 4:14] = 1.0; heat[20:28, 18:30] = 0.8
>>> found = instances(binarize(heat))
>>> [(i.bbox, i.area) for i in found]
[([18.0, 20.0, 12.0, 8.0], 96), ([4.0, 4.0, 10.0, 8.0], 80)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import QueryError

Method = Literal["tau", "otsu"]


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QueryError("masks need OpenCV: pip install 'daami2i[datasets]' (opencv-python-headless)") from exc
    return cv2


def _coco_mask() -> Any:
    try:
        from pycocotools import mask as coco_mask
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QueryError("COCO encoding needs pycocotools: pip install 'daami2i[datasets]'") from exc
    return coco_mask


def normalised(heat: Any) -> np.ndarray:
    """A heat map (HeatMap, tensor or array; (h, w)) min-max normalised to [0, 1] as float32.

    A flat map has no peak and gives zeros.
    """
    value = getattr(heat, "value", heat)
    arr = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
    if arr.ndim != 2:
        raise QueryError(f"expected a 2-D heat map (height, width), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise QueryError("the heat map holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(arr, dtype=np.float32)


def binarize(heat: Any, method: Method = "tau", tau: float = 0.4, blur_sigma: float = 1.0) -> np.ndarray:
    """Binary mask (h, w) of a heat map: normalised value > ``tau``, or Otsu after a Gaussian blur.

    ``blur_sigma`` (pixels) applies to Otsu only; 0 disables the blur.

    >>> binarize(np.array([[0.0, 0.3], [0.5, 1.0]])).tolist()
    [[False, False], [True, True]]
    """
    m = normalised(heat)
    if method == "tau":
        if not 0.0 <= float(tau) < 1.0:
            raise QueryError(f"tau must be in [0, 1) (it applies to the min-max normalised map), got {tau!r}")
        return m > float(tau)
    if method == "otsu":
        if float(blur_sigma) < 0:
            raise QueryError(f"blur_sigma must be >= 0 pixels, got {blur_sigma!r}")
        cv2 = _cv2()
        img = np.round(m * 255).astype(np.uint8)
        if blur_sigma > 0:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(blur_sigma))
        if img.max() == img.min():
            return np.zeros(m.shape, dtype=bool)
        _, out = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return out > 0
    raise QueryError(f"method must be 'tau' or 'otsu', got {method!r}")


Kind = Literal["auto", "polygon", "rle"]


@dataclass
class Instance:
    """One object: its mask, outer boundaries and holes, COCO box and area.

    Boundaries are closed polygons of ``[x, y]`` pixel *corners* (the lines between pixels, as COCO
    and pycocotools read polygons): a single pixel at column 3, row 5 is the square
    (3, 5) - (4, 5) - (4, 6) - (3, 6), so a polygon drawn back by pycocotools covers exactly the mask.
    """

    mask: np.ndarray  # (H, W) bool
    polygons: list[np.ndarray] = field(default_factory=list)  # outer boundaries, each (n, 2) [x, y]
    holes: list[np.ndarray] = field(default_factory=list)  # inner boundaries, each (n, 2) [x, y]

    @property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(self.mask.sum())

    @property
    def bbox(self) -> list[float]:
        """COCO box [x, y, width, height] in pixels (pixel edges, so a single pixel is 1 x 1)."""
        ys, xs = np.nonzero(self.mask)
        return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]

    def rle(self) -> dict[str, Any]:
        """COCO run-length encoding of the mask (``counts`` as a str, ready for JSON)."""
        rle = _coco_mask().encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}

    def segmentation(self, kind: Kind = "auto") -> Any:
        """COCO ``segmentation``: polygons (flat [x0, y0, x1, y1, ...] lists) or RLE.

        Polygons follow pixel boundaries, and they are only written when pycocotools draws them back
        to exactly the mask; otherwise this falls back to RLE. ``auto`` writes polygons for
        instances without holes and RLE for those with holes; ``polygon`` also writes instances with
        holes as polygons, each hole joined to its outer boundary by a zero-width vertical cut (read
        by pycocotools exactly; some other tools may draw the cut as a hairline); ``rle`` always
        writes RLE.
        """
        if kind not in ("auto", "polygon", "rle"):
            raise QueryError(f"segmentation kind must be 'auto', 'polygon' or 'rle', got {kind!r}")
        if kind == "rle" or (kind == "auto" and self.holes):
            return self.rle()
        rings = _bridged(self.polygons, self.holes) if self.holes else self.polygons
        polys = [[float(v) for v in p.reshape(-1)] for p in rings]
        if not polys or not np.array_equal(self._drawn(polys), self.mask):
            return self.rle()
        return polys

    def annotation(self, kind: Kind = "auto") -> dict[str, Any]:
        """The COCO annotation fields of this instance (no ids): bbox, area, segmentation, iscrowd.

        ``area`` is pycocotools' area of the segmentation written (equal to the mask's pixel count,
        since what is written draws back to the mask).
        """
        seg = self.segmentation(kind)
        return {"bbox": self.bbox, "area": segmentation_area(seg, *self.mask.shape), "segmentation": seg, "iscrowd": 0}

    def polygon_iou(self, polys: list[list[float]]) -> float:
        """IoU of the polygons, rasterised by pycocotools, with the mask."""
        if not polys:
            return 0.0
        drawn = self._drawn(polys)
        union = (drawn | self.mask).sum()
        return float((drawn & self.mask).sum() / union) if union else 0.0

    def _drawn(self, polys: list[list[float]]) -> np.ndarray:
        cm = _coco_mask()
        h, w = self.mask.shape
        return cm.decode(cm.merge(cm.frPyObjects(polys, h, w))).astype(bool)


def segmentation_area(segmentation: Any, height: int, width: int) -> int:
    """pycocotools' area (pixels) of a COCO ``segmentation`` (polygons or RLE) on a height x width image."""
    cm = _coco_mask()
    if isinstance(segmentation, dict):
        counts, size = segmentation["counts"], list(segmentation["size"])
        if isinstance(counts, list):  # uncompressed RLE
            rle = cm.frPyObjects({"size": size, "counts": counts}, *size)
        else:
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        rle = cm.merge(cm.frPyObjects(segmentation, height, width))
    return int(cm.area(rle))


def _contours(mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer boundaries and holes of a binary mask, traced along pixel boundaries (OpenCV).

    OpenCV traces the centres of boundary pixels. On the mask scaled up 2 x 2 (nearest), a boundary
    pixel on the low side of a block (top, left) has an even index and one on the high side an odd
    one, so ``(index + 1) // 2`` is the block's edge on that side: the traced centres become the
    original pixels' corners. Repeated and collinear points are dropped.
    """
    cv2 = _cv2()
    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    found, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for c, h in zip(found, hierarchy[0] if hierarchy is not None else [], strict=False):
        pts = (c.reshape(-1, 2) + 1) // 2
        pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]  # repeats
        if len(pts) > 2:  # collinear middle points
            d_in, d_out = pts - np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0) - pts
            pts = pts[d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] != 0]
        (holes if h[3] >= 0 else outer).append(pts.astype(np.float64))
    return outer, holes


def _bridged(outer: list[np.ndarray], holes: list[np.ndarray]) -> list[np.ndarray]:
    """Outer boundaries with every hole spliced in through a zero-width vertical cut.

    Each hole (topmost first) is joined from its top-left corner straight up to the nearest
    horizontal edge above it (the boundary of the ring that encloses it, or of a hole already
    spliced into that ring). pycocotools fills polygons by the parity
    of crossings per pixel column; a vertical cut crosses no column, so the spliced ring draws
    exactly the outer region minus the hole. A hole with no edge above it is left out (and the
    caller's exactness check then falls back to RLE).
    """
    rings = [p.copy() for p in outer]
    for hole in sorted(holes, key=lambda q: (q[:, 1].min(), q[:, 0].min())):
        top = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])  # smallest y, then smallest x
        x0, y0 = hole[top]
        best: tuple[float, int, int] | None = None  # (distance, ring, edge start)
        for r, ring in enumerate(rings):
            a, b = ring, np.roll(ring, -1, axis=0)
            horizontal = (a[:, 1] == b[:, 1]) & (a[:, 1] < y0)
            spans = (np.minimum(a[:, 0], b[:, 0]) <= x0) & (x0 <= np.maximum(a[:, 0], b[:, 0]))
            for e in np.nonzero(horizontal & spans)[0]:
                dist = float(y0 - a[e, 1])
                if best is None or dist < best[0]:
                    best = (dist, r, int(e))
        if best is None:
            continue
        _, r, edge = best
        ring = rings[r]
        hit = np.array([[x0, ring[edge, 1]]])
        loop = np.roll(hole, -top, axis=0)
        loop = np.concatenate([loop, loop[:1]])  # around the hole, back to its corner
        rings[r] = np.concatenate([ring[: edge + 1], hit, loop, hit, ring[edge + 1 :]])
    return rings


def _box_iou(a: list[float], b: list[float]) -> float:
    return float(_coco_mask().iou([a], [b], [0])[0, 0])


def instances(mask: np.ndarray, min_fragment: float = 0.05, merge_iou: float | None = 0.3) -> list[Instance]:
    """Instances of a binary mask, largest first.

    Connected components (8-connected) smaller than ``min_fragment`` times the largest are dropped;
    then, greedily from the largest, any instance whose box overlaps a kept one's with IoU above
    ``merge_iou`` is merged into it (union of masks; ``None`` disables merging).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise QueryError(f"expected a 2-D mask (height, width), got shape {mask.shape}")
    if not 0.0 <= float(min_fragment) <= 1.0:
        raise QueryError(f"min_fragment is a fraction of the largest component's area in [0, 1], got {min_fragment!r}")
    cv2 = _cv2()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= min_fragment * areas.max()]
    parts = [labels == k for k in keep]
    if merge_iou is not None:
        merged: list[np.ndarray] = []
        for m in parts:
            box = Instance(m).bbox
            for j, kept in enumerate(merged):
                if _box_iou(box, Instance(kept).bbox) > merge_iou:
                    merged[j] = kept | m
                    break
            else:
                merged.append(m)
        parts = merged
    out = []
    for m in parts:
        outer, holes = _contours(m)
        out.append(Instance(m, outer, holes))
    return out


def label_map(maps: torch.Tensor | np.ndarray, background: float = 0.4) -> np.ndarray:
    """Multi-word label map: ``maps`` (words, h, w), each min-max normalised; 0 where every word's
    normalised map is at most ``background``, else 1 + the index of the strongest word.

    >>> label_map(np.array([[[0.0, 1.0], [0.2, 0.9]], [[0.0, 0.5], [1.0, 0.1]]])).tolist()
    [[0, 1], [2, 1]]
    """
    arr = maps.detach().cpu().float().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise QueryError(f"expected word maps of shape (words, height, width), got {tuple(arr.shape)}")
    norm = np.stack([normalised(a) for a in arr])
    labels = norm.argmax(0) + 1
    labels[norm.max(0) <= background] = 0
    return labels

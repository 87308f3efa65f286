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


@dataclass
class Instance:
    """One object: its mask, outer contours and holes ([x, y] pixel points), COCO box and area."""

    mask: np.ndarray  # (H, W) bool
    polygons: list[np.ndarray] = field(default_factory=list)  # outer boundaries, each (n, 2) [x, y]
    holes: list[np.ndarray] = field(default_factory=list)  # inner boundaries, each (n, 2) [x, y]

    @property
    def area(self) -> int:
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

    def segmentation(self, kind: Literal["auto", "polygon", "rle"] = "auto") -> Any:
        """COCO ``segmentation``: polygons (flat [x0, y0, x1, y1, ...] lists) or RLE.

        ``auto`` writes polygons unless the instance has holes (COCO polygons cannot hold them) or
        its polygons, drawn back by pycocotools, cover the mask with IoU below 0.8 (small or thin
        instances: a polygon through boundary pixels' centres loses half a pixel all around).
        """
        if kind not in ("auto", "polygon", "rle"):
            raise QueryError(f"segmentation kind must be 'auto', 'polygon' or 'rle', got {kind!r}")
        polys = [[float(v) for v in p.reshape(-1)] for p in self.polygons]
        if kind == "rle" or (kind == "auto" and (self.holes or self.polygon_iou(polys) < 0.8)):
            return self.rle()
        return polys

    def annotation(self, kind: Literal["auto", "polygon", "rle"] = "auto") -> dict[str, Any]:
        """The COCO annotation fields of this instance (no ids): bbox, area, segmentation, iscrowd."""
        return {"bbox": self.bbox, "area": self.area, "segmentation": self.segmentation(kind), "iscrowd": 0}

    def polygon_iou(self, polys: list[list[float]]) -> float:
        """IoU of the polygons, rasterised by pycocotools, with the mask."""
        if not polys:
            return 0.0
        cm = _coco_mask()
        h, w = self.mask.shape
        drawn = cm.decode(cm.merge(cm.frPyObjects(polys, h, w))).astype(bool)
        union = (drawn | self.mask).sum()
        return float((drawn & self.mask).sum() / union) if union else 0.0


def _contours(mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer boundaries and holes of a binary mask (OpenCV, two-level hierarchy)."""
    cv2 = _cv2()
    found, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for c, h in zip(found, hierarchy[0] if hierarchy is not None else [], strict=False):
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:  # a one- or two-pixel-wide sliver: its pixels' box, so COCO can draw it
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0) + 1
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        else:  # OpenCV gives boundary pixels' indices; their centres are at +0.5 in image coordinates
            pts = pts + 0.5
        (holes if h[3] >= 0 else outer).append(pts)
    return outer, holes


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

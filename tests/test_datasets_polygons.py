"""COCO polygons follow pixel boundaries: drawn back by pycocotools they cover exactly the mask, on
many shapes (blobs, holes, diagonal chains, single pixels, shapes touching the borders); instances
with holes are RLE under 'auto' and cut-open polygons under 'polygon'; ``area`` is pycocotools'
area of what is written."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as cmask

from daami2i.heatmaps import masks as M


def _drawn(seg, h: int, w: int) -> np.ndarray:
    """What pycocotools draws for a written segmentation."""
    if isinstance(seg, dict):
        return cmask.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    return cmask.decode(cmask.merge(cmask.frPyObjects(seg, h, w))).astype(bool)


def _written_area(seg, h: int, w: int) -> int:
    if isinstance(seg, dict):
        return int(cmask.area({"size": seg["size"], "counts": seg["counts"].encode()}))
    return int(cmask.area(cmask.merge(cmask.frPyObjects(seg, h, w))))


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _shapes() -> list[np.ndarray]:
    """Hand-made masks: single pixels (corners too), lines, diagonal chains, full image, rings."""
    out = []
    for y, x in ((0, 0), (0, 9), (9, 0), (9, 9), (4, 5)):
        m = np.zeros((10, 10), bool)
        m[y, x] = True
        out.append(m)
    out.append(np.eye(12, dtype=bool))  # a diagonal chain: pixels touching at corners only
    out.append(np.eye(12, dtype=bool)[::-1] | np.eye(12, dtype=bool))  # an X
    checker = np.indices((9, 9)).sum(0) % 2 == 0  # every pixel touches its neighbours at corners
    out.append(checker)
    out.append(np.ones((7, 11), bool))  # the whole image
    line = np.zeros((8, 8), bool)
    line[0, :] = line[:, 7] = True  # along two borders
    out.append(line)
    stair = np.tril(np.ones((16, 16), bool))
    out.append(stair)
    out.append(_disk(40, 40, 20, 20, 15) & ~_disk(40, 40, 20, 20, 7))  # a ring
    ring_island = out[-1] | _disk(40, 40, 20, 20, 3)  # an island in the ring's hole
    out.append(ring_island)
    frame = np.ones((20, 20), bool)
    frame[5:15, 5:15] = False
    frame[8:12, 8:12] = True  # frame touching every border, with an island
    frame[9, 9] = False  # and a hole in the island
    out.append(frame)
    pinched = np.zeros((6, 6), bool)
    pinched[1:3, 1:3] = pinched[3:5, 3:5] = True
    pinched[2, 3] = pinched[3, 2] = False  # hole-free figure eight, and ...
    out.append(pinched)
    holes = np.ones((9, 9), bool)
    holes[2, 2] = holes[3, 3] = holes[4, 4] = holes[2, 6] = holes[6, 6] = False  # diagonal holes
    out.append(holes)
    return out


def _blobs(n: int, seed: int = 0) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        if rng.random() < 0.6:  # smooth blobs, many with holes
            m = cv2.GaussianBlur(m.astype(np.float32), (0, 0), float(rng.uniform(0.8, 2.5))) > 0.5
        out.append(m)
    return out


def test_polygons_draw_back_to_exactly_the_mask():
    kinds = {"polygon": 0, "rle": 0, "with holes": 0}
    for mask in _shapes() + _blobs(400):
        h, w = mask.shape
        for merge_iou in (None, 0.3):
            for inst in M.instances(mask, min_fragment=0.0, merge_iou=merge_iou):
                for kind in ("auto", "polygon"):
                    ann = inst.annotation(kind)
                    seg = ann["segmentation"]
                    assert np.array_equal(_drawn(seg, h, w), inst.mask), (kind, mask.astype(int))
                    assert ann["area"] == _written_area(seg, h, w) == inst.area
                auto, poly = inst.segmentation("auto"), inst.segmentation("polygon")
                assert isinstance(poly, list), "every instance can be written as polygons"
                assert isinstance(auto, dict) == bool(inst.holes), "auto: RLE exactly when there are holes"
                kinds["rle" if isinstance(auto, dict) else "polygon"] += 1
                kinds["with holes"] += bool(inst.holes)
    assert kinds["polygon"] > 1000 and kinds["with holes"] > 100, kinds


def test_a_disk_polygon_loses_no_pixels():
    """Contours through pixel centres drew 689 of this disk's 732 pixels back (IoU 0.94)."""
    disk = _disk(64, 64, 31.5, 31.5, 15.25)
    inst = M.instances(disk)[0]
    ann = inst.annotation()
    assert isinstance(ann["segmentation"], list)
    drawn = _drawn(ann["segmentation"], 64, 64)
    assert int(drawn.sum()) == int(disk.sum()) == ann["area"] == 732
    assert np.array_equal(drawn, disk)


def test_boundaries_are_pixel_corners():
    m = np.zeros((5, 6), bool)
    m[3, 2] = True
    inst = M.instances(m)[0]
    (poly,) = inst.polygons
    assert sorted(map(tuple, poly.tolist())) == [(2.0, 3.0), (2.0, 4.0), (3.0, 3.0), (3.0, 4.0)]
    assert inst.segmentation() == [[float(v) for v in poly.reshape(-1)]]
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    inst = M.instances(ring)[0]
    assert sorted(map(tuple, inst.holes[0].tolist())) == [(2.0, 2.0), (2.0, 3.0), (3.0, 2.0), (3.0, 3.0)]


@pytest.mark.parametrize("kind", ["auto", "polygon", "rle"])
def test_area_is_the_area_of_what_is_written(kind):
    ring = _disk(30, 30, 15, 15, 10) & ~_disk(30, 30, 15, 15, 4)
    inst = M.instances(ring)[0]
    ann = inst.annotation(kind)
    assert ann["area"] == _written_area(ann["segmentation"], 30, 30) == int(ring.sum())
    assert isinstance(ann["segmentation"], list) == (kind == "polygon")
    assert M.segmentation_area(ann["segmentation"], 30, 30) == ann["area"]

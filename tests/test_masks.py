"""Heat maps to masks, instances, COCO encodings; merging schemes against the dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as cmask

import daami2i
from daami2i.errors import QueryError
from daami2i.heatmaps import masks as M
from daami2i.heatmaps.schemes import word_map
from reference import batch_rows, column_query, dense_self, recording
from test_dense_reference import selected_layers


def test_binarize_tau_and_otsu():
    rng = np.random.default_rng(0)
    heat = rng.uniform(0, 1, (20, 30)).astype(np.float32) * 3 + 2
    norm = (heat - heat.min()) / (heat.max() - heat.min())
    assert (M.binarize(heat, "tau", 0.4) == (norm > 0.4)).all()
    # two well separated levels: Otsu splits them whatever the blur
    two = np.zeros((40, 40), np.float32)
    two[10:30, 5:20] = 1.0
    assert (M.binarize(two, "otsu", blur_sigma=0) == (two > 0.5)).all()
    assert M.binarize(np.ones((4, 4)), "otsu").sum() == 0  # a flat map has no object
    with pytest.raises(QueryError, match="method"):
        M.binarize(two, "median")
    with pytest.raises(QueryError, match="2-D"):
        M.binarize(np.zeros((2, 3, 4)))


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_instances_fragments_merging_and_holes():
    h, w = 64, 80
    big = _disk(h, w, 20, 20, 12)
    ring = _disk(h, w, 40, 60, 14) & ~_disk(h, w, 40, 60, 6)  # an object with a hole
    crumb = np.zeros((h, w), bool)
    crumb[60:62, 2:4] = True  # 4 pixels: below 5 % of the largest
    mask = big | ring | crumb
    found = M.instances(mask, min_fragment=0.05, merge_iou=None)
    assert len(found) == 2
    assert [i.area for i in found] == sorted([int(big.sum()), int(ring.sum())], reverse=True)
    ring_inst = next(i for i in found if i.area == int(ring.sum()))
    assert (ring_inst.mask == ring).all()
    assert len(ring_inst.holes) == 1 and len(ring_inst.polygons) == 1
    # with holes, 'auto' writes RLE, which decodes to exactly the mask
    seg = ring_inst.segmentation()
    assert isinstance(seg, dict)
    decoded = cmask.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    assert (decoded.astype(bool) == ring).all()
    assert int(cmask.area({"size": seg["size"], "counts": seg["counts"].encode()})) == ring_inst.area
    ys, xs = np.nonzero(ring)
    assert ring_inst.bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # a polygon without holes follows pixel boundaries: pycocotools draws back exactly the mask
    big_inst = next(i for i in found if i.area == int(big.sum()))
    poly = big_inst.segmentation()
    assert isinstance(poly, list)
    raster = cmask.decode(cmask.merge(cmask.frPyObjects(poly, h, w))).astype(bool)
    assert (raster == big).all() and big_inst.annotation()["area"] == int(big.sum())
    # with 'polygon', the ring is written as polygons too (its hole cut open), again exactly
    ring_poly = ring_inst.segmentation("polygon")
    assert isinstance(ring_poly, list)
    assert (cmask.decode(cmask.merge(cmask.frPyObjects(ring_poly, h, w))).astype(bool) == ring).all()
    # the crumb survives a lower fragment threshold
    assert len(M.instances(mask, min_fragment=0.0, merge_iou=None)) == 3


def test_overlapping_boxes_of_one_word_merge():
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:7] = True  # an L ...
    mask[23:25, 5:25] = True
    mask[8:20, 10:22] = True  # ... and a block inside its box, not touching it: box IoU 0.36
    mask[30:36, 30:36] = True  # far away
    merged = M.instances(mask, min_fragment=0.0, merge_iou=0.3)
    assert len(merged) == 2
    assert merged[0].area == 76 + 144 and merged[0].bbox == [5.0, 5.0, 20.0, 20.0]
    assert merged[1].bbox == [30.0, 30.0, 6.0, 6.0]
    assert len(M.instances(mask, min_fragment=0.0, merge_iou=0.4)) == 3
    assert len(M.instances(mask, min_fragment=0.0, merge_iou=None)) == 3


def test_label_map_background_and_argmax():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
    labels = M.label_map(torch.from_numpy(maps), background=0.4)
    norm = np.stack([(m - m.min()) / (m.max() - m.min()) for m in maps])
    expected = np.where(norm.max(0) > 0.4, norm.argmax(0) + 1, 0)
    assert (labels == expected).all()


def test_schemes_match_the_dense_reference(sd2):
    with recording(sd2.unet) as book:
        with daami2i.trace(sd2, self_factors="all") as trc:
            sd2("a red cat on a mat", num_inference_steps=2, height=96, width=128)
    ghm = trc.compute_global_heat_map()
    grid = ghm.grid_size
    gen = trc.last_generation
    rows = batch_rows(gen.n_images, gen.cfg, "cond", 0)
    dense = dense_self(dict(book), selected_layers(sd2, trc, "self"), gen.latent_size, grid, rows, None)
    c = ghm.compute_word_heat_map("cat").value
    close = dict(atol=1e-5, rtol=1e-4)
    assert torch.allclose(word_map(ghm, "cat", "raw"), c)
    assert torch.allclose(word_map(ghm, "cat", "guided"), column_query(dense, c, grid), **close)
    twice = column_query(dense, column_query(dense, c, grid), grid)
    assert torch.allclose(word_map(ghm, "cat", "repeated", iterations=2), twice, **close)
    # the cascade goes level by level, coarse first: with several levels it differs from S c
    assert len(ghm.self_levels) > 1
    assert not torch.allclose(word_map(ghm, "cat", "cascade"), word_map(ghm, "cat", "guided"), **close)
    with pytest.raises(QueryError, match="scheme"):
        word_map(ghm, "cat", "magic")


def test_readme_masks_snippet_runs_on_the_embedded_model():
    from daami2i.heatmaps import masks
    from daami2i.shapes.model import DEFAULTS, load_pipeline

    pipe = load_pipeline()
    with daami2i.trace(pipe) as trc:
        image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **DEFAULTS).images[0]
    ghm = trc.compute_global_heat_map()
    # as in README.md, "Masks, boxes and datasets"
    heat = word_map(ghm, "circle", scheme="guided")
    mask = masks.binarize(daami2i.HeatMap(heat).expand_as(image), method="tau", tau=0.4)
    found = masks.instances(mask, min_fragment=0.05, merge_iou=0.3)
    assert found and all(i.area > 0 for i in found)
    labels = masks.label_map(torch.stack([word_map(ghm, w) for w in ("circle", "square")]), background=0.4)
    assert labels.shape == ghm.grid_size and set(np.unique(labels)) <= {0, 1, 2}
    # the circle's and the square's labels land on different objects of the generated image
    assert (labels == 1).any() and (labels == 2).any()

"""Unit tests of the pure algebra: resampling operators and region weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daami2i.heatmaps import regions, resample


@pytest.mark.parametrize("src, dst", [((4, 4), (16, 16)), ((3, 5), (12, 20)), ((8, 12), (16, 24)), ((6, 6), (6, 6))])
def test_upsample_matches_interpolate(src, dst):
    x = torch.randn(3, *src)
    ref = F.interpolate(x[:, None], size=dst, mode="bicubic", align_corners=False)[:, 0]
    assert torch.allclose(resample.upsample(x, dst), ref, atol=1e-5)


@pytest.mark.parametrize("src, dst", [((4, 4), (16, 16)), ((3, 5), (12, 20))])
def test_adjoint_is_the_transpose(src, dst):
    x = torch.randn(*src, dtype=torch.float32)
    y = torch.randn(*dst, dtype=torch.float32)
    lhs = (resample.upsample(x, dst) * y).sum()
    rhs = (x * resample.adjoint(y, src)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5)


def test_pixel_weights_count_occurrences():
    w = regions.pixel_weights([0, 0, 7], (2, 4))
    assert w.tolist() == [[2, 0, 0, 0], [0, 0, 0, 1]]


def test_box_weights_are_inclusive_like_daam_i2i():
    w = regions.box_weights(1, 0, 2, 1, (3, 4))
    assert w.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    # a single cell, and a corner one past the last column / row is clipped to it
    assert regions.box_weights(3, 2, 3, 2, (3, 4)).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert regions.box_weights(2, 1, 4, 3, (3, 4)).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_box_weights_half_open_keyword():
    w = regions.box_weights(1, 0, 3, 2, (3, 4), half_open=True)
    assert w.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_polygon_coverage_is_area_fraction():
    # left half of a 16 x 32 image plus a triangle: coverage per 8x8 cell
    w = regions.polygon_weights([[[0, 0], [16, 0], [16, 16], [0, 16]]], (16, 32), (2, 4))
    assert w.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    tri = regions.polygon_weights([[[0, 0], [8.2, 0], [0, 8.2]]], (10, 10), (1, 1))
    assert tri.item() == pytest.approx(36 / 100)  # pixel centres (x + .5, y + .5) with x + y + 1 < 8.2


def test_union_of_polygons_counts_overlap_once():
    a = [[0, 0], [8, 0], [8, 8], [0, 8]]
    b = [[4, 0], [12, 0], [12, 8], [4, 8]]
    w = regions.polygon_weights([a, b], (8, 16), (1, 2))
    assert w.tolist() == [[1.0, 0.5]]


@pytest.mark.parametrize("size", [(64, 48), (37, 53), (128, 128)])
def test_blockwise_polygon_test_equals_testing_every_pixel(size):
    """The block shortcut of the contour rasteriser decides every pixel as the brute-force test does."""
    from matplotlib.path import Path as MplPath

    from daami2i.heatmaps.regions import _inside_centres

    h, w = size
    rng = np.random.default_rng(h * w)
    ys, xs = np.mgrid[0:h, 0:w]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    polygons = [rng.uniform(0, 1, (k, 2)) * [w, h] for k in (3, 5, 9, 17) for _ in range(5)]  # often self-intersecting
    polygons.append(np.array([[0.0, 0.0], [w, 0.3], [w, 1.2], [0.0, 0.9]]))  # a sliver one pixel high
    polygons.append(np.array([[2.0, 2.0], [2.7, h - 2.0], [3.4, 2.0]]))  # a needle under one pixel wide
    for pts in polygons:
        path = MplPath(pts)
        slow = path.contains_points(centres).reshape(h, w)
        for block in (2, 8, 16):
            fast = _inside_centres(path, pts, (h, w), block=block)
            assert (fast == slow).all(), (pts.tolist(), block, int((fast != slow).sum()))


def test_all_pixels_diffusion_equals_one_pixel_at_a_time_on_local_attention():
    """Local attention makes the thresholded maps sparse: the tiles then read only their supports.

    Seeded one pixel at a time, some normalised value comes within 2.7e-6 of the threshold (measured),
    about the rounding of either path: a value within the measured rounding of the threshold follows
    the implementation's cut (reference.diffused_reference measures that band at each iteration)."""
    from daami2i.heatmaps.selfattn import SelfAttentionLevel, diffuse, diffuse_all, query
    from reference import diffused_reference

    def close(ours, ref):
        return torch.allclose(ours, ref, atol=1e-6, rtol=1e-4)

    def check(ours, ref):
        assert close(ours, ref)

    def local(h, w, sigma):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
        seg = ((yy // (h // 2)) * 2 + xx // (w // 2)).flatten()
        logits = -(torch.cdist(pos, pos) ** 2) / (2 * sigma**2) + 1.5 * (seg[:, None] == seg[None, :]).float()
        return logits.softmax(-1)

    grid = (24, 20)
    n = grid[0] * grid[1]
    levels = [SelfAttentionLevel(grid, local(24, 20, 1.5), 1), SelfAttentionLevel((12, 10), local(12, 10, 1.0), 1)]
    seeds = torch.eye(n).view(n, *grid)
    near = cut = 0
    for lv in (levels[:1], levels):
        every = [diffuse_all(lv, grid, iterations=k, threshold=0.4, tile=4, group=64) for k in range(1, 7)]
        ref, n_near, n_cut = diffused_reference(
            lambda g, lv=lv: query(lv, g, grid), seeds, 6, 0.4, check, lambda k, every=every: every[k - 1]
        )
        assert close(every[-1], ref)
        near, cut = near + n_near, cut + n_cut
        for p in range(n):
            one = diffuse(lv, seeds[p], grid, 6, 0.4)
            if not close(one, ref[p]):  # it cut a value near the threshold otherwise: follow its own cuts
                mine = diffused_reference(
                    lambda g, lv=lv: query(lv, g, grid),
                    seeds[p],
                    6,
                    0.4,
                    check,
                    lambda k, p=p, lv=lv: diffuse(lv, seeds[p], grid, k, 0.4),
                )[0]
                assert close(one, mine), p
    assert near <= 1e-4 * cut, (near, cut)  # the reference decides (almost) every cut (measured: 0 of 2.3e6 left)


def test_a_key_padding_mask_spread_over_queries_becomes_one_row():
    """mask_bias keeps a boolean mask that is the same for every query row as one row (S floats, not
    S x S), and a mask that differs by query in full; both give the same probabilities."""
    from daami2i.storage.recorder import mask_bias, probs_chunks

    keys = torch.tensor([True, True, False, True, False])
    spread = keys.expand(1, 1, 5, 5).clone()
    bias = mask_bias(spread, (2, 3, 5, 5))
    assert bias.shape == (1, 1, 1, 5) and torch.equal(torch.isinf(bias[0, 0, 0]), ~keys)
    causal = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    assert mask_bias(causal, (2, 3, 5, 5)).shape == (1, 1, 5, 5)
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    full = torch.zeros(1, 1, 5, 5).masked_fill(~spread, float("-inf"))
    ours = torch.cat([p.clone() for _, _, p in probs_chunks(q, k, 0.5, bias, 1 << 20)], dim=2)
    torch.testing.assert_close(ours, torch.softmax(q @ k.transpose(-1, -2) * 0.5 + full, dim=-1))

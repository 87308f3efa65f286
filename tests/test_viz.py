"""Plots take the caller's axes, return (fig, ax) and leave global matplotlib state alone."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

import daami2i
from daami2i import viz


@pytest.fixture(scope="module")
def traced(sd2):
    with daami2i.trace(sd2) as trc:
        out = sd2("a red cat with a flowerpot", num_inference_steps=1, height=64, width=96)
    return out.images[0], trc.compute_global_heat_map()


def test_no_global_state(traced):
    import matplotlib.pyplot as plt

    image, ghm = traced
    before = (plt.get_fignums(), dict(matplotlib.rcParams))
    viz.plot_overlay(image, ghm.compute_word_heat_map("cat"))
    viz.plot_word_grid(image, ghm)
    viz.plot_region(image, ghm.compute_bbox_heat_map(1, 1, 5, 4))
    viz.plot_mask(image, ghm.compute_word_heat_map("cat"), threshold=0.5)
    viz.plot_overlay_with_mask(image, ghm.compute_word_heat_map("cat"), threshold=0.5)
    viz.plot_region(image, ghm.compute_bbox_heat_map(1, 1, 5, 4), threshold=0.5)
    assert plt.get_fignums() == before[0] and dict(matplotlib.rcParams) == before[1]


def test_callers_axes(traced):
    from matplotlib.figure import Figure

    image, ghm = traced
    fig = Figure()
    axes = fig.subplots(2, 3)
    f, a = viz.plot_word_grid(image, ghm, axes=axes)
    assert f is fig and [ax.get_title() for ax in a[:5]] == ["a", "red", "cat", "with", "flowerpot"]
    f, a = viz.plot_region(image, ghm.compute_contour_heat_map([[0, 0], [60, 5], [30, 50]], 64, 96), axes=axes[1])
    assert f is fig and len(a[0].patches) == 1  # the polygon drawn on the image


def test_mask_pixels_follow_the_threshold(traced):
    image, ghm = traced
    wm = ghm.compute_word_heat_map("cat")
    mask = wm.expand_as(image, threshold=0.6).numpy() > 0
    fig, ax = viz.plot_mask(image, wm, threshold=0.6)  # default: the image dimmed outside the mask
    assert np.array_equal(ax.images[1].get_array()[..., 3] == 0, mask)
    fig, ax = viz.plot_mask(image, wm, threshold=0.6, color=(0.0, 1.0, 0.0))  # the mask filled with a colour
    assert np.array_equal(ax.images[1].get_array()[..., 3] > 0, mask)
    assert len(ax.collections) == 1  # its edge outlined


def _composite(ax) -> np.ndarray:
    """What the axes' images show, composited (RGB in [0, 1])."""
    base = np.asarray(ax.images[0].get_array(), dtype=float)[..., :3]
    for im in ax.images[1:]:
        layer = np.asarray(im.get_array(), dtype=float)
        base = base * (1 - layer[..., 3:]) + layer[..., :3] * layer[..., 3:]
    return base


def test_mask_reads_on_a_red_object():
    """A red mask vanished on red objects: the mask must stand out on an image of any colour."""
    from daami2i.heatmaps import HeatMap

    red = np.zeros((64, 64, 3))
    red[..., 0] = 1.0
    value = torch.zeros(16, 16)
    value[4:12, 4:12] = 1.0
    fig, ax = viz.plot_mask(red, HeatMap(value), threshold=0.5)
    shown = _composite(ax)
    mask = HeatMap(value).expand_as(red, threshold=0.5).numpy() > 0
    contrast = np.abs(shown[mask].mean(0) - shown[~mask].mean(0)).max()
    assert contrast > 0.3, contrast


def test_region_outline_reads_on_a_white_image(traced):
    """The region was outlined in white only, invisible on a white background."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _, ghm = traced
    white = np.ones((64, 96, 3))
    fig, axes = viz.plot_region(white, ghm.compute_bbox_heat_map(2, 1, 6, 4))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    x0, y0, x1, y1 = axes[0].get_window_extent().extents.astype(int)
    height = pixels.shape[0]
    panel = pixels[height - y1 : height - y0, x0:x1]
    assert panel.min() < 80  # a dark rim around the white line


def test_box_drawn_at_image_scale(traced):
    image, ghm = traced
    fig, axes = viz.plot_region(image, ghm.compute_bbox_heat_map(2, 1, 6, 4))
    rect = axes[0].patches[0]
    # grid 8x12 on a 64x96 image: 8 pixels per latent cell; corners included: columns 2..6, rows 1..4
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (16, 8, 40, 32)


def test_region_with_threshold_adds_the_mask_panel(traced):
    image, ghm = traced
    hm = ghm.compute_contour_heat_map([[0, 0], [60, 5], [30, 50]], 64, 96)
    fig, axes = viz.plot_region(image, hm, threshold=0.5, title="guided")
    assert len(axes) == 3 and [ax.get_title() for ax in axes] == ["region", "guided", "mask > 0.5"]
    assert all(len(ax.patches) == 1 for ax in axes)  # the polygon on the image, the map and the mask
    assert np.array_equal(axes[2].images[1].get_array()[..., 3] == 0, hm.expand_as(image, threshold=0.5).numpy() > 0)
    with pytest.raises(daami2i.Daami2iError, match="needs 3 axes"):
        viz.plot_region(image, hm, axes=fig.subplots(1, 2), threshold=0.5)


def test_overlay_with_mask(traced):
    image, ghm = traced
    fig, axes = viz.plot_overlay_with_mask(image, ghm.compute_word_heat_map("cat"), threshold=0.4, title="cat")
    assert [ax.get_title() for ax in axes] == ["cat", "mask > 0.4"]


def test_words_of_a_prompt(traced):
    _, ghm = traced
    assert ghm.words == ["a", "red", "cat", "with", "flowerpot"]
    assert torch.equal(
        ghm.compute_word_heat_map("flowerpot").value, ghm.token_maps[[6, 7]].mean(0)
    )  # tokens 5, 6 (+1 start token)

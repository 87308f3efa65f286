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
    fig, ax = viz.plot_mask(image, wm, threshold=0.6)
    overlay = ax.images[1].get_array()
    assert np.array_equal(overlay[..., 3] > 0, wm.expand_as(image, threshold=0.6).numpy() > 0)


def test_box_drawn_at_image_scale(traced):
    image, ghm = traced
    fig, axes = viz.plot_region(image, ghm.compute_bbox_heat_map(2, 1, 6, 4))
    rect = axes[0].patches[0]
    # grid 8x12 on a 64x96 image: 8 pixels per latent cell
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (16, 8, 32, 24)


def test_words_of_a_prompt(traced):
    _, ghm = traced
    assert ghm.words == ["a", "red", "cat", "with", "flowerpot"]
    assert torch.equal(
        ghm.compute_word_heat_map("flowerpot").value, ghm.token_maps[[6, 7]].mean(0)
    )  # tokens 5, 6 (+1 start token)

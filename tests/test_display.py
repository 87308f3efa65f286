"""Rich display: heat maps, global heat maps and experiments show a PNG in Jupyter (daami2i.display)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from daami2i import display, viz
from daami2i.heatmaps import GlobalHeatMap, HeatMap

PROMPT = "a red cat with a flowerpot"  # five words: one row of the grid


@pytest.fixture(scope="module")
def traced(sd2, tmp_path_factory):
    with daami2i.trace(sd2) as trc:
        out = sd2(PROMPT, num_inference_steps=1, height=64, width=96)
    folder = trc.to_experiment(tmp_path_factory.mktemp("display") / "exp", seed=0)
    return out.images[0], trc.compute_global_heat_map(), daami2i.load_experiment(folder)


def _decode(png: bytes | None) -> np.ndarray:
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _pixels(inches: tuple[float, float]) -> tuple[int, int]:
    """(height, width) in pixels of a figure of (width, height) inches."""
    return round(inches[1] * display.DPI), round(inches[0] * display.DPI)


def _not_blank(rgb: np.ndarray) -> None:
    assert rgb.std() > 20  # a drawn map, not a white page
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100  # many colours: the colour map, not flat fills


def _jet_share(rgb: np.ndarray) -> float:
    """Share of pixels in jet's saturated blues and reds (the map drawn at alpha 1)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return float((((b > 120) & (r < 60)) | ((r > 120) & (b < 60) & (g < 120))).mean())


def test_heat_maps_show_themselves(traced):
    image, ghm, _ = traced
    maps = {
        "word": ghm.compute_word_heat_map("cat"),
        "pixel": ghm.compute_pixel_heat_map([5, 6]),
        "box": ghm.compute_bbox_heat_map(1, 1, 5, 4),
        "contour": ghm.compute_contour_heat_map([[0, 0], [60, 5], [30, 50]], 64, 96),
        "guided": ghm.compute_guided_heat_map(ghm.compute_word_heat_map("cat")),
        "grown": ghm.compute_pixel_grown_heat_map([5], iterations=2),
        "plain": HeatMap(torch.rand(4, 6)),
    }
    pngs = {}
    for name, hm in maps.items():
        rgb = _decode(hm._repr_png_())
        assert rgb.shape[:2] == _pixels(display.MAP_INCHES), name
        _not_blank(rgb)
        assert _jet_share(rgb) > 0.05, name
        pngs[name] = rgb
    assert not np.array_equal(pngs["word"], pngs["box"])  # each picture is its own map
    # the box is outlined: the same values without the region draw another picture
    plain_box = _decode(HeatMap(maps["box"].value)._repr_png_())
    assert not np.array_equal(plain_box, pngs["box"])


def test_heat_map_picture_is_the_viz_overlay(traced):
    """The picture's map is viz.plot_overlay's at alpha 1 on the display canvas."""
    _, ghm, _ = traced
    hm = ghm.compute_word_heat_map("cat")
    fig = display.figure_of(hm)
    ax = fig.axes[0]
    size = display.canvas_size(hm.size)
    assert ax.images[0].get_array().shape[:2] == size
    np.testing.assert_array_equal(np.asarray(ax.images[1].get_array()), hm.expand_as(size).numpy())
    assert ax.images[1].get_alpha() == 1.0 and ax.images[1].get_cmap().name == "jet"
    assert ax.get_title() == "word 'cat'"


def test_global_heat_map_shows_every_word(traced):
    _, ghm, _ = traced
    rgb = _decode(ghm._repr_png_())
    words = ghm.words
    assert words == ["a", "red", "cat", "with", "flowerpot"]
    cols = min(display.NCOLS, len(words))
    rows = -(-len(words) // cols)
    inches = (display.PANEL_INCHES[0] * cols, display.PANEL_INCHES[1] * rows + 0.3)
    assert rgb.shape[:2] == _pixels(inches)
    _not_blank(rgb)
    fig = display.figure_of(ghm)
    assert [ax.get_title() for ax in fig.axes[: len(words)]] == words
    for ax, word in zip(fig.axes, words, strict=False):  # each panel is viz's map of that word
        np.testing.assert_array_equal(
            np.asarray(ax.images[1].get_array()),
            ghm.compute_word_heat_map(word).expand_as(display.canvas_size(ghm.image_size)).numpy(),
        )


def test_experiment_shows_its_image_and_words(traced):
    image, ghm, exp = traced
    rgb = _decode(exp._repr_png_())
    panels = 1 + len(ghm.words)  # the image, then each word: two rows of five
    inches = (display.PANEL_INCHES[0] * display.NCOLS, display.PANEL_INCHES[1] * 2 + 0.3)
    assert panels == 6 and rgb.shape[:2] == _pixels(inches)
    _not_blank(rgb)
    fig = display.figure_of(exp)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.asarray(exp.images[0]))
    assert [ax.get_title() for ax in fig.axes[1:panels]] == ghm.words
    # the word panels are viz.plot_word_grid's, over the saved image
    want = viz.plot_word_grid(exp.images[0], ghm)[1]
    for got, ref in zip(fig.axes[1:panels], want, strict=False):
        np.testing.assert_array_equal(np.asarray(got.images[1].get_array()), np.asarray(ref.images[1].get_array()))


def test_ipython_formats_them(traced):
    """IPython's display formatter (what a notebook cell uses) finds the PNG."""
    ipython = pytest.importorskip("IPython.core.interactiveshell")
    _, ghm, exp = traced
    shell = ipython.InteractiveShell.instance()
    for obj in (ghm.compute_word_heat_map("cat"), ghm, exp):
        data, _ = shell.display_formatter.format(obj)
        assert "image/png" in data and "text/plain" in data
        _decode(data["image/png"])


def test_no_pyplot_state(traced):
    import matplotlib.pyplot as plt

    _, ghm, exp = traced
    before = plt.get_fignums()
    ghm._repr_png_(), exp._repr_png_(), ghm.compute_word_heat_map("cat")._repr_png_()
    assert plt.get_fignums() == before


def test_text_when_there_is_nothing_to_draw(traced, monkeypatch):
    _, ghm, _ = traced
    no_words = GlobalHeatMap(torch.rand(16, 4, 4), 16)  # daam-i2i's constructor: pixel maps, no prompt
    assert no_words._repr_png_() is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib not installed
    assert ghm.compute_word_heat_map("cat")._repr_png_() is None
    assert ghm._repr_png_() is None


def test_video_maps_show_a_row_of_frames_on_one_scale():
    """A video's word map shows up to 6 of its frames, each the map expanded over the whole video (one
    colour scale); a video's global heat map a row per word; its experiment the same."""
    import daami2i
    from daami2i.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    with daami2i.trace(pipe) as trc:
        pipe("a red fox", num_frames=9, height=32, width=48, num_inference_steps=1, max_sequence_length=16)
    ghm = trc.compute_global_heat_map()
    fox = ghm.compute_word_heat_map("fox")
    assert _decode(fox._repr_png_()).shape[2] >= 3
    fig = display.figure_of(fox)
    shown = display._shown_frames(9)
    assert shown == [0, 2, 3, 5, 6, 8] and len(fig.axes) == len(shown)
    video = fox.expand_as(display.canvas_size((2, 3))).numpy()
    for ax, t in zip(fig.axes, shown, strict=True):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), video[t])
        assert ax.images[0].get_clim() == (0.0, 1.0) and ax.get_title() == f"frame {t}"
    assert [t.get_text() for t in fig.axes[0].texts] == ["word 'fox'"]
    grid = display.figure_of(ghm)
    assert len(grid.axes) == len(ghm.words) * len(shown)
    assert [t.get_text() for t in grid.axes[len(shown)].texts] == ["red"]  # the second row's first frame

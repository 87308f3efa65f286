"""Rich display in Jupyter: heat maps, global heat maps and experiments show a picture of themselves.

A notebook cell that ends with a :class:`~daami2i.heatmaps.maps.HeatMap` (word, pixel, box, contour,
guided, ... maps), a :class:`~daami2i.heatmaps.maps.GlobalHeatMap` or an
:class:`~daami2i.storage.experiment.Experiment` shows a PNG drawn here with the :mod:`daami2i.viz`
functions: their ``_repr_png_`` methods call :func:`repr_png`. matplotlib is imported only when a
picture is drawn (``pip install 'daami2i[plot]'``); without it, or when there is nothing to draw
(a global heat map without word maps), the object shows as its text ``repr``.

* a heat map: the map itself (a map knows no image), bicubic on a 256-pixel canvas in the ``jet``
  colours of :func:`daami2i.viz.plot_overlay`, the region of a pixel / box / contour query outlined;
* a global heat map: every word of the prompt, one panel each (:func:`daami2i.viz.plot_word_grid`);
* an experiment: its first image and every word's map over it;
* a video's map, global heat map or experiment: a row of up to 6 frames per map, one colour scale
  per video.

To draw a map over its image, use :func:`daami2i.viz.plot_overlay` (or ``heat_map.plot_overlay(image)``).
Every figure is made without pyplot; :func:`figure_of` returns it for those who want to change it.

>>> import torch
>>> from daami2i.heatmaps import HeatMap
>>> png = HeatMap(torch.rand(8, 8))._repr_png_()
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Daami2iError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .heatmaps.maps import GlobalHeatMap, HeatMap
    from .storage.experiment import Experiment

DPI = 100  # PNG pixels per figure inch
SIDE = 256  # pixels of the longest side of the canvas a heat map is drawn on
MAP_INCHES = (3.2, 3.4)  # one heat map (width, height)
PANEL_INCHES = (2.4, 2.6)  # one panel of a word grid
NCOLS = 5  # panels per row of a word grid


def _figure(inches: tuple[float, float]) -> Figure:
    from .viz import _figure as viz_figure

    return viz_figure(inches)


def canvas_size(grid: tuple[int, int], side: int = SIDE) -> tuple[int, int]:
    """(height, width) of the canvas a map on ``grid`` is drawn on: the longest side ``side`` pixels.

    >>> canvas_size((16, 32))
    (128, 256)
    """
    h, w = grid
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _canvas(size: tuple[int, int]) -> np.ndarray:
    return np.zeros((*size, 3), dtype=np.float32)  # black: at alpha 1 the map's colours alone


def _title(hm: HeatMap) -> str:
    word = getattr(hm, "word", None)
    if word is not None:
        return f"word {word!r}"
    region = getattr(hm, "region", None)
    if region is not None:
        kind = region.get("kind", "weights")
        return "self-attention" if kind == "weights" else f"self-attention ({'guided' if kind == 'guide' else kind})"
    return type(hm).__name__


def heat_map_figure(hm: HeatMap) -> Figure:
    """One heat map on its own (:func:`daami2i.viz.plot_overlay` at alpha 1 on a black canvas whose
    longest side is :data:`SIDE` pixels), the region of a self-attention query outlined
    (:func:`daami2i.viz.draw_region`)."""
    from .viz import draw_region, plot_overlay

    if hm.frames is not None:  # a video's map: a row of its frames
        return video_figure([(_title(hm), hm)])
    size = canvas_size(hm.size)
    fig = _figure(MAP_INCHES)
    ax = fig.add_subplot()
    plot_overlay(_canvas(size), hm, ax=ax, alpha=1.0, title=_title(hm))
    region = getattr(hm, "region", None)
    if region is not None and region.get("kind") in ("box", "contours", "pixels"):
        draw_region(ax, hm, size)  # type: ignore[arg-type]
    peak = float(hm.value.max())
    ax.set_xlabel(f"{hm.size[0]}x{hm.size[1]} grid, max {peak:.3g}", fontsize=8)
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


VIDEO_FRAMES = 6  # frames a video's picture shows, evenly spaced, the first and the last included


def _shown_frames(n: int, count: int = VIDEO_FRAMES) -> list[int]:
    """Up to ``count`` evenly spaced video frames of ``n``.

    >>> _shown_frames(17, 5)
    [0, 4, 8, 12, 16]
    """
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)]


def video_figure(rows: Sequence[tuple[str, HeatMap]], suptitle: str | None = None) -> Figure:
    """Video maps, one row each (``(label, map)``), in up to :data:`VIDEO_FRAMES` of their frames: each
    map expanded over its video (one colour scale for all its frames, ``jet`` as the image overlays)."""
    layout = rows[0][1].frames
    assert layout is not None
    shown = _shown_frames(layout.video_frames)
    size = canvas_size(rows[0][1].frame(0).size)
    fig = _figure((PANEL_INCHES[0] * len(shown), PANEL_INCHES[1] * len(rows) + 0.3))
    axes = np.atleast_2d(np.asarray(fig.subplots(len(rows), len(shown)), dtype=object))
    for r, (label, hm) in enumerate(rows):
        video = hm.expand_as(size).numpy()  # (video frames, H, W), normalised over the whole video
        for c, t in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(video[t], cmap="jet", vmin=0.0, vmax=1.0)
            ax.set_title(f"frame {t}", fontsize=9)
            ax.axis("off")
        # the row's label once, left of its first frame (titles of narrow panels would run together)
        axes[r, 0].text(-0.06, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def _grid(n: int, ncols: int = NCOLS) -> tuple[int, int]:
    cols = max(1, min(ncols, n))
    return math.ceil(n / cols), cols


def global_heat_map_figure(ghm: GlobalHeatMap, image: Any = None) -> Figure:
    """Every word of the prompt, one panel each (:func:`daami2i.viz.plot_word_grid`): over ``image``
    when given, else the maps alone on a canvas of the image's proportions."""
    from .viz import plot_word_grid

    words = ghm.words
    if not words:
        raise Daami2iError("the prompt has no words to draw")
    if ghm.frames is not None:  # a video: a row of frames per word
        rows_ = [(w, ghm.compute_word_heat_map(w)) for w in words]
        return video_figure(rows_, repr(ghm.prompt) if ghm.prompt else None)
    rows, cols = _grid(len(words))
    fig = _figure((PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.3))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    if image is None:
        plot_word_grid(_canvas(canvas_size(ghm.image_size or ghm.grid_size)), ghm, axes=axes, alpha=1.0)
    else:
        plot_word_grid(image, ghm, axes=axes)
    if ghm.prompt:
        fig.suptitle(repr(ghm.prompt), fontsize=10)
    fig.tight_layout()
    return fig


def experiment_figure(exp: Experiment, image_idx: int = 0) -> Figure:
    """An experiment's image ``image_idx`` and every word's map over it (the image alone when the
    experiment has no word maps)."""
    from .viz import plot_word_grid

    images = exp.images
    image = images[image_idx] if images else None
    ghm = exp.compute_global_heat_map(image_idx=image_idx)
    if ghm.frames is not None:  # a video experiment: its words, a row of frames each
        return global_heat_map_figure(ghm)
    try:
        words = ghm.words if ghm.cross_layers else []
    except Daami2iError:  # no prompt text
        words = []
    rows, cols = _grid(1 + len(words))
    fig = _figure((PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.3))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    first = axes[0]
    if image is not None:
        first.imshow(np.asarray(image))
    first.set_title(f"image {image_idx}" if len(images) <= 1 else f"image {image_idx} of {len(images)}")
    first.axis("off")
    if words:
        if image is not None:
            plot_word_grid(image, ghm, axes=axes[1:])
        else:  # the images were not saved: the maps alone
            plot_word_grid(_canvas(canvas_size(ghm.image_size or ghm.grid_size)), ghm, axes=axes[1:], alpha=1.0)
    else:
        for ax in axes[1:]:
            ax.axis("off")
    prompt = exp.prompts[image_idx] if image_idx < len(exp.prompts) else None
    fig.suptitle(f"{exp.path.name}: {prompt!r}" if prompt else exp.path.name, fontsize=10)
    fig.tight_layout()
    return fig


def figure_of(obj: Any) -> Figure:
    """The figure :func:`repr_png` draws for a heat map, a global heat map or an experiment."""
    from .heatmaps.maps import GlobalHeatMap, HeatMap
    from .storage.experiment import Experiment

    if isinstance(obj, HeatMap):
        return heat_map_figure(obj)
    if isinstance(obj, GlobalHeatMap):
        return global_heat_map_figure(obj)
    if isinstance(obj, Experiment):
        return experiment_figure(obj)
    raise Daami2iError(f"no picture for a {type(obj).__name__}: expected a heat map, global heat map or experiment")


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (its size in inches times ``dpi`` pixels; no tool name in the file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def repr_png(obj: Any) -> bytes | None:
    """PNG of :func:`figure_of` for Jupyter's ``_repr_png_``; None (the text ``repr`` is shown) when
    matplotlib is missing or there is nothing to draw (e.g. a global heat map without word maps)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    try:
        fig = figure_of(obj)
    except Daami2iError:
        return None
    return png_bytes(fig)

"""Plotting: overlays, word grids, regions and masks.

matplotlib is imported lazily (install ``daami2i[plot]``). Every function draws on the caller's
axes when given (``ax=`` / ``axes=``), otherwise on a new :class:`matplotlib.figure.Figure` made
without pyplot, and returns ``(fig, ax)`` / ``(fig, axes)``; no global matplotlib state is touched.

>>> import torch
>>> from daami2i.heatmaps import HeatMap
>>> fig, ax = plot_overlay(torch.zeros(16, 16, 3).numpy(), HeatMap(torch.rand(4, 4)), title="demo")
>>> ax.get_title()
'demo'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Daami2iError
from .heatmaps.maps import image_size_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .heatmaps.maps import GlobalHeatMap, HeatMap, PixelHeatMap


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise Daami2iError("plots need matplotlib: pip install 'daami2i[plot]'") from exc
    return Figure(figsize=figsize)


def _fig_ax(ax: Axes | None, figsize: tuple[float, float] = (5, 5)) -> tuple[Figure, Axes]:
    """The caller's axes and their figure, or a new figure (not pyplot) with one axes."""
    if ax is None:
        fig = _figure(figsize)
        return fig, fig.add_subplot()
    return ax.figure, ax  # type: ignore[return-value]


def _as_array(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):  # torch tensor (C, H, W) or (H, W)
        t = image.detach().float().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        return t.numpy()
    return np.asarray(image)


def plot_overlay(
    image: Any,
    heat_map: HeatMap,
    ax: Axes | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
    absolute: bool = False,
    threshold: float | None = None,
) -> tuple[Figure, Axes]:
    """Draw ``heat_map`` expanded to ``image`` over the image; returns ``(fig, ax)``."""
    fig, ax = _fig_ax(ax)
    ax.imshow(_as_array(image))
    ax.imshow(heat_map.expand_as(image, absolute=absolute, threshold=threshold).numpy(), cmap=cmap, alpha=alpha)
    if title is None:
        title = getattr(heat_map, "word", None)
    if title:
        ax.set_title(title)
    ax.axis("off")
    return fig, ax


def plot_mask(
    image: Any,
    heat_map: HeatMap,
    threshold: float = 0.4,
    ax: Axes | None = None,
    color: tuple[float, float, float] = (1.0, 0.1, 0.1),
    alpha: float = 0.55,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """The binary mask ``expand_as(image, threshold=threshold)`` drawn in ``color`` over the image."""
    fig, ax = _fig_ax(ax)
    mask = heat_map.expand_as(image, threshold=threshold).numpy()
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[..., :3] = color
    rgba[..., 3] = mask * alpha
    ax.imshow(_as_array(image))
    ax.imshow(rgba)
    ax.set_title(title if title is not None else f"mask > {threshold:g}")
    ax.axis("off")
    return fig, ax


def plot_word_grid(
    image: Any,
    global_heat_map: GlobalHeatMap,
    words: list[str] | None = None,
    ncols: int = 4,
    axes: Any = None,
    **overlay: Any,
) -> tuple[Figure, Any]:
    """Every word's map over the image, one panel each (default: all words of the prompt)."""
    words = list(words) if words is not None else global_heat_map.words
    if not words:
        raise Daami2iError("the prompt has no words to plot")
    if axes is None:
        ncols = max(1, min(ncols, len(words)))
        nrows = math.ceil(len(words) / ncols)
        fig = _figure((3 * ncols, 3.2 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    else:
        axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel()
        if len(axes) < len(words):
            raise Daami2iError(f"{len(words)} words need as many axes, got {len(axes)}")
        fig = axes[0].figure
    for ax, word in zip(axes, words, strict=False):
        plot_overlay(image, global_heat_map.compute_word_heat_map(word), ax=ax, title=word, **overlay)
    for ax in axes[len(words) :]:
        ax.axis("off")
    return fig, axes


def draw_region(ax: Axes, heat_map: PixelHeatMap, image_size: tuple[int, int], color: str = "white") -> None:
    """Outline the region behind a self-attention map (box, contours or pixels) on ``ax``."""
    from matplotlib.patches import Polygon, Rectangle

    h, w = image_size
    gh, gw = heat_map.size
    sy, sx = h / gh, w / gw
    region = heat_map.region
    if region["kind"] == "box":
        x1, y1, x2, y2 = region["box"]
        ax.add_patch(Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy, fill=False, color=color, lw=2))
    elif region["kind"] == "contours":
        ch, cw = region["image_size"]
        for contour in region["contours"]:
            pts = np.asarray(contour, dtype=float) * [w / cw, h / ch]
            ax.add_patch(Polygon(pts, closed=True, fill=False, color=color, lw=2))
    else:
        weights = heat_map.weights.numpy()
        ax.contour(
            np.repeat(np.repeat(weights > 0, math.ceil(sy), 0), math.ceil(sx), 1)[:h, :w],
            levels=[0.5],
            colors=[color],
            linewidths=1.5,
        )


def plot_region(
    image: Any,
    heat_map: PixelHeatMap,
    axes: Any = None,
    title: str | None = None,
    **overlay: Any,
) -> tuple[Figure, Any]:
    """Two panels: the region drawn on the image, and its self-attention map over the image."""
    if axes is None:
        fig = _figure((8, 4))
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    size = image_size_of(image)
    axes[0].imshow(_as_array(image))
    draw_region(axes[0], heat_map, size)
    axes[0].set_title("region")
    axes[0].axis("off")
    plot_overlay(image, heat_map, ax=axes[1], title=title or f"self-attention ({heat_map.direction})", **overlay)
    draw_region(axes[1], heat_map, size)
    return fig, axes

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
    color_normalize: bool = True,
    figsize: tuple[float, float] | None = None,
) -> tuple[Figure, Axes]:
    """Draw ``heat_map`` expanded to ``image`` over the image; returns ``(fig, ax)``.

    ``color_normalize=False`` pins the colour scale to [0, 1] (DAAM's option) instead of stretching
    it to the values drawn; ``figsize`` sizes a new figure (ignored with ``ax``).
    """
    fig, ax = _fig_ax(ax, figsize or (5, 5))
    ax.imshow(_as_array(image))
    limits = {} if color_normalize else {"vmin": 0.0, "vmax": 1.0}
    values = heat_map.expand_as(image, absolute=absolute, threshold=threshold).numpy()
    ax.imshow(values, cmap=cmap, alpha=alpha, **limits)
    if title is None:
        title = getattr(heat_map, "word", None)
    if title:
        ax.set_title(title)
    ax.axis("off")
    return fig, ax


def _draw_outline(ax: Axes, mask: np.ndarray, color: str = "white") -> None:
    """The edge of a 0/1 mask, in ``color`` with a black rim: visible on any image."""
    from matplotlib import patheffects

    if not mask.any() or mask.all():
        return
    cs = ax.contour(mask, levels=[0.5], colors=[color], linewidths=1.5)
    cs.set_path_effects([patheffects.withStroke(linewidth=3.0, foreground="black")])


def plot_mask(
    image: Any,
    heat_map: HeatMap,
    threshold: float = 0.4,
    ax: Axes | None = None,
    color: tuple[float, float, float] | None = None,
    alpha: float = 0.55,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """The binary mask ``expand_as(image, threshold=threshold)`` over the image, with its edge outlined.

    By default the image keeps its colours inside the mask and is dimmed (black at ``alpha``) outside
    it, so the mask reads on an object of any colour; ``color=(r, g, b)`` fills the mask with that
    colour at ``alpha`` instead. Either way the mask's edge is drawn in white with a black rim.
    """
    fig, ax = _fig_ax(ax)
    mask = heat_map.expand_as(image, threshold=threshold).numpy()
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    if color is None:
        rgba[..., 3] = (1.0 - mask) * alpha
    else:
        rgba[..., :3] = color
        rgba[..., 3] = mask * alpha
    ax.imshow(_as_array(image))
    ax.imshow(rgba)
    _draw_outline(ax, mask)
    ax.set_title(title if title is not None else f"mask > {threshold:g}")
    ax.axis("off")
    return fig, ax


def plot_overlay_with_mask(
    image: Any,
    heat_map: HeatMap,
    threshold: float,
    axes: Any = None,
    title: str | None = None,
    **overlay: Any,
) -> tuple[Figure, Any]:
    """Two panels: the map over the image (:func:`plot_overlay`) and its mask at ``threshold``
    (:func:`plot_mask`)."""
    if axes is None:
        fig = _figure((8, 4))
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    plot_overlay(image, heat_map, ax=axes[0], title=title, **overlay)
    plot_mask(image, heat_map, threshold=threshold, ax=axes[1])
    return fig, axes


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
    """Outline the region behind a self-attention map (box, contours or pixels) on ``ax``, in ``color``
    with a black rim (visible on light and dark images alike)."""
    from matplotlib import patheffects
    from matplotlib.patches import Polygon, Rectangle

    rim: list[patheffects.AbstractPathEffect] = [patheffects.withStroke(linewidth=3.5, foreground="black")]
    h, w = image_size
    gh, gw = heat_map.size
    sy, sx = h / gh, w / gw
    region = heat_map.region
    if region["kind"] == "box":
        x1, y1, x2, y2 = region["box"]  # the covered cells' edges, half-open
        rect = Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy, fill=False, color=color, lw=2)
        rect.set_path_effects(rim)
        ax.add_patch(rect)
    elif region["kind"] == "contours":
        ch, cw = region["image_size"]
        for contour in region["contours"]:
            pts = np.asarray(contour, dtype=float) * [w / cw, h / ch]
            poly = Polygon(pts, closed=True, fill=False, color=color, lw=2)
            poly.set_path_effects(rim)
            ax.add_patch(poly)
    elif heat_map.weights is not None:
        weights = heat_map.weights.numpy()
        cs = ax.contour(
            np.repeat(np.repeat(weights > 0, math.ceil(sy), 0), math.ceil(sx), 1)[:h, :w],
            levels=[0.5],
            colors=[color],
            linewidths=1.5,
        )
        cs.set_path_effects(rim)


def plot_region(
    image: Any,
    heat_map: PixelHeatMap,
    axes: Any = None,
    title: str | None = None,
    threshold: float | None = None,
    **overlay: Any,
) -> tuple[Figure, Any]:
    """The region drawn on the image, and its self-attention map over the image, the region outlined
    on both; with ``threshold`` a third panel, the map's mask at that level (:func:`plot_mask`)."""
    panels = 2 if threshold is None else 3
    if axes is None:
        fig = _figure((4 * panels, 4))
        axes = fig.subplots(1, panels)
    else:
        fig = axes[0].figure
        if len(axes) < panels:
            why = " (the third for the mask at the threshold)" if threshold is not None else ""
            raise Daami2iError(f"plot_region needs {panels} axes{why}, got {len(axes)}")
    size = image_size_of(image)
    axes[0].imshow(_as_array(image))
    draw_region(axes[0], heat_map, size)
    axes[0].set_title("region")
    axes[0].axis("off")
    plot_overlay(image, heat_map, ax=axes[1], title=title or f"self-attention ({heat_map.direction})", **overlay)
    draw_region(axes[1], heat_map, size)
    if threshold is not None:
        plot_mask(image, heat_map, threshold=threshold, ax=axes[2])
        draw_region(axes[2], heat_map, size, color="yellow")
    return fig, axes


def plot_rounds(maps: list[Any], show: bool = False, cmap: str = "jet") -> tuple[Figure, Any]:
    """One panel per round of a diffused map (daam-i2i's ``plot_intermediate``): round 0 is the cut
    region map, the last panel the result. ``show=True`` draws it through pyplot (``plt.show()``), as
    daam-i2i does; otherwise a pyplot-free figure is returned."""
    n = len(maps)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    if show:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(2.2 * cols, 2.2 * rows))
    else:
        fig = _figure((2.2 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            m = maps[i]
            ax.imshow(m.detach().float().cpu().numpy() if hasattr(m, "detach") else np.asarray(m), cmap=cmap)
            ax.set_title(f"round {i}", fontsize=8)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig, axes

"""Plotting (matplotlib is imported lazily; figures are drawn on the caller's axes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .heatmaps.maps import HeatMap


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
    """Draw ``heat_map`` expanded to ``image`` over the image; returns ``(fig, ax)``.

    Global matplotlib state is left untouched: with ``ax=None`` a new figure is created with the
    object-oriented API (not pyplot), so nothing is shown or kept open behind the caller's back.
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]
    arr = np.asarray(image)
    ax.imshow(arr)
    ax.imshow(heat_map.expand_as(image, absolute=absolute, threshold=threshold).numpy(), cmap=cmap, alpha=alpha)
    if title is None:
        title = getattr(heat_map, "word", None)
    if title:
        ax.set_title(title)
    ax.axis("off")
    return fig, ax

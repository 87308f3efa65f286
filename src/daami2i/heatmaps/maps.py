"""Heat-map objects returned by queries: pixel/region maps, word maps and the global heat map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QueryError
from . import regions, selfattn
from .selfattn import Direction, SelfAttentionLevel
from .words import (
    CrossAttentionLayer,
    TokenStream,
    aggregate_layers,
    split_words,
    text_rows,
    token_rows,
    truncation_note,
)
from .words import (
    encoder_rows as _encoder_rows,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Size = tuple[int, int]


def image_size_of(image: Any) -> Size:
    """(height, width) of a PIL image, an (H, W[, C]) array, a (C, H, W) / (H, W) tensor or a size tuple."""
    if hasattr(image, "size") and hasattr(image, "mode") and not callable(image.size):  # PIL.Image
        w, h = image.size
        return int(h), int(w)
    if isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] in (1, 3, 4):
            return int(image.shape[1]), int(image.shape[2])
        if image.dim() == 2:
            return int(image.shape[0]), int(image.shape[1])
        raise QueryError(f"expected an image tensor (C, H, W) or (H, W), got shape {tuple(image.shape)}")
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            return int(image.shape[0]), int(image.shape[1])
        raise QueryError(f"expected an image array (H, W) or (H, W, C), got shape {image.shape}")
    if isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, (int, np.integer)) for v in image):
        return int(image[0]), int(image[1])
    raise QueryError(
        "expected a PIL image, an (H, W[, C]) array, a (C, H, W) tensor or a (height, width) tuple, "
        f"got {type(image).__name__}"
    )


class HeatMap:
    """A heat map on the latent grid.

    ``value`` (alias ``heatmap``) is the raw (h, w) float32 map; :meth:`expand_as` resizes it to an
    image for display.
    """

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value.detach().to("cpu", torch.float32)  # shape: (h, w)

    @property
    def heatmap(self) -> torch.Tensor:
        """The raw (h, w) map (DAAM's name for :attr:`value`)."""
        return self.value

    @property
    def size(self) -> Size:
        """(height, width) of the latent grid the map lives on."""
        return int(self.value.shape[0]), int(self.value.shape[1])

    def expand_as(self, image: Any, absolute: bool = False, threshold: float | None = None) -> torch.Tensor:
        """The map resized bicubically to the image's (height, width).

        By default it is min-max normalised to [0, 1] (``absolute=True`` keeps raw values); with a
        ``threshold`` it becomes a binary 0/1 mask of the normalised map above it.

        >>> import torch
        >>> HeatMap(torch.tensor([[0.0, 1.0], [2.0, 3.0]])).expand_as((4, 6)).shape
        torch.Size([4, 6])
        """
        if threshold is not None:
            regions.check_fraction(threshold)  # before any work
        h, w = image_size_of(image)
        im = F.interpolate(self.value[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        if not absolute:
            lo, span = im.min(), im.max() - im.min()
            im = (im - lo) / span if float(span) > 0 else torch.zeros_like(im)  # a flat map has no peak
        if threshold is not None:
            im = (im > regions.check_fraction(threshold)).float()
        return im

    def plot_overlay(self, image: Any, ax: Axes | None = None, **kwargs: Any) -> tuple[Figure, Axes]:
        """Draw the map over ``image`` on ``ax`` (a new figure if None); returns ``(fig, ax)``."""
        from ..viz import plot_overlay

        return plot_overlay(image, self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class PixelHeatMap(HeatMap):
    """A self-attention map for a region of the latent grid (pixels, box, contour, guide)."""

    def __init__(
        self, value: torch.Tensor, weights: torch.Tensor, direction: Direction, region: dict[str, Any] | None = None
    ) -> None:
        super().__init__(value)
        self.weights = weights  # shape: (h, w), the region weight map that produced this map
        self.direction = direction
        self.region = region or {"kind": "weights"}  # what the region was, for plots


class WordHeatMap(HeatMap):
    """A DAAM word map: where one word of the prompt acts in the image."""

    def __init__(self, value: torch.Tensor, word: str | None = None, word_idx: int | None = None) -> None:
        super().__init__(value)
        self.word = word
        self.word_idx = word_idx

    def compute_ioa(self, other: HeatMap | torch.Tensor) -> float:
        """Intersection over this map's area: ``sum(self * other) / sum(self)`` (DAAM's IoA).

        ``other`` may be a heat map on the same grid or a binary mask of any size (this map is then
        resized bicubically to the mask and binarised at 1, as DAAM does).
        """
        a = self.value
        b = other.value if isinstance(other, HeatMap) else torch.as_tensor(other, dtype=torch.float32)
        if b.dim() != 2:
            raise QueryError(f"compute_ioa expects a 2-D map or mask, got shape {tuple(b.shape)}")
        if a.shape != b.shape:
            a = F.interpolate(a[None, None], size=tuple(b.shape), mode="bicubic", align_corners=False)[0, 0]
            a = (a >= 1).float()
        return float((a * b).sum() / (a.sum() + 1e-8))

    def __repr__(self) -> str:
        return f"WordHeatMap(word={self.word!r}, size={self.size})"


class GlobalHeatMap:
    """Everything captured for one generated image; every query starts here.

    Pixel ids are row-major indices of the latent grid (``grid_size``, (height, width)); boxes are
    latent coordinates ``(x1, y1, x2, y2)`` with x the column, both corners inclusive (daam-i2i's
    meaning; ``half_open=True`` for Python-slice boxes); contours are
    ``[x, y]`` points in image pixels.
    """

    def __init__(
        self,
        grid_size: Size,
        self_levels: list[SelfAttentionLevel],
        cross_layers: list[CrossAttentionLayer],
        prompt: str | None = None,
        prompt_tokens: Sequence[str] | None = None,
        tokenizer: Any = None,
        image_size: Size | None = None,
        direction: Direction = "attended_by",
        streams: Sequence[TokenStream] | None = None,
    ) -> None:
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.self_levels = self_levels
        self.cross_layers = cross_layers
        self._row_cache: dict[int, torch.Tensor] = {}  # token row -> (h, w) aggregated map
        self.prompt = prompt
        # text streams whose tokens are attention keys: CLIP for UNets; CLIP and T5 for SD3; T5 for Flux
        if streams:
            self.streams = list(streams)
            tokenizer, prompt_tokens = self.streams[0].tokenizer, self.streams[0].tokens
        else:
            toks = list(prompt_tokens) if prompt_tokens is not None else None
            # CLIP keeps a start token, at most (rows - 2) prompt tokens and an end token: a longer prompt is cut
            n_rows = int(cross_layers[0].sums.shape[2]) if cross_layers else _encoder_rows(tokenizer)
            stop = n_rows - 1 if toks is not None and n_rows is not None and len(toks) + 2 > n_rows else None
            self.streams = [TokenStream("clip", tokenizer, toks, 1, stop)]
        self.prompt_tokens = list(prompt_tokens) if prompt_tokens is not None else None
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.direction = selfattn.check_direction(direction)

    # -- self-attention ("image to image") -----------------------------------------------------
    def _region(
        self, weights: torch.Tensor, direction: Direction | None, region: dict[str, Any] | None = None
    ) -> PixelHeatMap:
        d = selfattn.check_direction(direction or self.direction)
        return PixelHeatMap(selfattn.query(self.self_levels, weights, self.grid_size, d), weights, d, region)

    def compute_region_heat_map(self, weights: Any, direction: Direction | None = None) -> PixelHeatMap:
        """The primitive behind every self-attention query: columns weighted by ``weights / sum``."""
        return self._region(regions.guide_weights(weights, self.grid_size), direction)

    def compute_pixel_heat_map(self, pix_ids: Sequence[int] | int, direction: Direction | None = None) -> PixelHeatMap:
        """Mean self-attention map of a list of row-major latent pixel ids."""
        w = regions.pixel_weights(pix_ids, self.grid_size)
        return self._region(w, direction, {"kind": "pixels"})

    def compute_bbox_heat_map(
        self,
        x1: int,
        y1: int,
        x2: int,
        y2: int,
        direction: Direction | None = None,
        *,
        half_open: bool = False,
    ) -> PixelHeatMap:
        """Mean self-attention map of the latent box columns x1..x2, rows y1..y2 (both included, as in
        daam-i2i; a corner one past the last column / row is clipped). ``half_open=True``: columns
        [x1, x2), rows [y1, y2), like Python slices."""
        # "box": the covered cells' edges, half-open (what a plot draws); "corners": as the caller gave them
        cells = regions.box_cells(x1, y1, x2, y2, self.grid_size, half_open)
        w = regions.box_weights(*cells, self.grid_size, half_open=True)
        region = {"kind": "box", "box": cells, "corners": (x1, y1, x2, y2), "half_open": half_open}
        return self._region(w, direction, region)

    def compute_contour_heat_map(
        self,
        contour: Sequence[Sequence[float]],
        image_h: int,
        image_w: int,
        guide_heatmap: Any = None,
        direction: Direction | None = None,
    ) -> PixelHeatMap:
        """Self-attention map of the area inside a polygon given in image pixels ``[[x, y], ...]``."""
        return self.compute_segmentation_heat_map([contour], image_h, image_w, guide_heatmap, direction)

    def compute_segmentation_heat_map(
        self,
        contours: Sequence[Sequence[Sequence[float]]],
        image_h: int,
        image_w: int,
        guide_heatmap: Any = None,
        direction: Direction | None = None,
    ) -> PixelHeatMap:
        """Self-attention map of the union of several polygons, optionally weighted by a guide."""
        w = regions.polygon_weights(contours, (image_h, image_w), self.grid_size)
        if guide_heatmap is not None:
            w = w * regions.guide_weights(guide_heatmap, self.grid_size)
            if float(w.sum()) <= 0:
                raise QueryError("the guide is zero everywhere inside the contour(s): nothing to weight")
        region = {
            "kind": "contours",
            "contours": [list(map(list, c)) for c in contours],
            "image_size": (image_h, image_w),
        }
        return self._region(w, direction, region)

    def compute_guided_heat_map(self, guide_heatmap: Any, direction: Direction | None = None) -> PixelHeatMap:
        """Self-attention columns weighted by a guide map on the grid (e.g. a word map)."""
        return self._region(regions.guide_weights(guide_heatmap, self.grid_size), direction, {"kind": "guide"})

    def compute_diffused_heat_map(
        self,
        guide_heatmap: Any,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
    ) -> PixelHeatMap:
        """Iterated guided maps starting from a guide: each round's map, min-max normalised and
        cut below ``threshold``, guides the next round."""
        g = regions.guide_weights(guide_heatmap, self.grid_size)
        d = selfattn.check_direction(direction or self.direction)
        m = selfattn.diffuse(self.self_levels, g, self.grid_size, iterations, threshold, d)
        return PixelHeatMap(m, g, d)

    def compute_pixel_diffused_heat_map(
        self,
        pix_ids: Sequence[int] | int,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
    ) -> PixelHeatMap:
        """:meth:`compute_diffused_heat_map` starting from a list of latent pixel ids."""
        g = regions.pixel_weights(pix_ids, self.grid_size)
        d = selfattn.check_direction(direction or self.direction)
        m = selfattn.diffuse(self.self_levels, g, self.grid_size, iterations, threshold, d)
        return PixelHeatMap(m, g, d)

    def compute_all_diffused_heat_maps(
        self,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """The diffused map of every latent pixel at once: shape (h*w, h, w); row ``p`` equals
        ``compute_pixel_diffused_heat_map(p, iterations, threshold).heatmap`` (to float rounding).

        Uses the sparsity of the thresholded maps (see :func:`daami2i.heatmaps.selfattn.diffuse_all`);
        ``progress=True`` shows a progress bar over groups of pixels.
        """
        d = selfattn.check_direction(direction or self.direction)
        wrap = None
        if progress:
            from tqdm.auto import tqdm

            def wrap(it: Any) -> Any:
                return tqdm(it, desc="diffused maps", unit="group")

        return selfattn.diffuse_all(self.self_levels, self.grid_size, iterations, threshold, d, wrap=wrap)

    # -- cross-attention ("text to image", DAAM) -----------------------------------------------
    @property
    def token_maps(self) -> torch.Tensor:
        """Per-token maps, shape (tokens, h, w): DAAM's aggregation of the captured layers."""
        if not self.cross_layers:
            aggregate_layers(self.cross_layers, self.grid_size)  # raises the explanatory error
        return self._token_rows(range(self.cross_layers[0].sums.shape[2]))

    def _token_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """Maps of the given token rows, (len(rows), h, w); each row is aggregated once and cached."""
        missing = sorted({r for r in rows if r not in self._row_cache})
        if missing:
            for r, m in zip(missing, aggregate_layers(self.cross_layers, self.grid_size, missing).cpu(), strict=True):
                self._row_cache[r] = m
        return torch.stack([self._row_cache[r] for r in rows])

    @property
    def words(self) -> list[str]:
        """The prompt's distinct words the text encoder saw (sub-word tokens joined and decoded to text,
        punctuation dropped), in order; words past the cut of a long prompt are left out."""
        self.tokens  # raises the explanatory error when there is no prompt  # noqa: B018
        st = self.streams[0]
        return split_words(st.tokens or [], st.tokenizer, st.n_seen)

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens the text encoder saw (without start/end tokens), as the tokenizer writes them."""
        if self.prompt_tokens is None:
            raise QueryError(
                "this generation has no prompt text (it was run with prompt_embeds?): "
                "pass prompt=... to compute_global_heat_map to look words up"
            )
        return self.streams[0].seen_tokens or []

    @property
    def truncation(self) -> str | None:
        """None, or a sentence saying where the text encoder cut a prompt too long for it."""
        for st in self.streams:
            if st.truncated:
                return truncation_note(st)
        return None

    def compute_word_heat_map(
        self, word: str, word_idx: int | None = None, offset_idx: int = 0, stream: str | None = None
    ) -> WordHeatMap:
        """DAAM word map: mean of the per-token maps of ``word`` (every occurrence merged).

        Models with several text streams (SD3: ``"clip"`` and ``"t5"``) look the word up in each
        stream it occurs in and average the streams' maps; ``stream`` picks one. ``word_idx`` is a
        token position in the first stream (or in ``stream``).
        """
        if not self.cross_layers:
            aggregate_layers(self.cross_layers, self.grid_size)  # raises the explanatory error
        names = [st.name for st in self.streams]
        if stream is not None and stream not in names:
            raise QueryError(f"stream must be one of {names} for this model, got {stream!r}")
        use = [st for st in self.streams if stream is None or st.name == stream]
        if word_idx is not None:
            use = use[:1]
        n_rows = self.cross_layers[0].sums.shape[2]
        maps, misses = [], []
        for st in use:
            if st.tokenizer is None:
                raise QueryError("no tokenizer is attached to this heat map, so words cannot be looked up")
            if st.tokens is None:
                self.tokens  # raises the explanatory error  # noqa: B018
            try:
                stop = n_rows if st.stop_row is None else st.stop_row
                found = None
                if st.text is not None and word_idx is None and offset_idx == 0:
                    found = text_rows(st.tokenizer, st.text, word, st.first_row, stop, st.n_seen)
                rows = found or token_rows(
                    st.tokenizer, st.tokens or [], word, word_idx, offset_idx, stop, st.first_row, st.n_seen
                )
            except QueryError as err:
                if len(use) == 1:
                    raise
                misses.append(f"{st.name}: {err}")
                continue
            maps.append(self._token_rows(rows).mean(0))
        if not maps:
            raise QueryError(f"word {word!r} is in none of the text streams. " + " ".join(misses))
        return WordHeatMap(torch.stack(maps).mean(0), word, word_idx)

    def __repr__(self) -> str:
        return (
            f"GlobalHeatMap(prompt={self.prompt!r}, grid_size={self.grid_size}, "
            f"self_levels={[lv.size for lv in self.self_levels]}, cross_layers={len(self.cross_layers)})"
        )

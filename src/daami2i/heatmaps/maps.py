"""Heat-map objects returned by queries: pixel/region maps, word maps and the global heat map."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QueryError
from . import regions, selfattn, syntax
from .frames import FrameLayout
from .selfattn import Direction, SelfAttentionLevel
from .words import (
    CrossAttentionLayer,
    TokenStream,
    aggregate_layers,
    decode_tokens,
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


def video_size_of(frames: Any) -> tuple[int, Size]:
    """(frame count, (height, width)) of a video: a list of PIL images or (H, W[, C]) arrays, a (T, H, W,
    C) / (T, H, W) array or tensor (diffusers' ``output_type="np"`` / ``"pt"``: (T, H, W, C) / (T, C, H,
    W)), or a (frames, height, width) tuple."""
    if isinstance(frames, (tuple, list)) and len(frames) == 3 and all(isinstance(v, (int, np.integer)) for v in frames):
        return int(frames[0]), (int(frames[1]), int(frames[2]))
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise QueryError("expected the video's frames, got an empty list")
        sizes = {image_size_of(f) for f in frames}
        if len(sizes) != 1:
            raise QueryError(f"the video's frames differ in size: {sorted(sizes)[:4]}")
        return len(frames), sizes.pop()
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        t, a, b, c = (int(v) for v in frames.shape)
        if a in (1, 3, 4) and c not in (1, 3, 4):
            return t, (b, c)  # (T, C, H, W): diffusers' output_type="pt", as a tensor or an array
        if c in (1, 3, 4):
            return t, (a, b)  # (T, H, W, C)
        raise QueryError(
            f"a video of shape {tuple(frames.shape)} has no channel axis of 1, 3 or 4 first or last: expected "
            "(frames, H, W, C) or (frames, C, H, W)"
        )
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 3 and frames.shape[-1] not in (3, 4):
        return int(frames.shape[0]), (int(frames.shape[1]), int(frames.shape[2]))
    raise QueryError(
        "expected a video: a list of frames, a (frames, H, W[, C]) array or tensor, or a (frames, height, "
        f"width) tuple; got {type(frames).__name__} of shape {tuple(getattr(frames, 'shape', ()))}"
    )


_MAX_SIDE = 2**15  # pixels a side of an expanded map


def _check_target(size: Size) -> Size:
    """A size to expand a map to: positive sides of at most 2**15 pixels."""
    h, w = size
    if not (1 <= h <= _MAX_SIDE and 1 <= w <= _MAX_SIDE):
        raise QueryError(f"a map expands to sides of 1 to {_MAX_SIDE} pixels, got {h}x{w}")
    return h, w


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


class _Default(float):
    """A default value that can be told apart from the same number passed by the caller."""


class _DefaultInt(int):
    """An int default that can be told apart from the same number passed by the caller."""


_N_ITER = _DefaultInt(20)  # daam-i2i's n_iter default
_THRESH = _Default(0.02)  # daam-i2i's thresh default


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is now {new}(...): the name {old.split('(')[0]} has daam-i2i's meaning (method, n_iter, thresh, "
        "with an absolute thresh). Rename the call to keep this behaviour.",
        DeprecationWarning,
        stacklevel=3,
    )


def _old_spelling(
    first: Any, second: Any, third: Any, iterations: int | None, threshold: float | None, direction: Any
) -> tuple[int, float, Any]:
    """(iterations, threshold, direction) of a call in the earlier daami2i spelling
    ``(region, iterations=20, threshold=0.4, direction=None)``, from the slots they landed in."""
    if isinstance(first, str):  # (region, iterations=..., ...) with the method slot left as it is
        first = _N_ITER
    it = iterations if iterations is not None else (20 if first is _N_ITER else first)
    if threshold is None:
        threshold = 0.4 if isinstance(second, (_Default, _DefaultInt)) else second
    if isinstance(third, str) and direction is None:
        direction = third
    return it, threshold, direction  # type: ignore[return-value]


def _check_method(method: str) -> None:
    if method != "thresholding":
        raise QueryError(f"method must be 'thresholding' (daam-i2i's only diffusion method), got {method!r}")


def _bar(progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    def wrap(it: Any) -> Any:
        return tqdm(it, desc="diffused maps", unit="group")

    return wrap


def _from_pixel_maps(heat_maps: torch.Tensor, latent_hw: Any) -> tuple[Size, list[SelfAttentionLevel], list]:
    """daam-i2i's GlobalHeatMap(heat_maps, latent_hw): one level whose pixel ``k`` map is ``heat_maps[k]``."""
    if heat_maps.dim() != 3:
        raise QueryError(
            f"heat_maps must be (pixels, h, w), one map per latent pixel; got shape {tuple(heat_maps.shape)}"
        )
    k, h, w = heat_maps.shape
    if not regions._is_integer(latent_hw) or int(latent_hw) != k or h * w != k:
        raise QueryError(
            f"heat_maps of shape {tuple(heat_maps.shape)} need latent_hw = {h * w} (one map per pixel of the {h}x{w} "
            f"grid, as daam-i2i's compute_global_heat_map makes them); got latent_hw={latent_hw!r}"
        )
    sums = heat_maps.detach().to("cpu", torch.float32).reshape(k, k).T.contiguous()  # [query, key]
    return (h, w), [SelfAttentionLevel((h, w), sums, 1)], []


def _from_token_maps(heat_maps: torch.Tensor) -> tuple[Size, list[CrossAttentionLayer]]:
    """DAAM's GlobalHeatMap(tokenizer, prompt, heat_maps): the (tokens, h, w) maps as one layer of one head."""
    if heat_maps.dim() != 3:
        raise QueryError(f"heat_maps must be (tokens, h, w); got shape {tuple(heat_maps.shape)}")
    t, h, w = heat_maps.shape
    sums = heat_maps.detach().to("cpu", torch.float32).reshape(t, h * w).T[None].contiguous()  # (1, h*w, tokens)
    return (h, w), [CrossAttentionLayer("maps", (h, w), sums)]


def _prompt_tokens(tokenizer: Any, prompt: Any) -> list[str] | None:
    from .words import tokenize_prompt

    if not isinstance(prompt, str):
        raise QueryError(f"prompt must be a string, got {type(prompt).__name__}")
    return tokenize_prompt(tokenizer, prompt.lower()) if tokenizer is not None else None


class HeatMap:
    """A heat map on the latent grid.

    ``value`` is the raw (h, w) float32 map; :meth:`expand_as` resizes it to an image for display. A
    video's map (``frames`` set) holds its token frames stacked top to bottom: ``value`` is (frames * h,
    w), ``heatmap`` (frames, h, w), :meth:`frame` one video frame's map and :meth:`expand_as` the
    video's (num_frames, H, W).
    """

    def __init__(self, value: torch.Tensor, frames: FrameLayout | None = None) -> None:
        self.value = value.detach().to("cpu", torch.float32)  # shape: (h, w); video: (frames * h, w)
        self.frames = frames

    @property
    def heatmap(self) -> torch.Tensor:
        """The raw map (DAAM's name for :attr:`value`): (h, w), or (frames, h, w) for a video."""
        if self.frames is None:
            return self.value
        return self.value.view(self.frames.token_frames, self.frames.rows, self.value.shape[1])

    def frame(self, frame: int) -> HeatMap:
        """The map of video frame ``frame`` (that of the token frame it comes from) as an image map.

        >>> from daami2i.heatmaps.frames import FrameLayout
        >>> video = HeatMap(torch.arange(8.0).view(4, 2), FrameLayout.causal(2, rows=2, temporal=4))
        >>> video.heatmap.shape, video.frame(0).value.tolist(), video.frame(3).value.tolist()
        (torch.Size([2, 2, 2]), [[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]])
        """
        if self.frames is None:
            if frame in (0, -1):
                return self
            raise QueryError(f"this map is of an image (one frame), so frame must be 0, got {frame!r}")
        import copy

        out = copy.copy(self)
        t, rows = self.frames.token_frame(frame), self.frames.rows
        out.value, out.frames = self.heatmap[t].clone(), None
        weights = getattr(self, "weights", None)
        if isinstance(weights, torch.Tensor) and weights.shape[0] == self.value.shape[0]:
            out.weights = weights[t * rows : (t + 1) * rows].clone()  # type: ignore[attr-defined]
        return out

    @property
    def size(self) -> Size:
        """(height, width) of the latent grid the map lives on."""
        return int(self.value.shape[0]), int(self.value.shape[1])

    def expand_as(
        self, image: Any, absolute: bool = False, threshold: float | None = None, plot: bool = False, **plot_kwargs: Any
    ) -> torch.Tensor:
        """The map resized bicubically to the image's (height, width).

        By default it is min-max normalised to [0, 1] (``absolute=True`` keeps raw values); with a
        ``threshold`` it becomes a binary 0/1 mask of the normalised map above it. ``plot=True`` also
        draws it over the image (DAAM's keyword; ``plot_kwargs`` go to :meth:`plot_overlay`).

        >>> import torch
        >>> HeatMap(torch.tensor([[0.0, 1.0], [2.0, 3.0]])).expand_as((4, 6)).shape
        torch.Size([4, 6])
        """
        if threshold is not None:
            regions.check_fraction(threshold)  # before any work
        if not bool(torch.isfinite(self.value).all()):
            raise QueryError("this map holds NaN or infinite values, so it has no normalised picture")
        if self.frames is not None:
            return self._expand_video(image, absolute, threshold, plot, **plot_kwargs)
        h, w = _check_target(image_size_of(image))
        im = F.interpolate(self.value[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        if not absolute:
            lo, span = im.min(), im.max() - im.min()
            im = (im - lo) / span if float(span) > 0 else torch.zeros_like(im)  # a flat map has no peak
        if threshold is not None:
            im = (im > regions.check_fraction(threshold)).float()
        if plot:
            self.plot_overlay(image, absolute=absolute, threshold=threshold, **plot_kwargs)
        return im

    def _expand_video(
        self, video: Any, absolute: bool, threshold: float | None, plot: bool, **plot_kwargs: Any
    ) -> torch.Tensor:
        """A video map at the video's size: each token frame resized bicubically on its own, then
        repeated for the video frames it becomes, (num_frames, H, W); normalised over the whole video."""
        assert self.frames is not None
        if plot:
            raise QueryError("plot=True draws one image: expand the video map, then plot a frame (map.frame(t))")
        if (
            isinstance(video, (tuple, list))
            and len(video) == 2
            and all(isinstance(v, (int, np.integer)) for v in video)
        ):
            n, (h, w) = self.frames.video_frames, (int(video[0]), int(video[1]))
        else:
            n, (h, w) = video_size_of(video)
        h, w = _check_target((h, w))
        if n != self.frames.video_frames:
            raise QueryError(
                f"this map is of a video of {self.frames.video_frames} frames, but {n} frames were given: pass the "
                "frames this generation made (or a (height, width) size)"
            )
        per = F.interpolate(self.heatmap[:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
        im = per[torch.tensor(self.frames.source)]  # shape: (num_frames, H, W)
        if not absolute:
            lo, span = im.min(), im.max() - im.min()
            im = (im - lo) / span if float(span) > 0 else torch.zeros_like(im)
        if threshold is not None:
            im = (im > regions.check_fraction(threshold)).float()
        return im

    def plot_overlay(
        self,
        image: Any,
        out_file: str | Path | None = None,
        color_normalize: bool = True,
        ax: Axes | None = None,
        *,
        figsize: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> tuple[Figure, Axes]:
        """Draw the map over ``image`` on ``ax``; returns ``(fig, ax)``.

        Without ``ax`` it draws on a new pyplot figure of ``figsize``, so it shows in a notebook or
        window as the predecessors' plots do (:func:`daami2i.viz.plot_overlay` never touches pyplot).
        DAAM's arguments: ``out_file`` saves the figure there, ``color_normalize=False`` fixes the
        colour scale to [0, 1] (default: stretched to the map's range). daam-i2i's second positional
        argument, a ``figsize`` tuple, and matplotlib axes in that place are understood too. Other
        keywords go to :func:`daami2i.viz.plot_overlay` (``alpha``, ``cmap``, ``title``, ``absolute``, ...).
        """
        from ..viz import plot_overlay

        if self.frames is not None:
            raise QueryError("this is a video's map: plot one frame of it, map.frame(t).plot_overlay(frames[t])")
        if isinstance(out_file, tuple):  # daam-i2i: plot_overlay(image, figsize)
            out_file, figsize = None, out_file
        elif out_file is not None and not isinstance(out_file, (str, Path)) and hasattr(out_file, "imshow"):
            out_file, ax = None, out_file  # daami2i before 0.3: plot_overlay(image, ax)
        if ax is None:
            import matplotlib.pyplot as plt

            ax = plt.figure(figsize=figsize or (5, 5)).add_subplot()
        fig, ax = plot_overlay(image, self, ax=ax, color_normalize=color_normalize, **kwargs)
        if out_file is not None:
            fig.savefig(out_file, bbox_inches="tight", pad_inches=0)
        return fig, ax

    def compute_ioa(self, other: HeatMap | torch.Tensor) -> float:
        """Intersection over this map's area: ``sum(self * other) / sum(self)`` (DAAM's and daam-i2i's IoA).

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
        if self.frames is not None:
            return f"{type(self).__name__}(frames={self.frames.token_frames}, size={tuple(self.heatmap.shape[1:])})"
        return f"{type(self).__name__}(size={self.size})"

    def _repr_png_(self) -> bytes | None:
        """The map as a picture in Jupyter (drawn by :mod:`daami2i.display`)."""
        from ..display import repr_png

        return repr_png(self)


class PixelHeatMap(HeatMap):
    """A self-attention map for a region of the latent grid (pixels, box, contour, guide)."""

    def __init__(
        self,
        value: torch.Tensor,
        weights: torch.Tensor | None = None,
        direction: Direction = "attended_by",
        region: dict[str, Any] | None = None,
        frames: FrameLayout | None = None,
    ) -> None:
        super().__init__(value, frames)
        self.weights = weights  # shape: (h, w), the region weight map that produced this map (None: unknown)
        self.direction = direction
        self.region = region or {"kind": "weights"}  # what the region was, for plots
        self.intermediates: list[torch.Tensor] = []  # daam-i2i's diffused maps: each round's (h, w) map


class WordHeatMap(HeatMap):
    """A DAAM word map: where one word of the prompt acts in the image."""

    def __init__(
        self,
        value: torch.Tensor,
        word: str | None = None,
        word_idx: int | None = None,
        frames: FrameLayout | None = None,
    ) -> None:
        super().__init__(value, frames)
        self.word = word
        self.word_idx = word_idx

    def __repr__(self) -> str:
        if self.frames is not None:
            size = tuple(self.heatmap.shape[1:])
            return f"WordHeatMap(word={self.word!r}, frames={self.frames.token_frames}, size={size})"
        return f"WordHeatMap(word={self.word!r}, size={self.size})"


class GlobalHeatMap:
    """Everything captured for one generated image; every query starts here.

    Pixel ids are row-major indices of the latent grid (``grid_size``, (height, width)); boxes are
    latent coordinates ``(x1, y1, x2, y2)`` with x the column, both corners inclusive (daam-i2i's
    meaning; ``half_open=True`` for Python-slice boxes); contours are
    ``[x, y]`` points in image pixels.

    A video's heat map (``frames``, a :class:`~daami2i.heatmaps.frames.FrameLayout`) lives on its
    token frames stacked top to bottom (``grid_size`` is (frames * h, w)); pixel ids, boxes and
    contours then refer to one frame's grid (``frame_size``, (h, w)) and ``frame=`` says which video
    frame(s) they are in (None: the same region in every frame); maps come back with every frame.
    """

    def __init__(
        self,
        grid_size: Size | Any,
        self_levels: list[SelfAttentionLevel] | Any = None,
        cross_layers: list[CrossAttentionLayer] | Any = None,
        prompt: str | None = None,
        prompt_tokens: Sequence[str] | None = None,
        tokenizer: Any = None,
        image_size: Size | None = None,
        direction: Direction = "attended_by",
        streams: Sequence[TokenStream] | None = None,
        normalize: bool = False,
        self_note: str | None = None,
        frames: FrameLayout | None = None,
        temporal_levels: list[selfattn.TemporalLevel] | None = None,
    ) -> None:
        if isinstance(grid_size, torch.Tensor):  # daam-i2i: GlobalHeatMap(heat_maps (K, h, w), latent_hw)
            grid_size, self_levels, cross_layers = _from_pixel_maps(grid_size, self_levels)
        elif isinstance(cross_layers, torch.Tensor):  # DAAM: GlobalHeatMap(tokenizer, prompt, heat_maps (T, h, w))
            tokenizer, prompt = grid_size, self_levels  # type: ignore[assignment]
            grid_size, cross_layers = _from_token_maps(cross_layers)
            self_levels = []
            prompt_tokens = _prompt_tokens(tokenizer, prompt)
        elif self_levels is None or cross_layers is None:
            raise QueryError(
                "GlobalHeatMap takes (grid_size, self_levels, cross_layers, ...), daam-i2i's (heat_maps, latent_hw) "
                "or DAAM's (tokenizer, prompt, heat_maps); most code gets one from trc.compute_global_heat_map()"
            )
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        if frames is not None and frames.token_frames * frames.rows != self.grid_size[0]:
            raise QueryError(
                f"a frame layout of {frames.token_frames} frames of {frames.rows} rows does not fit the grid "
                f"{self.grid_size}"
            )
        self.frames = frames  # video: how the stacked grid splits into frames; None for an image
        self.temporal_levels = list(temporal_levels or [])  # AnimateDiff's motion modules, per resolution
        self.normalize = bool(normalize)  # DAAM: word maps divided by the sum over the prompt's token maps
        self.self_note = self_note  # why self-attention is missing (a head / layer selection), if it is
        self._pixel_maps: torch.Tensor | None = None  # daam-i2i's heat_maps, built on first use
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
    def _levels(self) -> list[SelfAttentionLevel]:
        if not self.self_levels and self.self_note:
            raise QueryError(self.self_note)
        return self.self_levels

    def _region(
        self, weights: torch.Tensor, direction: Direction | None, region: dict[str, Any] | None = None
    ) -> PixelHeatMap:
        d = selfattn.check_direction(direction or self.direction)
        value = selfattn.query(self._levels(), weights, self.grid_size, d)
        return PixelHeatMap(value, weights, d, region, self.frames)

    # -- video frames ---------------------------------------------------------------------------
    @property
    def frame_size(self) -> Size:
        """(height, width) of one frame's grid: ``grid_size`` for an image, (h, w) of a token frame for a video."""
        if self.frames is None:
            return self.grid_size
        return self.frames.rows, self.grid_size[1]

    def _token_frames(self, frame: Any) -> list[int]:
        """The token frames ``frame`` selects (see the class docstring); an image has one."""
        if self.frames is None:
            if frame is None or (
                not isinstance(frame, bool) and isinstance(frame, (int, np.integer)) and frame in (0, -1)
            ):
                return [0]
            raise QueryError(f"frame= is for videos; this heat map is of an image (one frame), got frame={frame!r}")
        return self.frames.token_frames_of(frame)

    def _place(self, weights: torch.Tensor, frame: Any) -> torch.Tensor:
        """One frame's (h, w) region weights put into the selected frames of the stacked grid."""
        chosen = self._token_frames(frame)
        if self.frames is None:
            return weights
        rows = self.frames.rows
        out = torch.zeros(self.grid_size, dtype=weights.dtype)
        for t in chosen:
            out[t * rows : (t + 1) * rows] = weights
        return out

    def compute_temporal_attention(
        self,
        pixels: Sequence[int] | int | None = None,
        *,
        frame: int,
        box: tuple[int, int, int, int] | None = None,
        weights: Any = None,
        direction: Direction = "attends_to",
    ) -> torch.Tensor:
        """AnimateDiff's motion modules: how a region of video frame ``frame`` attends across time, a
        (video frames,) curve (see :func:`daami2i.heatmaps.selfattn.temporal_query`). The region is
        ``pixels`` (row-major ids of one frame's grid), a ``box`` (x1, y1, x2, y2, corners included) or
        ``weights`` ((h, w) on one frame's grid); ``"attends_to"`` gives where its pixels look,
        ``"attended_by"`` how much each frame's same pixels look at it.
        """
        given = [v is not None for v in (pixels, box, weights)]
        if sum(given) != 1:
            raise QueryError("give the region as exactly one of pixels=, box= or weights=")
        if self.frames is None or not self.temporal_levels:
            raise QueryError(
                "this heat map has no temporal attention: it is captured from AnimateDiff's motion modules "
                "(trace an AnimateDiffPipeline with self_attention=True)"
            )
        size = self.frame_size
        if pixels is not None:
            g = regions.pixel_weights(pixels, size)
        elif box is not None:
            g = regions.box_weights(*regions.box_cells(*box, size), size, half_open=True)
        else:
            g = regions.guide_weights(weights, size)
        t = self.frames.token_frame(frame)
        curve = selfattn.temporal_query(self.temporal_levels, g, t, selfattn.check_direction(direction))
        return curve[torch.tensor(self.frames.source)].cpu()

    def _guide(self, guide: Any, frame: Any = None) -> torch.Tensor:
        """A guide as weights on the stacked grid. A video takes a video map, a (token frames, h, w) or
        (video frames, h, w) tensor (video frames averaged per token frame), the stacked (frames * h, w)
        grid, or one frame's (h, w) map placed in the frames ``frame`` selects; ``frame`` restricts a
        whole-video guide to those frames."""
        if self.frames is None:
            self._token_frames(frame)
            return regions.guide_weights(guide, self.grid_size)
        lay, (rows, w) = self.frames, self.frame_size
        value = guide.value if isinstance(guide, HeatMap) else guide
        try:
            g = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise QueryError(f"a guide must be a heat map or a tensor, got {type(guide).__name__}") from exc
        if g.dim() == 2 and tuple(g.shape) == (rows, w) and rows != self.grid_size[0]:
            return regions.guide_weights(self._place(g, frame), self.grid_size)
        if g.dim() == 3 and tuple(g.shape[1:]) == (rows, w):
            if g.shape[0] == lay.video_frames and g.shape[0] != lay.token_frames:
                src = torch.tensor(lay.source)
                g = torch.stack([g[src == t].mean(0) for t in range(lay.token_frames)])
            elif g.shape[0] != lay.token_frames:
                raise QueryError(
                    f"a video guide must have {lay.token_frames} token frames or {lay.video_frames} video frames of "
                    f"{(rows, w)}, got {tuple(g.shape)}"
                )
            g = g.reshape(self.grid_size)
        elif g.dim() == 3:
            raise QueryError(
                f"a video guide must be (frames, {rows}, {w}) (token or video frames), got {tuple(g.shape)}"
            )
        if frame is not None and tuple(g.shape) == self.grid_size:
            keep = self._place(torch.ones(rows, w), frame)
            g = g * keep
        return regions.guide_weights(g, self.grid_size)

    # -- daam-i2i's view: one map per latent pixel ----------------------------------------------
    @property
    def latent_h(self) -> int:
        """Height of the latent grid pixel ids refer to (daam-i2i's name; ``grid_size[0]``)."""
        return self.grid_size[0]

    @property
    def latent_w(self) -> int:
        """Width of the latent grid pixel ids refer to (daam-i2i's name; ``grid_size[1]``)."""
        return self.grid_size[1]

    @property
    def inner_latent_h(self) -> int:
        """daam-i2i: the height of the grid the maps live on; here always the latent grid."""
        return self.grid_size[0]

    @property
    def inner_latent_w(self) -> int:
        """daam-i2i: the width of the grid the maps live on; here always the latent grid."""
        return self.grid_size[1]

    @property
    def scale_factor(self) -> int:
        """daam-i2i: ``latent_h // inner_latent_h``; 1, since maps always live on the latent grid."""
        return self.latent_h // self.inner_latent_h

    def scale_correction(self, pixel_ids: Sequence[int]) -> list[int]:
        """daam-i2i: latent pixel ids mapped to ids of the inner grid (the identity here, scale factor 1)."""
        f, w, iw = self.scale_factor, self.latent_w, self.inner_latent_w
        return [(int(p) // w // f) * iw + (int(p) % w) // f for p in pixel_ids]

    @property
    def heat_maps(self) -> torch.Tensor:
        """daam-i2i's ``heat_maps``: every latent pixel's map, shape (h*w, h, w); ``heat_maps[p]`` equals
        ``compute_pixel_heat_map(p).value``. Built on first use (h*w*h*w floats: 64 MiB at 64x64).

        DAAM's ``heat_maps`` (one map per token) is :attr:`token_maps` here.
        """
        if self._pixel_maps is None:
            h, w = self.grid_size
            n = h * w
            levels = self._levels()
            out = torch.empty(n, h, w)
            for start in range(0, n, 1024):
                ids = torch.arange(start, min(n, start + 1024))
                eye = torch.zeros(len(ids), n)
                eye[torch.arange(len(ids)), ids] = 1.0
                out[start : start + len(ids)] = selfattn.query(
                    levels, eye.view(-1, h, w), self.grid_size, self.direction
                ).cpu()
            self._pixel_maps = out
        return self._pixel_maps

    def inner_pixel_ids(self, pts: Sequence[Any], image_h: int, image_w: int) -> list[int]:
        """daam-i2i's pixels of a contour: the row-major ids of the latent pixels strictly inside it.

        ``pts`` is ``[[x, y], ...]`` or flat ``[x1, y1, x2, y2, ...]`` in image pixels; as in daam-i2i,
        points are scaled to the latent grid and truncated to integers, and a latent pixel (column i,
        row j) is inside when OpenCV's ``pointPolygonTest`` puts (i, j) strictly inside. (daam-i2i
        requires square images; here x and y are scaled by width and height separately.) The contour
        queries weight cells by the area they share with the polygon instead (see
        :func:`daami2i.heatmaps.regions.polygon_weights`).
        """
        try:
            import cv2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise QueryError("inner_pixel_ids uses OpenCV: pip install 'daami2i[datasets]'") from exc
        image_h, image_w = regions._check_image_size((image_h, image_w))
        poly = regions._as_polygon(pts, (image_h, image_w), 0)
        h, w = self.grid_size
        scaled = np.stack([poly[:, 0] * w / image_w, poly[:, 1] * h / image_h], 1).astype(np.int32).reshape(-1, 1, 2)
        return [
            j * w + i
            for i in range(w)
            for j in range(h)
            if cv2.pointPolygonTest(scaled, (float(i), float(j)), False) == 1.0
        ]

    def compute_region_heat_map(
        self, weights: Any, direction: Direction | None = None, *, frame: Any = None
    ) -> PixelHeatMap:
        """The primitive behind every self-attention query: columns weighted by ``weights / sum``."""
        return self._region(self._guide(weights, frame), direction)

    def compute_pixel_heat_map(
        self, latent_pixels: Sequence[int] | int, direction: Direction | None = None, *, frame: Any = None
    ) -> PixelHeatMap:
        """Mean self-attention map of a list of row-major latent pixel ids (or one id); a video's ids are
        of one frame's grid, in the video frame(s) ``frame``."""
        w = self._place(regions.pixel_weights(latent_pixels, self.frame_size), frame)
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
        frame: Any = None,
    ) -> PixelHeatMap:
        """Mean self-attention map of the latent box columns x1..x2, rows y1..y2 (both included, as in
        daam-i2i; a corner one past the last column / row is clipped). ``half_open=True``: columns
        [x1, x2), rows [y1, y2), like Python slices. A video's box is in one frame's grid, in the video
        frame(s) ``frame``."""
        # "box": the covered cells' edges, half-open (what a plot draws); "corners": as the caller gave them
        cells = regions.box_cells(x1, y1, x2, y2, self.frame_size, half_open)
        w = self._place(regions.box_weights(*cells, self.frame_size, half_open=True), frame)
        region = {"kind": "box", "box": cells, "corners": (x1, y1, x2, y2), "half_open": half_open}
        if self.frames is not None:
            region["token_frames"] = self._token_frames(frame)  # of the stacked grid (not video frames)
        return self._region(w, direction, region)

    def compute_contour_heat_map(
        self,
        pts: Sequence[Any],
        image_h: int,
        image_w: int,
        guide_heatmap: Any = None,
        direction: Direction | None = None,
        *,
        frame: Any = None,
    ) -> PixelHeatMap:
        """Self-attention map of the area inside a polygon given in image pixels, ``[[x, y], ...]`` or
        daam-i2i's flat ``[x1, y1, x2, y2, ...]`` (a video's: of one frame, in the frame(s) ``frame``)."""
        return self.compute_segmentation_heat_map([pts], image_h, image_w, guide_heatmap, direction, frame=frame)

    def compute_segmentation_heat_map(
        self,
        segments: Sequence[Sequence[Any]],
        image_h: int,
        image_w: int,
        guide_heatmap: Any = None,
        direction: Direction | None = None,
        *,
        frame: Any = None,
    ) -> PixelHeatMap:
        """Self-attention map of the union of several polygons (each ``[[x, y], ...]`` or flat), in image
        pixels, optionally weighted by a guide (a video's polygons: of one frame, in the frame(s) ``frame``)."""
        w = self._place(regions.polygon_weights(segments, (image_h, image_w), self.frame_size), frame)
        if guide_heatmap is not None:
            w = w * self._guide(guide_heatmap)
            if float(w.sum()) <= 0:
                raise QueryError("the guide is zero everywhere inside the contour(s): nothing to weight")
        region = {
            "kind": "contours",
            "contours": [np.asarray(c, dtype=np.float64).reshape(-1, 2).tolist() for c in segments],
            "image_size": (image_h, image_w),
        }
        return self._region(w, direction, region)

    def compute_guided_heat_map(
        self, guide_heatmap: Any, direction: Direction | None = None, *, frame: Any = None
    ) -> PixelHeatMap:
        """Self-attention columns weighted by a guide map on the grid (e.g. a word map; for a video, see
        the class docstring: ``frame`` keeps the guide's weight in those video frames only)."""
        return self._region(self._guide(guide_heatmap, frame), direction, {"kind": "guide"})

    def compute_grown_heat_map(
        self,
        guide_heatmap: Any,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
        *,
        frame: Any = None,
    ) -> PixelHeatMap:
        """Iterated guided maps starting from a guide (``iterations`` queries in all): each round's map,
        min-max normalised and cut below the fraction ``threshold``, guides the next round, so the
        region grows through self-attention where the map is strong. (daam-i2i's fixed, absolute cut is
        :meth:`compute_pixel_diffused_heat_map` / :meth:`compute_diffused_heat_map`.)"""
        g = self._guide(guide_heatmap, frame)
        d = selfattn.check_direction(direction or self.direction)
        m = selfattn.diffuse(self._levels(), g, self.grid_size, iterations, threshold, d)
        return PixelHeatMap(m, g, d, frames=self.frames)

    def compute_pixel_grown_heat_map(
        self,
        pix_ids: Sequence[int] | int,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
        *,
        frame: Any = None,
    ) -> PixelHeatMap:
        """:meth:`compute_grown_heat_map` starting from a list of latent pixel ids (a video's: of one
        frame's grid, in the frame(s) ``frame``)."""
        g = self._place(regions.pixel_weights(pix_ids, self.frame_size), frame)
        d = selfattn.check_direction(direction or self.direction)
        m = selfattn.diffuse(self._levels(), g, self.grid_size, iterations, threshold, d)
        return PixelHeatMap(m, g, d, frames=self.frames)

    def compute_all_grown_heat_maps(
        self,
        iterations: int = 20,
        threshold: float = 0.4,
        direction: Direction | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """The grown map of every latent pixel at once: shape (h*w, h, w); row ``p`` equals
        ``compute_pixel_grown_heat_map(p, iterations, threshold).heatmap`` (to float rounding).

        Uses the sparsity of the thresholded maps (see :func:`daami2i.heatmaps.selfattn.diffuse_all`);
        ``progress=True`` shows a progress bar over groups of pixels.
        """
        d = selfattn.check_direction(direction or self.direction)
        return selfattn.diffuse_all(self._levels(), self.grid_size, iterations, threshold, d, wrap=_bar(progress))

    def compute_all_diffused_heat_maps(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Deprecated name of :meth:`compute_all_grown_heat_maps` (same arguments)."""
        _deprecated("compute_all_diffused_heat_maps(iterations, threshold)", "compute_all_grown_heat_maps")
        return self.compute_all_grown_heat_maps(*args, **kwargs)

    def compute_pixel_diffused_heat_map(
        self,
        latent_pixel_id: Sequence[int] | int,
        method: str = "thresholding",
        n_iter: int = _N_ITER,
        thresh: float = _THRESH,
        plot_intermediate: bool = False,
        *,
        direction: Direction | None = None,
        iterations: int | None = None,
        threshold: float | None = None,
        frame: Any = None,
    ) -> PixelHeatMap:
        """daam-i2i's diffused map of latent pixel(s): the pixel map, cut, then ``n_iter`` rounds of
        guided maps, each cut again (``cut``: values below ``min(map) + thresh`` set to 0; ``thresh``
        is absolute, in units of attention summed over the captured steps). ``plot_intermediate=True``
        draws every round; the rounds' maps are kept in the result's ``intermediates``.

        The earlier daami2i meaning (``iterations=``, ``threshold=`` as a fraction of the min-max
        range) is :meth:`compute_pixel_grown_heat_map`; that spelling still works, with a warning.
        """
        if iterations is not None or threshold is not None or not isinstance(method, str):
            it, th, direction = _old_spelling(method, n_iter, thresh, iterations, threshold, direction)
            _deprecated(
                "compute_pixel_diffused_heat_map(pix_ids, iterations, threshold)", "compute_pixel_grown_heat_map"
            )
            return self.compute_pixel_grown_heat_map(latent_pixel_id, it, th, direction, frame=frame)
        _check_method(method)
        g = self._place(regions.pixel_weights(latent_pixel_id, self.frame_size), frame)
        d = selfattn.check_direction(direction or self.direction)
        rounds = selfattn.diffuse_absolute(self._levels(), g, self.grid_size, n_iter, thresh, d)
        out = PixelHeatMap(rounds[-1], g, d, {"kind": "pixels"}, self.frames)
        out.intermediates = rounds
        if plot_intermediate:
            from ..viz import plot_rounds

            plot_rounds(rounds, show=True)
        return out

    def compute_diffused_heat_map(
        self,
        method: str = "thresholding",
        n_iter: int = _N_ITER,
        thresh: float = _THRESH,
        *,
        direction: Direction | None = None,
        progress: bool = False,
        iterations: int | None = None,
        threshold: float | None = None,
    ) -> GlobalHeatMap:
        """daam-i2i's diffused global heat map: :meth:`compute_pixel_diffused_heat_map` of every latent
        pixel at once, as a new :class:`GlobalHeatMap` whose pixel ``p`` map is pixel ``p``'s diffused
        map (pixel, box, contour and guided queries then combine diffused maps; word maps are kept).

        Computed on the sparsity of the cut maps (see :func:`daami2i.heatmaps.selfattn.diffuse_all`);
        ``progress=True`` shows a progress bar. The earlier daami2i meaning,
        ``compute_diffused_heat_map(guide, iterations, threshold)``, is :meth:`compute_grown_heat_map`;
        that spelling still works, with a warning.
        """
        if iterations is not None or threshold is not None or not isinstance(method, str):
            it, th, direction = _old_spelling(n_iter, thresh, _N_ITER, iterations, threshold, direction)
            _deprecated("compute_diffused_heat_map(guide, iterations, threshold)", "compute_grown_heat_map")
            return self.compute_grown_heat_map(method, it, th, direction)  # type: ignore[return-value]
        _check_method(method)
        d = selfattn.check_direction(direction or self.direction)
        maps = selfattn.diffuse_all(
            self._levels(), self.grid_size, n_iter, thresh, d, wrap=_bar(progress), absolute=True
        )
        n = maps.shape[0]
        flat = maps.reshape(n, n)  # pixel p's map, flattened
        # a pixel map is a column of S ("attended_by") or a row ("attends_to"): orient so that stays true
        sums = flat.T.contiguous() if d == "attended_by" else flat
        out = GlobalHeatMap(
            self.grid_size,
            [SelfAttentionLevel(self.grid_size, sums, 1)],
            self.cross_layers,
            prompt=self.prompt,
            prompt_tokens=self.prompt_tokens,
            tokenizer=self.tokenizer,
            image_size=self.image_size,
            direction=d,
            streams=self.streams,
            normalize=self.normalize,
            frames=self.frames,
        )
        out._row_cache = self._row_cache
        out._pixel_maps = maps.cpu()
        return out

    # -- cross-attention ("text to image", DAAM) -----------------------------------------------
    @property
    def token_maps(self) -> torch.Tensor:
        """Per-token maps, shape (tokens, h, w): DAAM's aggregation of the captured layers."""
        if not self.cross_layers:
            aggregate_layers(self.cross_layers, self.grid_size)  # raises the explanatory error
        return self._token_rows(range(self.cross_layers[0].sums.shape[2]))  # (normalised with normalize=True)

    def _token_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """Maps of the given token rows, (len(rows), h, w); with ``normalize`` divided by the sum over
        the prompt's token maps (DAAM; start and end tokens left out)."""
        out = self._aggregated(rows)
        if self.normalize:
            st = self.streams[0]
            n_rows = int(self.cross_layers[0].sums.shape[2])
            seen = st.n_seen if st.n_seen is not None else n_rows - st.first_row - 1
            words = list(range(st.first_row, min(n_rows, st.first_row + seen)))
            if words:
                out = out / (self._aggregated(words).sum(0) + 1e-6)
        return out

    def _aggregated(self, rows: Sequence[int]) -> torch.Tensor:
        """DAAM's aggregation of the given token rows, (len(rows), h, w); each row is computed once and cached."""
        missing = sorted({r for r in rows if r not in self._row_cache})
        if missing:
            frames = self.frames.token_frames if self.frames is not None else 1
            maps = aggregate_layers(self.cross_layers, self.grid_size, missing, frames).cpu()
            for r, m in zip(missing, maps, strict=True):
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

    def _word_rows(
        self, word: str, word_idx: int | None, offset_idx: int, stream: str | None
    ) -> list[tuple[TokenStream, list[int]]]:
        """(stream, token rows) of ``word`` in each stream it occurs in (``stream`` picks one)."""
        names = [st.name for st in self.streams]
        if stream is not None and stream not in names:
            raise QueryError(f"stream must be one of {names} for this model, got {stream!r}")
        use = [st for st in self.streams if stream is None or st.name == stream]
        if word_idx is not None:
            use = use[:1]
        n_rows = self.cross_layers[0].sums.shape[2]
        found_rows, misses = [], []
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
            found_rows.append((st, list(rows)))
        if not found_rows:
            raise QueryError(f"word {word!r} is in none of the text streams. " + " ".join(misses))
        return found_rows

    def _text_layers(self, relation: str) -> list[CrossAttentionLayer]:
        """The captured layers holding the ``"text->image"`` or ``"text->text"`` store (else an error
        saying how to capture them)."""
        attr = "text_image" if relation == "text->image" else "text_text"
        layers = [c for c in self.cross_layers if getattr(c, attr) is not None]
        if not layers:
            raise QueryError(
                f"the {relation} relation was not captured: trace with "
                f"daami2i.trace(pipe, relations=['image->text', 'image->image', '{relation}']) (joint-attention "
                "models only), and do not restrict heads or steps (these stores are head means over all steps)"
            )
        return layers

    def compute_text_query_heat_map(
        self, word: str, word_idx: int | None = None, offset_idx: int = 0, stream: str | None = None
    ) -> WordHeatMap:
        """Text -> image: where ``word``'s tokens, as queries, look in the image (joint attention; needs
        ``trace(relations=[..., "text->image"])``). The mean over the word's tokens and the captured
        joint layers of their attention probabilities over the image tokens, summed over steps; streams
        the word occurs in are averaged, as in :meth:`compute_word_heat_map`, whose arguments it takes.
        """
        layers = self._text_layers("text->image")
        maps = []
        for _st, rows in self._word_rows(word, word_idx, offset_idx, stream):
            per_layer = []
            for c in layers:
                assert c.text_image is not None
                m = c.text_image[rows].mean(0).reshape(c.size)  # (h, w) of the layer's grid
                if tuple(c.size) != self.grid_size:
                    m = F.interpolate(m[None, None], size=self.grid_size, mode="bilinear", align_corners=False)[0, 0]
                per_layer.append(m)
            maps.append(torch.stack(per_layer).mean(0))
        return WordHeatMap(torch.stack(maps).mean(0).cpu(), word, word_idx, self.frames)

    def text_to_text(self, stream: str | None = None) -> tuple[list[str], torch.Tensor]:
        """Text -> text: the prompt's tokens the encoder saw (of the first stream, or ``stream``; each
        decoded to its text, ``"red"`` for ``"Ġred"``) and their attention among each other, a
        (tokens, tokens) matrix whose row i is where token i's query looks (the mean over captured
        joint layers, summed over steps; needs
        ``trace(relations=[..., "text->text"])``). Entries cover these tokens' keys only, so a row
        sums to less than one (the image and the other text keys take the rest)."""
        layers = self._text_layers("text->text")
        names = [st.name for st in self.streams]
        if stream is not None and stream not in names:
            raise QueryError(f"stream must be one of {names} for this model, got {stream!r}")
        st = next(s for s in self.streams if stream is None or s.name == stream)
        if st.tokens is None:
            self.tokens  # raises the explanatory error  # noqa: B018
        rows = list(range(st.first_row, st.first_row + (st.n_seen or 0)))
        idx = torch.tensor(rows, dtype=torch.long)
        mats = []
        for c in layers:
            assert c.text_text is not None
            t = c.text_text.cpu()
            mats.append(t.index_select(0, idx).index_select(1, idx))
        labels = [decode_tokens(st.tokenizer, [t]).strip() or t for t in st.seen_tokens or []]
        return labels, torch.stack(mats).mean(0)

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
        maps = [self._token_rows(rows).mean(0) for _st, rows in self._word_rows(word, word_idx, offset_idx, stream)]
        return WordHeatMap(torch.stack(maps).mean(0), word, word_idx, self.frames)

    def parsed_heat_maps(self, doc: Any = None, nlp: Any = None) -> Iterator[syntax.ParsedHeatMap]:
        """DAAM's ``parsed_heat_maps``: the word map of each spaCy token of the prompt that is found
        (see :func:`daami2i.heatmaps.syntax.parsed_heat_maps`; ``doc`` / ``nlp`` give the parse)."""
        return syntax.parsed_heat_maps(self, doc, nlp)

    def dependency_relations(self, doc: Any = None, nlp: Any = None) -> Iterator[syntax.SyntacticHeatMapPair]:
        """DAAM's ``dependency_relations``: head and dependent word maps of every non-root token
        (see :func:`daami2i.heatmaps.syntax.dependency_relations`)."""
        return syntax.dependency_relations(self, doc, nlp)

    def __repr__(self) -> str:
        return (
            f"GlobalHeatMap(prompt={self.prompt!r}, grid_size={self.grid_size}, "
            f"self_levels={[lv.size for lv in self.self_levels]}, cross_layers={len(self.cross_layers)})"
        )

    def _repr_png_(self) -> bytes | None:
        """The prompt's word maps as a picture in Jupyter (drawn by :mod:`daami2i.display`)."""
        from ..display import repr_png

        return repr_png(self)

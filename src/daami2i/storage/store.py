"""Online aggregation of captured attention, per generation, image, kind and resolution.

Everything is float32 at native resolution:

* self-attention: one (N_r x N_r) sum per resolution and image, over the captured layers and
  steps of the head-mean probabilities (512x512 SD-2-base, highest resolution only: 64 MiB);
* cross-attention: one (heads x N_r x tokens) sum per layer and image, over the captured steps
  (DAAM clamps each upsampled (layer, head) map before averaging, so heads are kept apart).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import QueryError, TraceError
from ..heatmaps.frames import FrameLayout
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.resample import cell_counts, cell_sum
from ..heatmaps.selfattn import Direction, SelfAttentionLevel, TemporalLevel
from ..heatmaps.words import CrossAttentionLayer, TokenStream, tokenize_prompt

Size = tuple[int, int]

_DEFAULTS: dict[str, Any] = {"prompt": None, "factors": None, "head_idx": None, "layer_idx": None, "normalize": False}


def predecessor_arguments(args: tuple[Any, ...], **given: Any) -> tuple[Any, Any, Any, Any, bool]:
    """``compute_global_heat_map``'s arguments, checked: ``(prompt, factors, head_idx, layer_idx, normalize)``.

    Positional ``args`` follow DAAM, ``(prompt, factors, head_idx, layer_idx, normalize)``, or, when
    the first is not a string, daam-i2i, ``(factors, head_idx, layer_idx, normalize)``; ``given`` are
    the keywords.

    >>> predecessor_arguments(([1], None, 0))
    (None, [1], None, 0, False)
    """
    values = {name: given.get(name, default) for name, default in _DEFAULTS.items()}
    if args:
        daam_i2i = args[0] is not None and not isinstance(args[0], str)
        names = ("factors", "head_idx", "layer_idx", "normalize") if daam_i2i else tuple(_DEFAULTS)
        if len(args) > len(names):
            raise TypeError(
                f"compute_global_heat_map takes at most {len(names)} positional arguments "
                f"({', '.join(names)}), got {len(args)}"
            )
        for name, value in zip(names, args, strict=False):
            if values[name] is not _DEFAULTS[name]:
                raise TypeError(f"compute_global_heat_map got multiple values for argument {name!r}")
            values[name] = value
    prompt, factors = values["prompt"], values["factors"]
    if prompt is not None and not isinstance(prompt, str):
        raise QueryError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(factors, (str, bytes)) or (factors is not None and not isinstance(factors, Iterable)):
        raise QueryError(f"factors must be an iterable of resolution factors such as [1] or (1, 2), got {factors!r}")
    for name in ("head_idx", "layer_idx"):
        v = values[name]
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 0):
            raise QueryError(f"{name} must be None or a non-negative integer, got {v!r}")
    if not isinstance(values["normalize"], (bool, np.bool_)):
        raise QueryError(f"normalize must be True or False, got {values['normalize']!r}")
    head = None if values["head_idx"] is None else int(values["head_idx"])
    layer = None if values["layer_idx"] is None else int(values["layer_idx"])
    return prompt, factors, head, layer, bool(values["normalize"])


@dataclass
class SelfAttentionStore:
    """Self-attention of one resolution, for every image of a generation."""

    factor: int
    size: Size  # (h, w)
    sums: torch.Tensor  # shape: (n_images, h*w, h*w) float32, [image, query, key]
    layers: list[str] = field(default_factory=list)
    # trace(keep_heads=True): per layer, shape (n_images, kept heads, h*w, h*w) float32, heads ordered
    # half-major over the kept guidance halves (uncond heads first with halves="both", as daam-i2i)
    per_head: dict[str, torch.Tensor] | None = None
    # a pooled store (trace(self_pool=p), long videos): ``size`` is the cell grid of p x p token
    # cells of each of ``frames`` stacked frames of the token grid ``tokens``; sums hold the cell means
    # on both sides, D^-1 P S P^T D^-1 (see daami2i.heatmaps.selfattn)
    pool: int = 1
    frames: int = 1
    tokens: Size | None = None  # (frames * h, w) token grid of a pooled store
    # frame-batch video (AnimateDiff): frames never attend to each other; sums holds each frame's block,
    # shape (n_images, frames, h/frames*w, h/frames*w), and ``size`` is the frames stacked
    blocks: bool = False
    _cells: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _pooled(self, start: int, stop: int, mean: torch.Tensor) -> None:
        """Add head-mean probabilities (n_images, stop - start, N) of token query rows [start, stop)
        as cell means: keys averaged per cell, each query row added to its cell with 1 / its count."""
        assert self.tokens is not None
        if self._cells is None:
            counts = cell_counts(self.tokens, self.frames, self.pool, mean.device)
            h, w = self.tokens[0] // self.frames, self.tokens[1]
            hc, wc = self.size[0] // self.frames, self.size[1]
            f, y, x = torch.meshgrid(*(torch.arange(n, device=mean.device) for n in (self.frames, h, w)), indexing="ij")
            cell_of = ((f * hc + y // self.pool) * wc + x // self.pool).flatten()  # token -> its cell, integers
            self._cells = (counts, cell_of)
        counts, cell_of = self._cells
        n_img, r, _ = mean.shape
        keys = cell_sum(mean.reshape(n_img, r, *self.tokens), self.frames, self.pool).reshape(n_img, r, -1)
        rows = cell_of[start:stop]
        keys.div_(counts).mul_(counts.index_select(0, rows).reciprocal()[None, :, None])
        self.sums.index_add_(1, rows.to(self.sums.device), keys.to(self.sums.device))

    def add_heads(self, layer: str, start: int, stop: int, probs: torch.Tensor) -> None:
        """Keep ``probs`` (n_images, kept heads, stop - start, N) of ``layer`` head by head."""
        assert self.per_head is not None
        n_img, k, _, n = probs.shape
        if layer not in self.per_head:
            self.per_head[layer] = torch.zeros(n_img, k, n, n, device=self.sums.device)
        self.per_head[layer][:, :, start:stop] += probs.to(self.sums.device)

    def add(self, layer: str, start: int, stop: int, probs: torch.Tensor) -> None:
        """Add head-mean probabilities (n_images, stop - start, N) for query rows [start, stop)."""
        if layer not in self.layers:
            self.layers.append(layer)
        if self.pool > 1:
            self._pooled(start, stop, probs)
            return
        self.sums[:, start:stop] += probs

    def add_mean(self, layer: str, start: int, stop: int, probs: torch.Tensor) -> None:
        """Add the mean over dim 1 of ``probs`` (n_images, k, stop - start, N) for query rows [start, stop).

        Head by head into the store, in place: no (n_images, stop - start, N) temporary is zero-filled
        and written, which is a sizeable share of the capture's time on attention-dominated models.
        """
        if layer not in self.layers:
            self.layers.append(layer)
        if self.pool > 1:
            self._pooled(start, stop, probs.mean(1))
            return
        target = self.sums[:, start:stop]
        k = probs.shape[1]
        for j in range(k):
            target.add_(probs[:, j], alpha=1.0 / k)


@dataclass
class TemporalStore:
    """Temporal self-attention of one resolution (AnimateDiff's motion modules), for every video."""

    factor: int
    size: Size  # (h, w) of one frame at this resolution
    sums: torch.Tensor  # shape: (n_images, h*w, frames, frames) float32, [video, pixel, query frame, key frame]
    layers: list[str] = field(default_factory=list)


@dataclass
class CrossAttentionStore:
    """Cross-attention of one layer, kept per head, for every image of a generation."""

    layer: str
    factor: int
    size: Size  # (h, w)
    sums: torch.Tensor  # shape: (n_images, heads, h*w, tokens) float32
    # optional, one entry per captured step: shape (n_images, heads, h*w, step_tokens) float32
    per_step: list[torch.Tensor] | None = None
    step_tokens: int = 0  # token rows kept per step (start token + prompt tokens + end token)
    last_step: int = -1  # the step the newest per-step entry belongs to
    # joint layers, when trace(relations=...) asks for them: the kept text tokens as *queries*, head
    # means summed over steps; text -> image: shape (n_images, tokens, h*w); text -> text: shape
    # (n_images, tokens, tokens), both over the same token columns as ``sums``
    text_image: torch.Tensor | None = None
    text_text: torch.Tensor | None = None

    def add(self, start: int, stop: int, probs: torch.Tensor, step: int = 0) -> None:
        """Add probabilities (n_images, heads, stop - start, tokens) of ``step`` for query rows [start, stop)."""
        self.sums[:, :, start:stop] += probs
        if self.per_step is not None:
            if step != self.last_step:
                self.last_step = step
                n_img, heads, n_q, _ = self.sums.shape
                self.per_step.append(self.sums.new_zeros(n_img, heads, n_q, self.step_tokens))
            self.per_step[-1][:, :, start:stop] += probs[..., : self.step_tokens]


@dataclass
class Generation:
    """What one pipeline call inside a trace captured."""

    index: int
    grid_size: Size
    prompts: list[str | None] | None = None  # as passed to the pipeline (one per prompt)
    latent_size: Size | None = None
    image_size: Size | None = None
    n_images: int = 0
    cfg: bool = False
    halves: str = "cond"
    steps_run: int = 0
    steps_captured: list[int] = field(default_factory=list)
    image_prompts: list[str | None] = field(default_factory=list)
    image_tokens: list[list[str] | None] = field(default_factory=list)
    self_attention: dict[int, SelfAttentionStore] = field(default_factory=dict)
    cross_attention: dict[str, CrossAttentionStore] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the trace options, for the record
    images: list[Any] = field(default_factory=list)  # the pipeline's output images (PIL), when seen
    # joint models (SD3, Flux): text streams, each {"name", "tokenizer" (pipeline attribute),
    # "first_row", "stop_row" (rows of the stored text keys), "tokens" (per image)}; empty for UNets
    streams: list[dict[str, Any]] = field(default_factory=list)
    # video: how the stacked grid (frames * rows, columns) splits into frames; None for images
    frames: FrameLayout | None = None
    # AnimateDiff: each pixel's attention across frames, per resolution factor
    temporal: dict[int, TemporalStore] = field(default_factory=dict)

    def nbytes(self, kind: str = "all") -> int:
        """Bytes held by the stores of ``kind`` ("self", "cross", "cross_steps", "text" or "all")."""
        total = 0
        if kind in ("self", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.self_attention.values())
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.temporal.values())
            total += sum(
                t.numel() * t.element_size() for s in self.self_attention.values() for t in (s.per_head or {}).values()
            )
        if kind in ("cross", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.cross_attention.values())
        if kind in ("cross_steps", "all"):
            total += sum(t.numel() * t.element_size() for s in self.cross_attention.values() for t in s.per_step or [])
        if kind in ("text", "all"):
            total += sum(
                t.numel() * t.element_size()
                for s in self.cross_attention.values()
                for t in (s.text_image, s.text_text)
                if t is not None
            )
        return total

    def check_finite(self) -> None:
        """A TraceError when a store holds NaN or infinite sums: the pipeline's attention overflowed
        (an extreme guidance scale, fp16 overflow), and every map of it would be meaningless."""
        stores = [("self-attention", f"factor {f}", st.sums) for f, st in self.self_attention.items()]
        stores += [("cross-attention", name, st.sums) for name, st in self.cross_attention.items()]
        for kind, where, sums in stores:
            if not bool(torch.isfinite(sums).all()):
                raise TraceError(
                    f"the captured {kind} ({where}) holds NaN or infinite values: the pipeline's attention "
                    "overflowed (an extreme guidance scale? float16 overflow?), so its maps would mean nothing; "
                    "generate again with a normal guidance scale, or in float32"
                )

    def check_image(self, image_idx: int) -> None:
        if not isinstance(image_idx, int) or not 0 <= image_idx < self.n_images:
            raise QueryError(
                f"image_idx must be in [0, {self.n_images - 1}] (this generation made {self.n_images} image(s)), "
                f"got {image_idx!r}"
            )

    @staticmethod
    def _check_factors(factors: Iterable[int] | None, available: set[int], kind: str) -> set[int]:
        if factors is None:
            return available
        wanted = {int(f) for f in factors}
        missing = wanted - available
        if missing:
            raise QueryError(
                f"{kind}-attention was not captured at factor(s) {sorted(missing)}; captured: {sorted(available)}"
            )
        return wanted

    def heat_map(
        self,
        image_idx: int = 0,
        tokenizer: Any = None,
        prompt: str | None = None,
        factors: Iterable[int] | None = None,
        direction: Direction = "attended_by",
        steps: Iterable[int] | None = None,
        tokenizers: dict[str, Any] | None = None,
        layers: Iterable[str] | None = None,
        *,
        head_idx: int | None = None,
        self_layers: Iterable[str] | None = None,
        normalize: bool = False,
    ) -> GlobalHeatMap:
        """The :class:`GlobalHeatMap` of one image; ``steps`` restricts word maps to those steps
        (needs per-step cross-attention, ``trace(..., cross_steps=True)``); ``tokenizers`` maps the
        pipeline attribute names of joint models' streams (``"tokenizer_3"``, ...) to tokenizers;
        ``layers`` restricts word maps to those captured cross-attention (or joint) layers.

        ``head_idx`` keeps one head (word maps: head ``h`` of each layer; self-attention: the kept head
        ``h``, see :meth:`self_levels`), ``self_layers`` restricts self-attention to those layers, and
        ``normalize`` divides as the predecessors do (see :meth:`Trace.compute_global_heat_map`).
        """
        self.check_image(image_idx)
        grid = self.grid_size
        if factors is not None:
            factors = sorted({int(f) for f in factors})
            one = self.self_attention.get(factors[0]) if len(factors) == 1 else None
            if one is not None and one.pool == 1:  # daam-i2i: one factor, no interpolation
                grid = self.self_attention[factors[0]].size
        note = None
        try:
            levels = (
                self.self_levels(image_idx, factors, head_idx, self_layers, normalize) if self.self_attention else []
            )
        except QueryError as err:  # heads / layers chosen but not kept: word maps work, self-attention says why
            if head_idx is None and self_layers is None:
                raise
            levels, note = [], str(err)
        note = note or self._self_note(levels, head_idx, self_layers)
        cross = self.cross_layers(image_idx, factors, steps, layers, head_idx) if self.cross_attention else []
        if self.streams:
            streams = []
            for st in self.streams:
                tok = (tokenizers or {}).get(st["tokenizer"])
                toks = st["tokens"][image_idx]
                text = st["prompts"][image_idx] if st.get("prompts") else None
                if prompt is not None and tok is not None:
                    toks, text = tokenize_prompt(tok, prompt.lower() if st["name"] == "clip" else prompt), prompt
                clip = st["name"] == "clip"
                streams.append(
                    TokenStream(
                        st["name"], tok, toks, int(st["first_row"]), int(st["stop_row"]), None if clip else text
                    )
                )
            return GlobalHeatMap(
                grid_size=grid,
                self_levels=levels,
                cross_layers=cross,
                prompt=prompt
                if prompt is not None
                else (self.image_prompts[image_idx] if self.image_prompts else None),
                image_size=self.image_size,
                direction=direction,
                streams=streams,
                normalize=normalize,
                self_note=note,
                frames=self.frames,
                temporal_levels=self.temporal_levels(image_idx),
            )
        tokens = self.image_tokens[image_idx] if self.image_tokens else None
        text = self.image_prompts[image_idx] if self.image_prompts else None
        if prompt is not None:
            if tokenizer is None:
                raise QueryError("no tokenizer is available to split the given prompt")
            text, tokens = prompt, tokenize_prompt(tokenizer, prompt.lower())
        return GlobalHeatMap(
            grid_size=grid,
            self_levels=levels,
            cross_layers=cross,
            prompt=text,
            prompt_tokens=tokens,
            tokenizer=tokenizer,
            image_size=self.image_size,
            direction=direction,
            normalize=normalize,
            self_note=note,
            frames=self.frames,
            temporal_levels=self.temporal_levels(image_idx),
        )

    def temporal_levels(self, image_idx: int) -> list[TemporalLevel]:
        """The temporal self-attention of one video, one level per captured resolution (AnimateDiff)."""
        return [
            TemporalLevel(st.size, st.sums[image_idx], len(st.layers))
            for _f, st in sorted(self.temporal.items())
            if st.layers
        ]

    def _self_note(
        self, levels: list[SelfAttentionLevel], head_idx: int | None, layers: Iterable[str] | None
    ) -> str | None:
        """Why a heat map restricted to heads / layers has no self-attention (None when it has some)."""
        if levels or not self.self_attention:
            return None
        captured = sorted({n for s in self.self_attention.values() for n in s.layers})
        return (
            f"no self-attention was captured for head_idx={head_idx}, layers={list(layers) if layers else None}: "
            f"the captured self-attention layers are {captured}"
        )

    def self_levels(
        self,
        image_idx: int,
        factors: Iterable[int] | None = None,
        head_idx: int | None = None,
        layers: Iterable[str] | None = None,
        normalize: bool = False,
    ) -> list[SelfAttentionLevel]:
        """The self-attention of one image, one level per captured resolution.

        ``head_idx`` / ``layers`` select what daam-i2i's ``head_idx`` / ``layer_idx`` select (needs
        ``trace(keep_heads=True)``): the kept head ``head_idx`` of every layer (with ``halves="both"``,
        ``head_idx < heads`` is a head of the unconditional half, as daam-i2i orders its batch), and the
        mean over the layers. ``normalize`` divides each query row by its sum (+ 1e-6), as daam-i2i does.
        """
        self.check_image(image_idx)
        use = self._check_factors(factors, set(self.self_attention), "self")
        wanted = None if layers is None else set(layers)
        out = []
        for f, s in sorted(self.self_attention.items()):
            if f not in use or not s.layers:
                continue
            if head_idx is None and wanted is None:
                sums, n = s.sums[image_idx], len(s.layers)
            else:
                if s.per_head is None:
                    n_maps = len(s.layers) * s.sums.shape[1] ** 2
                    raise QueryError(
                        "head_idx / layer_idx select self-attention heads and layers, but this trace kept "
                        "self-attention only as the mean over heads and layers: trace with keep_heads=True "
                        f"(it keeps one {s.size[0] * s.size[1]}x{s.size[0] * s.size[1]} map per layer and head, "
                        f"{n_maps * 4 / 2**20:.0f} MiB per head here)"
                    )
                parts = []
                for name in s.layers:
                    if wanted is not None and name not in wanted:
                        continue
                    per = s.per_head[name][image_idx]  # (kept heads, N, N)
                    if head_idx is None:
                        parts.append(per.mean(0))
                    elif 0 <= head_idx < per.shape[0]:
                        parts.append(per[head_idx])
                if not parts:
                    continue
                sums, n = torch.stack(parts).sum(0), len(parts)
            if normalize:  # daam-i2i: G / (sum over keys of G + 1e-6), G = sums / n
                if s.blocks:
                    sums = sums / (sums.sum(-1, keepdim=True) / n + 1e-6)
                elif s.pool > 1:  # cell means: a query cell's mass is its row weighted by the key cells' sizes
                    assert s.tokens is not None
                    counts = cell_counts(s.tokens, s.frames, s.pool, sums.device)
                    sums = sums / ((sums * counts).sum(1, keepdim=True) / n + 1e-6)
                else:
                    sums = sums / (sums.sum(1, keepdim=True) / n + 1e-6)
            frames = self.frames.token_frames if self.frames else 1
            out.append(SelfAttentionLevel(s.size, sums, n, frames, s.pool, s.blocks))
        return out

    def cross_layers(
        self,
        image_idx: int,
        factors: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
        head_idx: int | None = None,
    ) -> list[CrossAttentionLayer]:
        """Cross-attention of one image per captured layer; ``head_idx`` keeps head ``h`` of each layer
        that has one (DAAM's ``head_idx``: heads of the kept guidance half, 0 to heads - 1)."""
        out = self._cross_layers(image_idx, factors, steps, layers)
        if head_idx is None:
            return out
        return [
            CrossAttentionLayer(c.name, c.size, c.sums[head_idx : head_idx + 1])
            for c in out
            if 0 <= head_idx < c.sums.shape[0]
        ]

    def _cross_layers(
        self,
        image_idx: int,
        factors: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
    ) -> list[CrossAttentionLayer]:
        self.check_image(image_idx)
        use = self._check_factors(factors, {s.factor for s in self.cross_attention.values()}, "cross")
        stores = [s for s in self.cross_attention.values() if s.factor in use]
        if layers is not None:
            names = [layers] if isinstance(layers, str) else list(layers)
            unknown = [n for n in names if n not in self.cross_attention]
            if unknown or not names:
                raise QueryError(
                    f"layers must name captured cross-attention layers; unknown: {unknown or names}, "
                    f"captured: {list(self.cross_attention)}"
                )
            stores = [s for s in stores if s.layer in set(names)]
        if steps is None:
            return [
                CrossAttentionLayer(
                    s.layer,
                    s.size,
                    s.sums[image_idx],
                    None if s.text_image is None else s.text_image[image_idx],
                    None if s.text_text is None else s.text_text[image_idx],
                )
                for s in stores
            ]
        wanted = {int(t) for t in steps}
        positions = [i for i, t in enumerate(self.steps_captured) if t in wanted]
        if any(s.per_step is None for s in stores):
            raise QueryError(
                "word maps for chosen steps need per-step cross-attention: trace with cross_steps=True "
                "(self-attention steps are chosen before the run with trace(steps=...))"
            )
        if not positions:
            raise QueryError(f"none of the steps {sorted(wanted)} was captured; captured steps: {self.steps_captured}")
        return [
            CrossAttentionLayer(s.layer, s.size, torch.stack([s.per_step[i][image_idx] for i in positions]).sum(0))
            for s in stores
            if s.per_step is not None
        ]

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

import torch

from ..errors import QueryError, TraceError
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.selfattn import Direction, SelfAttentionLevel
from ..heatmaps.words import CrossAttentionLayer, TokenStream, tokenize_prompt

Size = tuple[int, int]


@dataclass
class SelfAttentionStore:
    """Self-attention of one resolution, for every image of a generation."""

    factor: int
    size: Size  # (h, w)
    sums: torch.Tensor  # shape: (n_images, h*w, h*w) float32, [image, query, key]
    layers: list[str] = field(default_factory=list)

    def add(self, layer: str, start: int, stop: int, probs: torch.Tensor) -> None:
        """Add head-mean probabilities (n_images, stop - start, N) for query rows [start, stop)."""
        if layer not in self.layers:
            self.layers.append(layer)
        self.sums[:, start:stop] += probs

    def add_mean(self, layer: str, start: int, stop: int, probs: torch.Tensor) -> None:
        """Add the mean over dim 1 of ``probs`` (n_images, k, stop - start, N) for query rows [start, stop).

        Head by head into the store, in place: no (n_images, stop - start, N) temporary is zero-filled
        and written, which is a sizeable share of the capture's time on attention-dominated models.
        """
        if layer not in self.layers:
            self.layers.append(layer)
        target = self.sums[:, start:stop]
        k = probs.shape[1]
        for j in range(k):
            target.add_(probs[:, j], alpha=1.0 / k)


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

    def nbytes(self, kind: str = "all") -> int:
        """Bytes held by the stores of ``kind`` ("self", "cross", "cross_steps" or "all")."""
        total = 0
        if kind in ("self", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.self_attention.values())
        if kind in ("cross", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.cross_attention.values())
        if kind in ("cross_steps", "all"):
            total += sum(t.numel() * t.element_size() for s in self.cross_attention.values() for t in s.per_step or [])
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
    ) -> GlobalHeatMap:
        """The :class:`GlobalHeatMap` of one image; ``steps`` restricts word maps to those steps
        (needs per-step cross-attention, ``trace(..., cross_steps=True)``); ``tokenizers`` maps the
        pipeline attribute names of joint models' streams (``"tokenizer_3"``, ...) to tokenizers;
        ``layers`` restricts word maps to those captured cross-attention (or joint) layers."""
        self.check_image(image_idx)
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
                grid_size=self.grid_size,
                self_levels=self.self_levels(image_idx, factors) if self.self_attention else [],
                cross_layers=self.cross_layers(image_idx, factors, steps, layers) if self.cross_attention else [],
                prompt=prompt
                if prompt is not None
                else (self.image_prompts[image_idx] if self.image_prompts else None),
                image_size=self.image_size,
                direction=direction,
                streams=streams,
            )
        tokens = self.image_tokens[image_idx] if self.image_tokens else None
        text = self.image_prompts[image_idx] if self.image_prompts else None
        if prompt is not None:
            if tokenizer is None:
                raise QueryError("no tokenizer is available to split the given prompt")
            text, tokens = prompt, tokenize_prompt(tokenizer, prompt.lower())
        return GlobalHeatMap(
            grid_size=self.grid_size,
            self_levels=self.self_levels(image_idx, factors) if self.self_attention else [],
            cross_layers=self.cross_layers(image_idx, factors, steps, layers) if self.cross_attention else [],
            prompt=text,
            prompt_tokens=tokens,
            tokenizer=tokenizer,
            image_size=self.image_size,
            direction=direction,
        )

    def self_levels(self, image_idx: int, factors: Iterable[int] | None = None) -> list[SelfAttentionLevel]:
        self.check_image(image_idx)
        use = self._check_factors(factors, set(self.self_attention), "self")
        return [
            SelfAttentionLevel(s.size, s.sums[image_idx], len(s.layers))
            for f, s in sorted(self.self_attention.items())
            if f in use and s.layers
        ]

    def cross_layers(
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
            return [CrossAttentionLayer(s.layer, s.size, s.sums[image_idx]) for s in stores]
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

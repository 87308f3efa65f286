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

import torch

from ..errors import QueryError
from ..heatmaps.selfattn import SelfAttentionLevel
from ..heatmaps.words import CrossAttentionLayer

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


@dataclass
class CrossAttentionStore:
    """Cross-attention of one layer, kept per head, for every image of a generation."""

    layer: str
    factor: int
    size: Size  # (h, w)
    sums: torch.Tensor  # shape: (n_images, heads, h*w, tokens) float32

    def add(self, start: int, stop: int, probs: torch.Tensor) -> None:
        """Add probabilities (n_images, heads, stop - start, tokens) for query rows [start, stop)."""
        self.sums[:, :, start:stop] += probs


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

    def nbytes(self, kind: str = "all") -> int:
        """Bytes held by the stores of ``kind`` ("self", "cross" or "all")."""
        total = 0
        if kind in ("self", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.self_attention.values())
        if kind in ("cross", "all"):
            total += sum(s.sums.numel() * s.sums.element_size() for s in self.cross_attention.values())
        return total

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

    def self_levels(self, image_idx: int, factors: Iterable[int] | None = None) -> list[SelfAttentionLevel]:
        self.check_image(image_idx)
        use = self._check_factors(factors, set(self.self_attention), "self")
        return [
            SelfAttentionLevel(s.size, s.sums[image_idx], len(s.layers))
            for f, s in sorted(self.self_attention.items())
            if f in use and s.layers
        ]

    def cross_layers(self, image_idx: int, factors: Iterable[int] | None = None) -> list[CrossAttentionLayer]:
        self.check_image(image_idx)
        use = self._check_factors(factors, {s.factor for s in self.cross_attention.values()}, "cross")
        return [
            CrossAttentionLayer(s.layer, s.size, s.sums[image_idx])
            for s in self.cross_attention.values()
            if s.factor in use
        ]

"""Self-attention queries: one weighted-column primitive serves every region kind.

Let ``A_r`` be the stored sum, over captured layers and steps, of the head-mean self-attention
probabilities at resolution r (queries x keys, ``N_r x N_r``), ``U_r`` the bicubic upsampling of
resolution r to the grid, and ``L`` the number of captured layers. The self-attention matrix on the
grid is ``S = sum_r U_r A_r U_r^T / L``. A query with weight map ``g`` returns

* ``S g / sum(g)`` (direction ``"attended_by"``, the seed's default: how much each pixel attends
  to the region; a pixel map is a column of S), or
* ``S^T g / sum(g)`` (direction ``"attends_to"``: where the region's pixels look).

``U_r^T g`` is computed with the adjoint of the upsampling, so ``S`` is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import QueryError
from .resample import adjoint, upsample

Direction = Literal["attended_by", "attends_to"]
DIRECTIONS: tuple[str, ...] = ("attended_by", "attends_to")
Size = tuple[int, int]


@dataclass(frozen=True)
class SelfAttentionLevel:
    """Aggregated self-attention of one resolution for one image."""

    size: Size  # (h, w) of this resolution
    sums: torch.Tensor  # shape: (h*w, h*w) float32, [query, key], summed over layers and steps
    n_layers: int


def check_direction(direction: str) -> Direction:
    if direction not in DIRECTIONS:
        raise QueryError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction  # type: ignore[return-value]


def query(
    levels: list[SelfAttentionLevel],
    weights: torch.Tensor,
    grid: Size,
    direction: Direction = "attended_by",
) -> torch.Tensor:
    """Weighted combination of self-attention maps: ``S g / sum(g)`` on the grid.

    ``weights`` is (h, w) or a batch (B, h, w) of non-negative maps on the grid; the result has the
    same shape. ``direction`` picks columns (``"attended_by"``) or rows (``"attends_to"``) of S.
    """
    check_direction(direction)
    if not levels:
        raise QueryError("no self-attention was captured: trace with self_attention=True to use self-attention queries")
    batched = weights.dim() == 3
    g = weights if batched else weights.unsqueeze(0)
    device = levels[0].sums.device
    g = g.to(device=device, dtype=torch.float32)
    g = g / g.sum(dim=(-2, -1), keepdim=True)
    total = torch.zeros(g.shape[0], *grid, device=device)
    n_layers = 0
    for level in levels:
        h, w = level.size
        gr = adjoint(g, level.size).reshape(g.shape[0], h * w)  # (B, N_r)
        # column direction: m[q] = sum_k A[q, k] g[k]  ->  m = g @ A^T ; rows: m[k] = sum_q g[q] A[q, k]
        m = gr @ level.sums.T if direction == "attended_by" else gr @ level.sums
        total += upsample(m.view(-1, h, w), grid)
        n_layers += level.n_layers
    total /= n_layers
    return total if batched else total[0]


def threshold_normalised(m: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Min-max normalise ``m`` to [0, 1] and zero values below ``threshold``; None if ``m`` is flat."""
    lo, hi = m.min(), m.max()
    if float(hi - lo) <= 1e-12 * max(1.0, float(hi.abs())):
        return None
    g = (m - lo) / (hi - lo)
    return torch.where(g >= threshold, g, torch.zeros_like(g))


def diffuse(
    levels: list[SelfAttentionLevel],
    weights: torch.Tensor,
    grid: Size,
    iterations: int,
    threshold: float,
    direction: Direction = "attended_by",
) -> torch.Tensor:
    """Iterated guided maps: ``m_1 = S g``, then ``m_{t+1} = S T(m_t)`` for ``iterations`` steps in all.

    ``T`` min-max normalises a map and zeroes the values below ``threshold``, so the region grows
    through self-attention only where the current map is strong.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise QueryError(f"iterations must be a positive integer, got {iterations!r}")
    if not 0.0 <= float(threshold) < 1.0:
        raise QueryError(f"threshold must be in [0, 1) (applied to the min-max normalised map), got {threshold!r}")
    m = query(levels, weights, grid, direction)
    for _ in range(iterations - 1):
        g = threshold_normalised(m, float(threshold))
        if g is None:  # a flat map has no region to grow
            break
        m = query(levels, g, grid, direction)
    return m

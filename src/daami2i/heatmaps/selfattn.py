"""Self-attention queries: one weighted-column primitive serves every region kind.

Let ``A_r`` be the stored sum, over captured layers and steps, of the head-mean self-attention
probabilities at resolution r (queries x keys, ``N_r x N_r``), ``U_r`` the bicubic upsampling of
resolution r to the grid, and ``L`` the number of captured layers. The self-attention matrix on the
grid is ``S = sum_r U_r A_r U_r^T / L``. A query with weight map ``g`` returns

* ``S g / sum(g)`` (direction ``"attended_by"``, the seed's default: how much each pixel attends
  to the region; a pixel map is a column of S), or
* ``S^T g / sum(g)`` (direction ``"attends_to"``: where the region's pixels look).

``U_r^T g`` is computed with the adjoint of the upsampling, so ``S`` is never formed.

A pooled level (``pool = p > 1``, long videos) holds ``A = D^-1 P S P^T D^-1``: the full-resolution
sum ``S`` averaged over the p x p cells ``P`` of each frame (``D``: tokens per cell) on both the
query and the key side. Its ``U`` gives each token its cell's value and ``U^T`` sums a weight map
per cell, so a query whose region is made of whole cells returns exactly the cell means of the
full-resolution query ``S g / sum(g)``; a region that cuts a cell counts as its weight spread over
that cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import QueryError
from .regions import _is_integer, check_fraction, check_positive_int
from .resample import adjoint, cell_repeat, cell_sum, upsample

Direction = Literal["attended_by", "attends_to"]
DIRECTIONS: tuple[str, ...] = ("attended_by", "attends_to")
Size = tuple[int, int]


@dataclass(frozen=True)
class SelfAttentionLevel:
    """Aggregated self-attention of one resolution for one image."""

    size: Size  # (h, w) of this resolution
    sums: torch.Tensor  # shape: (h*w, h*w) float32, [query, key], summed over layers and steps
    n_layers: int
    frames: int = 1  # video: h is this many frames stacked top to bottom, resampled frame by frame
    pool: int = 1  # > 1: a pooled level, size is the cell grid of p x p token cells of each frame
    # frames that never attend to each other (AnimateDiff): sums is (frames, n, n), one block per frame,
    # n = h * w / frames; the level's S is block-diagonal
    blocks: bool = False


@dataclass(frozen=True)
class TemporalLevel:
    """Temporal self-attention of one resolution for one video (AnimateDiff's motion modules)."""

    size: Size  # (h, w) of one frame at this resolution
    sums: torch.Tensor  # shape: (h*w, frames, frames) float32, [pixel, query frame, key frame], summed
    n_layers: int


def temporal_query(
    levels: list[TemporalLevel], weights: torch.Tensor, frame: int, direction: Direction = "attends_to"
) -> torch.Tensor:
    """How a region of one frame attends across time: a (frames,) curve.

    ``weights`` (h, w) is the region on one frame's grid (moved to each resolution with the adjoint
    of its bicubic upsampling, as the spatial queries do); ``"attends_to"``: the mean over the region
    of row ``frame`` of each pixel's (frames x frames) matrix (where frame ``frame``'s pixels look);
    ``"attended_by"``: of column ``frame`` (how much every frame's same pixels look at frame
    ``frame``); averaged over the captured layers (a row sums to the captured steps).

    >>> t = torch.tensor([[0.75, 0.25], [0.5, 0.5]]).expand(4, 2, 2)
    >>> temporal_query([TemporalLevel((2, 2), t, 1)], torch.ones(2, 2), frame=1).tolist()
    [0.5, 0.5]
    """
    check_direction(direction)
    if not levels:
        raise QueryError("no temporal attention was captured: trace an AnimateDiff pipeline with self_attention=True")
    total, n_layers = None, 0
    for level in levels:
        frames = level.sums.shape[1]
        if not -frames <= frame < frames:
            raise QueryError(f"frame {frame} is outside this video's {frames} frames")
        g = adjoint(weights.to(level.sums.device, torch.float32), level.size).flatten()  # (h_r * w_r,)
        if float(g.sum()) <= 0:
            raise QueryError("the region has no weight at one of the captured resolutions")
        part = level.sums[:, frame, :] if direction == "attends_to" else level.sums[:, :, frame]  # (pixels, F)
        m = (g / g.sum()) @ part
        total = m if total is None else total + m
        n_layers += level.n_layers
    assert total is not None
    return total / n_layers


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
    total = _query(levels, _oriented(levels, direction, contiguous=False), g, grid)
    return total if batched else total[0]


def _oriented(levels: list[SelfAttentionLevel], direction: Direction, contiguous: bool) -> list[torch.Tensor]:
    """Per level, the matrix ``R`` with ``map = g_r @ R``: ``A^T`` for columns, ``A`` for rows.

    ``contiguous=True`` copies, and flushes entries below 1e-30 to zero on the way: far-away softmax
    probabilities can be denormal floats, which make CPU matrix products several times slower.
    """
    out = []
    for level in levels:
        r = level.sums.transpose(-1, -2) if direction == "attended_by" else level.sums
        if contiguous:
            r = torch.where(r.abs() < 1e-30, torch.zeros((), device=r.device), r).contiguous()
        out.append(r)
    return out


def _weighted_rows(g: torch.Tensor, rows: torch.Tensor, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """``g @ rows``, reading only the rows that some map in ``g`` weights (thresholded maps are sparse).

    Only for contiguous ``rows``: gathering rows of a transposed view is a strided copy slower than
    the dense product it would save. With ``tiles`` (one sorted group id per map), each group reads
    the union of its own maps' supports; groups whose union is more than half of the rows are done
    together in one dense product (large products run much faster than many small ones).
    """
    if rows.dim() == 3:  # one block per frame: g's frames times their own blocks
        f, n, _ = rows.shape
        return torch.einsum("bfn,fnm->bfm", g.view(g.shape[0], f, n), rows).reshape(g.shape[0], f * n)
    if not rows.is_contiguous():
        return g @ rows
    if tiles is None:
        tiles = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
    out = torch.empty(g.shape[0], rows.shape[1], device=g.device, dtype=g.dtype)
    dense: list[torch.Tensor] = []
    _, counts = torch.unique_consecutive(tiles, return_counts=True)
    start = 0
    for c in counts.tolist():
        part = g[start : start + c]
        support = (part != 0).any(0)  # (N,)
        if int(support.sum()) > rows.shape[0] // 2:
            dense.append(torch.arange(start, start + c, device=g.device))
        else:
            idx = support.nonzero().squeeze(1)
            out[start : start + c] = part[:, idx] @ rows[idx]
        start += c
    if dense:
        sel = torch.cat(dense)
        out[sel] = g[sel] @ rows
    return out


def _query(
    levels: list[SelfAttentionLevel],
    oriented: list[torch.Tensor],
    g: torch.Tensor,
    grid: Size,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    device = levels[0].sums.device
    g = g.to(device=device, dtype=torch.float32)
    g = g / g.sum(dim=(-2, -1), keepdim=True)
    total = torch.zeros(g.shape[0], *grid, device=device)
    n_layers = 0
    for level, rows in zip(levels, oriented, strict=True):
        h, w = level.size
        if level.pool > 1:
            gr = cell_sum(g, level.frames, level.pool).reshape(g.shape[0], h * w)
        else:
            gr = adjoint(g, level.size, level.frames).reshape(g.shape[0], h * w)  # (B, N_r)
        # column direction: m[q] = sum_k A[q, k] g[k]  ->  m = g @ A^T ; rows: m[k] = sum_q g[q] A[q, k]
        m = _weighted_rows(gr, rows, tiles)
        if level.pool > 1:
            total += cell_repeat(m.view(-1, h, w), level.frames, level.pool, grid)
        else:
            total += upsample(m.view(-1, h, w), grid, level.frames)
        n_layers += level.n_layers
    total /= n_layers
    return total


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
    iterations = check_positive_int(iterations, "iterations")
    threshold = check_fraction(threshold)
    m = query(levels, weights, grid, direction)
    for _ in range(iterations - 1):
        g = threshold_normalised(m, float(threshold))
        if g is None:  # a flat map has no region to grow
            break
        m = query(levels, g, grid, direction)
    return m


def check_thresh(value: Any) -> float:
    """daam-i2i's absolute ``thresh``: a finite number >= 0, or a QueryError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(float(value)) or float(value) < 0:
        raise QueryError(
            "thresh must be a finite number >= 0 (daam-i2i's absolute cut: values below min(map) + thresh are set "
            f"to 0, in units of attention summed over the captured steps), got {value!r}"
        )
    return float(value)


def cut_absolute(
    m: torch.Tensor, thresh: float, what: str = "the map", iteration: int = 0, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """daam-i2i's cut on (..., h, w) maps: values below ``min(map) + thresh`` become 0, map by map.

    A map the cut empties entirely cannot guide the next round (daam-i2i divides by its zero sum and
    returns NaN): that is a QueryError naming the map and its spread.

    >>> cut_absolute(torch.tensor([[0.1, 0.2], [0.3, 0.5]]), 0.15)
    tensor([[0.0000, 0.0000],
            [0.3000, 0.5000]])
    """
    lo = m.amin(dim=(-2, -1), keepdim=True)
    out = m.masked_fill(m < lo + thresh, 0.0)
    empty = ~(out != 0).flatten(-2).any(-1)
    if bool(empty.any()):
        flat = m.reshape(-1, m.shape[-2] * m.shape[-1])
        first = int(empty.flatten().nonzero()[0])
        spread = float(flat[first].max() - flat[first].min())
        which = f"{what} {int(ids[first]) if ids is not None else first}" if m.dim() > 2 else what
        raise QueryError(
            f"thresh={thresh:g} cuts every value of {which} at iteration {iteration} (its values span only "
            f"{spread:.4g}; {int(empty.sum())} map(s) emptied): nothing is left to diffuse. daam-i2i's thresh is "
            f"absolute, in units of attention summed over the captured steps: pass a smaller one (e.g. "
            f"thresh={spread / 4:.2g}), or compute_grown_heat_map(...) for a cut relative to each map's range"
        )
    return out


def diffuse_absolute(
    levels: list[SelfAttentionLevel],
    weights: torch.Tensor,
    grid: Size,
    n_iter: int,
    thresh: float,
    direction: Direction = "attended_by",
) -> list[torch.Tensor]:
    """daam-i2i's thresholded diffusion from a region: ``m_0 = cut(S g)``, ``m_{t+1} = cut(S m_t / sum(m_t))``.

    ``cut`` zeroes values below ``min + thresh`` (absolute, see :func:`cut_absolute`). Returns the
    ``n_iter + 1`` maps ``[m_0, ..., m_n]`` (the last is the result; the others are daam-i2i's
    intermediate plots). ``n_iter=0`` returns the cut region map alone.
    """
    if not _is_integer(n_iter) or n_iter < 0:
        raise QueryError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    thresh = check_thresh(thresh)
    m = cut_absolute(query(levels, weights, grid, direction), thresh)
    out = [m]
    for i in range(int(n_iter)):
        m = cut_absolute(query(levels, m, grid, direction), thresh, iteration=i + 1)
        out.append(m)
    return out


def diffuse_all(
    levels: list[SelfAttentionLevel],
    grid: Size,
    iterations: int,
    threshold: float,
    direction: Direction = "attended_by",
    tile: int = 8,
    group: int = 256,
    wrap: Callable[[Iterable[int]], Iterable[int]] | None = None,
    absolute: bool = False,
) -> torch.Tensor:
    """:func:`diffuse` started from every grid pixel: shape (h*w, h, w), map ``p`` from pixel ``p``.

    Dense, this is ``iterations`` products of two (h*w, h*w) matrices (about 1.4 TFLOP at 64x64).
    The thresholds make it sparse: a map cut below ``threshold`` weights few pixels, so the seeds go
    in square tiles of ``tile`` x ``tile`` neighbouring pixels, each tile's maps reading only the
    rows of ``A`` that some of them weight (the union of their supports, small where attention is
    local). ``group`` seeds (several tiles) iterate together, so that tiles whose maps are dense
    share one large product. ``wrap`` may wrap the groups in a progress bar.

    >>> a = torch.eye(4).add(0.1).softmax(-1)
    >>> lv = [SelfAttentionLevel((2, 2), a, 1)]
    >>> all_maps = diffuse_all(lv, (2, 2), 3, 0.4)
    >>> one = diffuse(lv, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), (2, 2), 3, 0.4)
    >>> torch.allclose(all_maps[2], one)
    True
    """
    check_direction(direction)
    if not levels:
        raise QueryError("no self-attention was captured: trace with self_attention=True to use self-attention queries")
    if absolute:  # daam-i2i: ``iterations`` (n_iter) further rounds after the cut pixel maps; thresh absolute
        if not _is_integer(iterations) or iterations < 0:
            raise QueryError(f"n_iter must be a non-negative integer, got {iterations!r}")
        rounds, threshold = int(iterations), check_thresh(threshold)
    else:
        rounds = check_positive_int(iterations, "iterations") - 1
        threshold = check_fraction(threshold)
    if not isinstance(tile, int) or tile < 1:
        raise QueryError(f"tile must be a positive integer, got {tile!r}")
    h, w = grid
    n = h * w
    device = levels[0].sums.device
    oriented = _oriented(levels, direction, contiguous=True)
    out = torch.empty(n, h, w, device=device)
    corners: list[tuple[int, int]] = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    per_group = max(1, group // (tile * tile))  # tiles iterated together
    starts: Iterable[int] = range(0, len(corners), per_group)
    for first in wrap(starts) if wrap is not None else starts:
        tile_ids = []
        for y0, x0 in corners[first : first + per_group]:
            ys = torch.arange(y0, min(h, y0 + tile), device=device)
            xs = torch.arange(x0, min(w, x0 + tile), device=device)
            tile_ids.append((ys[:, None] * w + xs[None, :]).flatten())
        ids = torch.cat(tile_ids)
        tile_of = torch.repeat_interleave(
            torch.arange(len(tile_ids), device=device), torch.tensor([len(t) for t in tile_ids], device=device)
        )
        g = torch.zeros(len(ids), n, device=device)
        g[torch.arange(len(ids), device=device), ids] = 1.0
        m = _query(levels, oriented, g.view(-1, h, w), grid, tile_of)
        if absolute:
            m = cut_absolute(m, threshold, "the map of pixel", 0, ids)
            for i in range(rounds):
                m = cut_absolute(_query(levels, oriented, m, grid, tile_of), threshold, "the map of pixel", i + 1, ids)
            out[ids] = m
            continue
        active: torch.Tensor | None = None  # None: every map of the group is still growing
        for _ in range(rounds):
            cur = m if active is None else m[active]
            lo = cur.amin(dim=(-2, -1), keepdim=True)
            hi = cur.amax(dim=(-2, -1), keepdim=True)
            flat = (hi - lo).flatten() <= 1e-12 * hi.abs().flatten().clamp(min=1.0)
            if bool(flat.any()):  # as in diffuse: a flat map has no region to grow, it stays as it is
                keep = ~flat
                idx = torch.arange(len(ids), device=device) if active is None else active
                active, cur, lo, hi = idx[keep], cur[keep], lo[keep], hi[keep]
                if active.numel() == 0:
                    break
            gn = (cur - lo) / (hi - lo)
            gn.masked_fill_(gn < threshold, 0.0)
            if active is None:
                m = _query(levels, oriented, gn, grid, tile_of)
            else:
                m[active] = _query(levels, oriented, gn, grid, tile_of[active])
        out[ids] = m
    return out

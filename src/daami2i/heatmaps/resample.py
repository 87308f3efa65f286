"""Bicubic upsampling as an explicit separable linear operator, and its adjoint.

Bicubic interpolation (``align_corners=False``, PyTorch's convention) is linear and separable: for
a map ``X`` of size (h, w), ``upsample(X) = Mh @ X @ Mw.T`` where ``Mh`` is (H, h) and ``Mw`` is
(W, w). Its adjoint (transpose) moves a weight map from the target grid back to the source grid:
``adjoint(G) = Mh.T @ G @ Mw``. This is what lets every self-attention query run at each
resolution's native size (see DESIGN.md, "the one idea").
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _matrix_cpu(n_in: int, n_out: int) -> torch.Tensor:
    # Interpolating each unit vector gives one column of the operator.
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    cols = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)
    return cols.view(n_in, n_out).T.contiguous()  # shape: (n_out, n_in)


def bicubic_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (n_out, n_in) float32 matrix of 1-D bicubic resampling from n_in to n_out samples.

    >>> bicubic_matrix(3, 3)
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    """
    return _matrix_cpu(n_in, n_out).to(device=device, dtype=torch.float32)


def _by_frame(x: torch.Tensor, frames: int, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A stacked (..., frames * h, w) map as (..., frames, h, w), and ``size`` of one frame."""
    if x.shape[-2] % frames or size[0] % frames:
        raise ValueError(f"a stacked grid of {x.shape[-2]} or {size[0]} rows does not split into {frames} frames")
    return x.reshape(*x.shape[:-2], frames, x.shape[-2] // frames, x.shape[-1]), (size[0] // frames, size[1])


def upsample(x: torch.Tensor, size: tuple[int, int], frames: int = 1) -> torch.Tensor:
    """Bicubic resize of ``x`` (..., h, w) to (..., H, W); equals ``F.interpolate(..., 'bicubic')``.

    ``frames > 1``: ``x`` and ``size`` are that many frames stacked top to bottom, each resized on its
    own (no frame bleeds into the next).
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if frames > 1:
        xf, one = _by_frame(x, frames, size)
        return upsample(xf, one).reshape(*x.shape[:-2], size[0], size[1])
    mh = bicubic_matrix(h, size[0], x.device)
    mw = bicubic_matrix(w, size[1], x.device)
    return mh @ x @ mw.T


def adjoint(g: torch.Tensor, size: tuple[int, int], frames: int = 1) -> torch.Tensor:
    """Transpose of :func:`upsample` from ``size`` to ``g``'s size: (..., H, W) -> (..., h, w)."""
    hh, ww = g.shape[-2:]
    if (hh, ww) == tuple(size):
        return g
    if frames > 1:
        gf, one = _by_frame(g, frames, size)
        return adjoint(gf, one).reshape(*g.shape[:-2], size[0], size[1])
    mh = bicubic_matrix(size[0], hh, g.device)
    mw = bicubic_matrix(size[1], ww, g.device)
    return mh.T @ g @ mw


# -- pooled cells: a video's self-attention kept per p x p block of each frame -----------------
def cells_of(grid: tuple[int, int], frames: int, pool: int) -> tuple[int, int]:
    """(frames * ceil(h / pool), ceil(w / pool)): the cell grid of a stacked grid of ``frames``
    frames of (h, w) tokens (``grid`` = (frames * h, w)), each frame cut into ``pool`` x ``pool``
    cells (the last row / column of cells may be narrower).

    >>> cells_of((6, 5), frames=3, pool=2)
    (3, 3)
    """
    h, w = grid[0] // frames, grid[1]
    return frames * -(-h // pool), -(-w // pool)


def cell_sum(g: torch.Tensor, frames: int, pool: int) -> torch.Tensor:
    """Each cell's sum of ``g`` (..., frames * h, w) -> (..., frames * hc, wc): the adjoint of
    :func:`cell_repeat` (a weight map on the tokens moved to the cells).

    >>> cell_sum(torch.arange(12.0).view(4, 3), frames=2, pool=2).tolist()
    [[8.0, 7.0], [32.0, 19.0]]
    """
    lead, (hh, w) = g.shape[:-2], g.shape[-2:]
    h = hh // frames
    hc, wc = -(-h // pool), -(-w // pool)
    x = g.reshape(-1, frames, h, w)
    if h % pool or w % pool:
        x = F.pad(x, (0, wc * pool - w, 0, hc * pool - h))
    x = x.reshape(-1, frames, hc, pool, wc, pool).sum(dim=(3, 5))
    return x.reshape(*lead, frames * hc, wc)


def cell_repeat(m: torch.Tensor, frames: int, pool: int, grid: tuple[int, int]) -> torch.Tensor:
    """A map on the cells (..., frames * hc, wc) given to every token of its cell: (..., *grid).

    >>> cell_repeat(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), frames=2, pool=2, grid=(4, 3)).tolist()
    [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0], [3.0, 3.0, 4.0]]
    """
    lead, (hhc, wc) = m.shape[:-2], m.shape[-2:]
    h, w = grid[0] // frames, grid[1]
    x = m.reshape(-1, frames, hhc // frames, wc)
    x = x.repeat_interleave(pool, dim=-2).repeat_interleave(pool, dim=-1)[..., :h, :w]
    return x.reshape(*lead, frames * h, w)


def cell_counts(grid: tuple[int, int], frames: int, pool: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tokens in each cell, flattened over the cell grid (frames * hc * wc,), float32."""
    return cell_sum(torch.ones(grid, device=device), frames, pool).flatten()

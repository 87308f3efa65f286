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

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


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``x`` (..., h, w) to (..., H, W); equals ``F.interpolate(..., 'bicubic')``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    mh = bicubic_matrix(h, size[0], x.device)
    mw = bicubic_matrix(w, size[1], x.device)
    return mh @ x @ mw.T


def adjoint(g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Transpose of :func:`upsample` from ``size`` to ``g``'s size: (..., H, W) -> (..., h, w)."""
    hh, ww = g.shape[-2:]
    if (hh, ww) == tuple(size):
        return g
    mh = bicubic_matrix(size[0], hh, g.device)
    mw = bicubic_matrix(size[1], ww, g.device)
    return mh.T @ g @ mw

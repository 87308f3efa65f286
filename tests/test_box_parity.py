"""Boxes mean what they mean in daam-i2i: inclusive latent corners.

daam-i2i 0.2 builds a box's pixel ids as ``[i for y in range(y1, y2 + 1) for i in range(w * y + x1,
w * y + x2 + 1) if i < h * w]``: both corners are included and a bottom row past the grid is dropped.
The reference below applies that formula literally to the probabilities recorded by :mod:`reference`
(both guidance halves, every head, as daam-i2i keeps them), and compares after min-max, as the other
parity checks do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import daami2i
from reference import recording


def daam_i2i_box_ids(x1: int, y1: int, x2: int, y2: int, h: int, w: int) -> list[int]:
    """daam-i2i's pixel ids of a box (its formula, written out from its documented behaviour)."""
    return [i for y in range(y1, y2 + 1) for i in range(w * y + x1, w * y + x2 + 1) if i < h * w]


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def test_seed_box_example_matches_daam_i2i(sd2):
    size = 512  # a 64 x 64 latent grid, as in the seed's README
    with recording(sd2.unet) as book:
        with daami2i.trace(sd2, halves="both") as trc:
            image = sd2("a red cat", num_inference_steps=1, height=size, width=size).images[0]
    gh, gw = trc.last_generation.grid_size
    assert (gh, gw) == (64, 64)
    layers = [s.name for s in trc.selected if s.kind == "self"]
    every = torch.cat([sum(p.reshape(-1, gh * gw, gh * gw) for p in book[n]) for n in layers])
    ghm = trc.compute_global_heat_map()

    ids = daam_i2i_box_ids(0, 10, 25, 64, gh, gw)
    assert len(ids) == 26 * 54  # columns 0-25, rows 10-63
    ref = every[:, :, ids].mean(dim=(0, 2)).view(gh, gw)
    ref = minmax(F.interpolate(ref[None, None], size=(size, size), mode="bicubic", align_corners=False)[0, 0])
    ours = ghm.compute_bbox_heat_map(0, 10, 25, 64).expand_as(image)
    assert (ours - ref).abs().max() < 1e-3

    # the old half-open reading (columns 0-24) is a different map: the check above can fail
    old = ghm.compute_bbox_heat_map(0, 10, 25, 64, half_open=True).expand_as(image)
    assert (old - ref).abs().max() > 1e-2

    # the region weights are exactly daam-i2i's pixel set
    w = torch.zeros(gh * gw)
    w[ids] = 1
    assert torch.equal(ghm.compute_bbox_heat_map(0, 10, 25, 64).weights.flatten(), w)

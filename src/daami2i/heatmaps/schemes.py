"""Named ways of merging a word's cross-attention with self-attention into one map.

Each scheme is a function of the captured stores, through a :class:`GlobalHeatMap`:

* ``raw``: the DAAM word map ``c``;
* ``guided``: ``S c`` with the self-attention of the global heat map's levels (the default trace
  keeps the highest resolution only: ``S`` at the word map's own resolution);
* ``cascade``: coarse to fine, ``S_fine ... S_coarse c``, one level at a time (trace with
  ``self_factors="all"`` to have several levels; with one level it equals ``guided``);
* ``repeated``: ``S^n c`` (``iterations`` = n, default 3);
* ``diffused``: the thresholded iteration of :meth:`GlobalHeatMap.compute_grown_heat_map` (a cut at a
  fraction of each round's min-max range).

>>> SCHEMES
('raw', 'guided', 'cascade', 'repeated', 'diffused')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import QueryError
from . import selfattn

if TYPE_CHECKING:
    from .maps import GlobalHeatMap

SCHEMES = ("raw", "guided", "cascade", "repeated", "diffused")


def word_map(
    ghm: GlobalHeatMap, word: str, scheme: str = "guided", iterations: int = 3, **word_kw: Any
) -> torch.Tensor:
    """The (h, w) map of ``word`` under ``scheme`` (see the module docstring)."""
    if scheme not in SCHEMES:
        raise QueryError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    c = ghm.compute_word_heat_map(word, **word_kw).value
    if scheme == "raw":
        return c
    if scheme == "guided":
        return ghm.compute_guided_heat_map(c).value
    if scheme == "diffused":
        return ghm.compute_grown_heat_map(c).value
    if not isinstance(iterations, int) or iterations < 1:
        raise QueryError(f"iterations must be a positive integer, got {iterations!r}")
    g = regions_guide(c)
    if scheme == "repeated":
        for _ in range(iterations):
            g = selfattn.query(ghm.self_levels, g, ghm.grid_size, ghm.direction)
        return g
    levels = sorted(ghm.self_levels, key=lambda lv: lv.size[0] * lv.size[1])  # cascade: coarse first
    if not levels:
        raise QueryError("no self-attention was captured: trace with self_attention=True to use this scheme")
    for level in levels:
        g = selfattn.query([level], g, ghm.grid_size, ghm.direction)
    return g


def regions_guide(c: torch.Tensor) -> torch.Tensor:
    """A word map as non-negative weights (DAAM maps are clamped at 0 already; this guards the rest)."""
    return c.clamp(min=0)


def word_maps(ghm: GlobalHeatMap, words: Sequence[str], scheme: str = "guided", iterations: int = 3) -> torch.Tensor:
    """Maps of several words under one scheme: (len(words), h, w)."""
    if len(words) == 0:
        raise QueryError("expected at least one word")
    return torch.stack([word_map(ghm, w, scheme, iterations) for w in words])

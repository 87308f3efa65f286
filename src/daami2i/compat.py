"""The predecessors' helper functions, with their meaning: daam-i2i 0.2's and DAAM 0.2.0's
``set_seed``, ``plot_mask_heat_map``, ``cache_dir``, ``auto_device`` and ``auto_autocast``.

>>> g = set_seed(0)
>>> int(torch.randint(0, 1000, (1,), generator=g)) == int(torch.randint(0, 1000, (1,), generator=set_seed(0)))
True
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import Daami2iError, QueryError
from .sampling import SEED_LIMIT

T = TypeVar("T")


def auto_device(obj: T = torch.device("cpu")) -> T:  # type: ignore[assignment]  # noqa: B008 - the predecessors' default
    """CUDA when available: a device is replaced by ``cuda`` (else ``cpu``); a module or tensor is
    moved there (else returned as it is)."""
    if isinstance(obj, torch.device):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # type: ignore[return-value]
    if torch.cuda.is_available():
        return obj.to("cuda")  # type: ignore[attr-defined, no-any-return]
    return obj


def auto_autocast(*args: Any, **kwargs: Any) -> Any:
    """``torch.autocast("cuda", ...)``, disabled when CUDA is not available (the predecessors' helper)."""
    if not torch.cuda.is_available():
        kwargs["enabled"] = False
    return torch.autocast("cuda", *args, **kwargs)


def set_seed(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators; returns a seeded ``torch.Generator`` on
    :func:`auto_device` to pass as ``pipe(..., generator=...)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise QueryError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    gen = torch.Generator(device=auto_device())
    gen.manual_seed(seed)
    return gen


def plot_mask_heat_map(im: Any, heat_map: Any, threshold: float = 0.4) -> np.ndarray:
    """daam-i2i's plot: the image kept where ``heat_map > threshold`` and black elsewhere, drawn with
    ``plt.imshow`` in the current figure. ``heat_map`` is an expanded (H, W) map in [0, 1] (e.g.
    ``hm.expand_as(im)``) or a heat map, expanded here. Returns the masked image, (H, W, C) in [0, 1]."""
    from .heatmaps.maps import HeatMap

    arr = np.asarray(im, dtype=np.float32) / 255.0
    if isinstance(heat_map, HeatMap):
        heat_map = heat_map.expand_as(im)
    mask = torch.as_tensor(heat_map).detach().float().cpu().squeeze()
    if tuple(mask.shape) != arr.shape[:2]:
        raise QueryError(
            f"heat_map must have the image's (height, width) {arr.shape[:2]}, got {tuple(mask.shape)}: "
            "pass hm.expand_as(image) or the heat map itself"
        )
    out = arr * (mask > threshold).float().numpy()[..., None] if arr.ndim == 3 else arr * (mask > threshold).numpy()
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise Daami2iError("plots need matplotlib: pip install 'daami2i[plot]'") from exc
    plt.imshow(out)
    return out


def cache_dir() -> Path:
    """The predecessors' cache folder (``$XDG_CACHE_HOME/daam`` on Linux); daami2i itself writes nothing there."""
    if os.name == "posix" and sys.platform != "darwin":
        return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "daam")
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~"), "Library/Caches/daam")
    return Path(os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local"), "daam")

"""One adapter per model family, behind a registry: the only code that knows a family.

>>> from daami2i.testing import tiny_sd_pipeline
>>> adapter_for(tiny_sd_pipeline())[1].name
'unet'
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedPipelineError
from .animatediff import AnimateDiffAdapter
from .base import AttentionSite, DenoiserCall, FamilyAdapter, PassTracker, RealRequest, RealRun, Stream, size_at
from .chroma import ChromaAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .hidream import HiDreamAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .hunyuanvideo15 import HunyuanVideo15Adapter
from .ltx import LTXAdapter
from .lumina2 import Lumina2Adapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter
from .zimage import ZImageAdapter

ADAPTERS: list[FamilyAdapter] = [
    UNetAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    ChromaAdapter(),
    PixArtAdapter(),
    Flux2Adapter(),
    ZImageAdapter(),
    QwenImageAdapter(),
    Lumina2Adapter(),
    SanaAdapter(),
    HiDreamAdapter(),
    WanAdapter(),
    CogVideoXAdapter(),
    LTXAdapter(),
    HunyuanVideoAdapter(),
    HunyuanVideo15Adapter(),
    AnimateDiffAdapter(),
]


def adapter_for(pipe: Any) -> tuple[Any, FamilyAdapter]:
    """The pipeline's denoiser and the adapter of its family, or an error listing what is supported."""
    for adapter in ADAPTERS:
        denoiser = adapter.denoiser_of(pipe)
        if denoiser is not None:
            return denoiser, adapter
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    has = f"unet={type(unet).__name__}" if unet is not None else "no UNet2DConditionModel `unet`"
    has += (
        f" and its transformer is a {type(transformer).__name__}" if transformer is not None else " and no transformer"
    )
    supported = "; ".join(a.pipelines for a in ADAPTERS)
    raise UnsupportedPipelineError(
        f"daami2i.trace cannot trace {type(pipe).__name__}: it has {has}. Supported model families: {supported}"
    )


__all__ = [
    "AnimateDiffAdapter",
    "ADAPTERS",
    "AttentionSite",
    "ChromaAdapter",
    "CogVideoXAdapter",
    "DenoiserCall",
    "FamilyAdapter",
    "Flux2Adapter",
    "FluxAdapter",
    "HiDreamAdapter",
    "HunyuanVideoAdapter",
    "HunyuanVideo15Adapter",
    "LTXAdapter",
    "Lumina2Adapter",
    "PassTracker",
    "PixArtAdapter",
    "QwenImageAdapter",
    "RealRequest",
    "RealRun",
    "SD3Adapter",
    "SanaAdapter",
    "Stream",
    "UNetAdapter",
    "WanAdapter",
    "ZImageAdapter",
    "adapter_for",
    "size_at",
]

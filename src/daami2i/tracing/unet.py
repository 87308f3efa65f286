"""UNet adapter: where the attention layers of a ``UNet2DConditionModel`` are and at which resolution."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedPipelineError

Size = tuple[int, int]
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of the UNet."""

    name: str  # module path, e.g. "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    module: Any  # the diffusers Attention module
    kind: Literal["self", "cross"]
    block: Literal["down", "mid", "up"]
    factor: int  # spatial downsampling factor of its resolution relative to the latent (1, 2, 4, ...)


def find_sites(unet: Any) -> list[AttentionSite]:
    """Every attention layer of a UNet2DConditionModel, with its kind, block and resolution factor."""
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    sites = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(1) == "down_blocks":
            block, level = "down", int(m.group(2))
        elif m.group(1) == "up_blocks":
            block, level = "up", n_up - 1 - int(m.group(2))
        else:
            block, level = "mid", n_down - 1
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        sites.append(AttentionSite(name, module, kind, block, 2**level))  # type: ignore[arg-type]
    return sites


def unet_of(pipe: Any) -> Any:
    """The pipeline's UNet2DConditionModel, or a clear error naming what is supported."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        what = type(pipe).__name__
        extra = ""
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None:
            extra = (
                f" Its transformer is a {type(transformer).__name__}: of the transformer (MMDiT) models, SD3 "
                "(SD3Transformer2DModel) and Flux (FluxTransformer2DModel) are supported."
            )
        raise UnsupportedPipelineError(
            f"daami2i.trace needs a diffusers pipeline whose `unet` is a UNet2DConditionModel "
            f"(StableDiffusionPipeline, StableDiffusionXLPipeline and their img2img / inpaint variants) or whose "
            f"`transformer` is an SD3 or Flux transformer; "
            f"got {what} with unet={type(unet).__name__ if unet is not None else None}.{extra}"
        )
    return unet


def size_at(latent: Size, factor: int) -> Size:
    """Spatial size after downsampling ``latent`` by ``factor`` (each stride-2 step rounds up)."""
    h, w = latent
    for _ in range(int(math.log2(factor))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w

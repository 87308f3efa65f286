"""AnimateDiff (``UNetMotionModel``: ``AnimateDiffPipeline``): a Stable Diffusion UNet whose frames
are a batch, plus motion modules that attend across frames.

The spatial layers (``*.attentions.*.attn1`` / ``attn2``) see every frame as its own batch item
(batch ``B * F``, item-major: video ``b``'s frame ``f`` is item ``b * F + f``); the text is the 77 CLIP
tokens, repeated per frame. So a frame's self-attention never looks at another frame: it is kept as
one (N x N) block per frame (``frame_batch``), and word maps as every frame's rows stacked. The motion
modules (``*.motion_modules.*.attn1`` / ``attn2``) are both temporal self-attention: batch ``B * H *
W`` (item ``b * H * W + y * W + x``), sequence ``F``: how a pixel attends to itself across frames;
they are ``kind="temporal"`` sites, kept as one (F x F) matrix per pixel and resolution. The 2-D VAE
decodes each frame alone: one token frame per video frame. Guidance is one batch ``[uncond, cond]``.
Real-video attribution is not supported.
"""

from __future__ import annotations

from typing import Any

from ...errors import TraceError
from ...heatmaps.frames import FrameLayout
from .base import (
    AttentionSite,
    DenoiserCall,
    FamilyAdapter,
    RealRequest,
    RealRun,
    Size,
    size_at,
    timestep_value,
    video_sample,
)
from .unet import find_sites as unet_sites


class AnimateDiffAdapter(FamilyAdapter):
    name = "animatediff"
    pipelines = "AnimateDiff (a UNetMotionModel `unet`: AnimateDiffPipeline; frames stacked top to bottom)"
    single_clip_stream = True
    frame_batch = True
    word_heads_kept = False  # head means of every frame's rows: DAAM's per-head maps times F would be large

    def denoiser_of(self, pipe: Any) -> Any | None:
        unet = getattr(pipe, "unet", None)
        if unet is None or "UNetMotionModel" not in {c.__name__ for c in type(unet).__mro__}:
            return None
        return unet

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        out = []
        for site in unet_sites(denoiser):
            if ".motion_modules." in site.name:
                out.append(AttentionSite(site.name, site.module, "temporal", site.block, site.factor))
            else:
                out.append(site)
        return out

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``unet(sample (B, C, F, H, W), timestep, encoder_hidden_states (B * F, 77, D), ...)``."""
        sample = args[0] if args else kwargs.get("sample")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        return DenoiserCall(sample, context, timestep_value(t))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        f, h, w = video_sample(call, "UNetMotionModel")
        deepest = 2 ** (len(denoiser.down_blocks) - 1)
        if h % deepest or w % deepest:
            raise TraceError(
                f"the AnimateDiff latent is {h}x{w}, not a multiple of {deepest} (its deepest resolution): ask for "
                f"a height and width that are multiples of {8 * deepest} pixels"
            )
        latent = (f * h, w)  # the frames' latents stacked top to bottom
        return self.layer_grid(denoiser, latent, grid_factor), latent

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        return size_at(latent_size, factor)  # exact: every frame's side divides by every factor (geometry)

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout:
        frames = int(call.sample.shape[2])
        return FrameLayout.identity(frames, grid[0] // frames)

    def default_latent(self, denoiser: Any) -> Size:
        side = int(getattr(denoiser.config, "sample_size", 64) or 64)
        return 16 * side, side  # 16 frames of 512 x 512, stacked

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        raise TraceError("attribution of a real video is not supported yet; trace a generation with daami2i.trace")

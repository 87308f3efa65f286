"""Wan 2.1 text-to-video (``WanTransformer3DModel``, ``WanPipeline``): the first video family.

Every block has a video self-attention (``attn1``, over all video tokens of all latent frames) and
a cross-attention to the UMT5 text (``attn2``; the text is zero-padded to ``max_sequence_length``
and not masked), both read where ``WanAttnProcessor`` calls ``dispatch_attention_fn``. The latent
(B, C, F, H, W) is cut into ``patch_size = (t, h, w)`` patches and the tokens are frame-major, so
the video's token grid (F / t, H / h, W / w) is stored as the frames stacked top to bottom: a
(frames * rows, columns) grid, and the generation's ``image_size`` is the latent frames' pixels
stacked the same way. Queries on it are those of an image whose rows are the frames one after the
other (a box inside one frame is that frame's box; a word map holds every frame's map, one below
the other): frame-aware views (``frame=``, (frames, h, w) maps, video frames from latent frames)
come with the video queries of issue 18. Guidance is a second transformer call per step (the
negative prompt, ``cache_context("uncond")``) on the very same latents tensor, never averaged with
the first. Wan 2.2's second denoiser (``transformer_2``) and I2V's image context are not traced yet.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import TraceError
from ...heatmaps.frames import FrameLayout
from .base import (
    AttentionSite,
    DenoiserCall,
    FamilyAdapter,
    PassTracker,
    RealRequest,
    RealRun,
    Size,
    Stream,
    timestep_value,
    transformer_of,
)
from .flux import _SameLatents


class WanAdapter(FamilyAdapter):
    name = "wan"
    pipelines = (
        "Wan 2.1 text-to-video (a WanTransformer3DModel `transformer`: WanPipeline; frames stacked top to bottom)"
    )
    guidance_as_passes = True
    word_heads_kept = False  # 30 layers x 12 heads of N x T per video would be ~1 GB: the head mean
    default_steps = 50
    second_pass_hint = "Wan runs the negative prompt as a second call only with guidance_scale > 1"

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = transformer_of(pipe, "WanTransformer3DModel")
        if transformer is None:
            return None
        if getattr(transformer.config, "image_dim", None):
            raise TraceError(
                "this Wan transformer attends to image context (image_dim is set: an image-to-video model): daami2i "
                "traces Wan 2.1 text-to-video so far"
            )
        return transformer

    def extra_denoisers(self, pipe: Any, denoiser: Any) -> list[tuple[str, Any]]:
        """Wan 2.2 A14B: ``transformer_2`` (the low-noise expert) runs the steps below the boundary
        timestep; it must cut the same patches for its maps to share the first one's grid."""
        second = getattr(pipe, "transformer_2", None)
        if second is None:
            return []
        if tuple(second.config.patch_size) != tuple(denoiser.config.patch_size):
            raise TraceError(
                f"transformer_2 patches the latents by {tuple(second.config.patch_size)} but transformer by "
                f"{tuple(denoiser.config.patch_size)}: their maps would not share one grid"
            )
        if getattr(second.config, "image_dim", None):
            raise TraceError("transformer_2 attends to image context (image_dim is set): not traced yet")
        return [("transformer_2", second)]

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (name.startswith("blocks.") and callable(getattr(module, "set_processor", None))):
                continue
            if name.endswith(".attn1"):
                sites.append(AttentionSite(name, module, "self", "block", 1))
            elif name.endswith(".attn2"):
                sites.append(AttentionSite(name, module, "cross", "block", 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states (B, C, F, H, W), timestep, encoder_hidden_states, ...)``."""
        sample = args[0] if args else kwargs.get("hidden_states")
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def new_pass_tracker(self) -> PassTracker:
        return _SameLatents()  # the negative prompt's call gets the very same latents tensor

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
            raise TraceError(
                "the Wan transformer was called without a (B, C, frames, H, W) latent "
                f"(got {type(sample).__name__} of shape {tuple(getattr(sample, 'shape', ()))})"
            )
        f, h, w = (int(v) for v in sample.shape[2:])
        pt, ph, pw = (int(v) for v in denoiser.config.patch_size)
        latent = (f // pt * h, w)  # the latent frames stacked top to bottom
        return self.layer_grid(denoiser, latent, 1), latent

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout:
        latent_frames = int(call.sample.shape[2])
        pt = int(denoiser.config.patch_size[0])
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
        return FrameLayout.causal(latent_frames, grid[0] // -(-latent_frames // pt), temporal, pt)

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        _, ph, pw = (int(v) for v in denoiser.config.patch_size)
        return latent_size[0] // ph, latent_size[1] // pw

    def default_latent(self, denoiser: Any) -> Size:
        return 21 * 60, 104  # 81 frames of 480 x 832: 21 latent frames of 60 x 104, stacked

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        raise TraceError("attribution of a real video is not supported yet; trace a generation with daami2i.trace")

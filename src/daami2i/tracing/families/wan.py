"""Wan 2.1 / 2.2 text-to-video and image-to-video (``WanTransformer3DModel``: ``WanPipeline``,
``WanImageToVideoPipeline``).

Every block has a video self-attention (``attn1``, over all video tokens of all latent frames) and
a cross-attention to the UMT5 text (``attn2``; the text is zero-padded to ``max_sequence_length``
and not masked), both read where ``WanAttnProcessor`` calls ``dispatch_attention_fn``. The latent
(B, C, F, H, W) is cut into ``patch_size = (t, h, w)`` patches and the tokens are frame-major, so
the video's token grid (F / t, H / h, W / w) is stored as the frames stacked top to bottom: a
(frames * rows, columns) grid, with a :class:`~daami2i.heatmaps.frames.FrameLayout` that says
which token frame each video frame comes from (the causal VAE: video frame 0 is latent frame 0,
each later latent frame gives ``vae_scale_factor_temporal`` video frames); queries take
``frame=``. Guidance is a second transformer call per step (the negative prompt,
``cache_context("uncond")``) on the very same latents tensor, never averaged with the first.

Wan 2.2 A14B's low-noise expert (``transformer_2``, after the boundary timestep) is traced as
well: its layers are named ``transformer_2.<name>`` and the maps sum over the steps each expert
ran. Image-to-video cross-attention first attends to the CLIP image context (added K/V
projections), then to the text: the text's call is read (``AttentionSite.call = 1``) and the
image context never enters word maps. Real-video attribution is not supported.
"""

from __future__ import annotations

from typing import Any

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
    video_sample,
)
from .flux import _SameLatents


class WanAdapter(FamilyAdapter):
    name = "wan"
    pipelines = (
        "Wan 2.1 / 2.2 video (a WanTransformer3DModel `transformer`, and `transformer_2`: WanPipeline, "
        "WanImageToVideoPipeline; frames stacked top to bottom)"
    )
    guidance_as_passes = True
    word_heads_kept = False  # 30 layers x 12 heads of N x T per video would be ~1 GB: the head mean
    default_steps = 50
    second_pass_hint = "Wan runs the negative prompt as a second call only with guidance_scale > 1"

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = transformer_of(pipe, "WanTransformer3DModel")
        if transformer is None:
            return None
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
        return [("transformer_2", second)]

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (name.startswith("blocks.") and callable(getattr(module, "set_processor", None))):
                continue
            if name.endswith(".attn1"):
                sites.append(AttentionSite(name, module, "self", "block", 1))
            elif name.endswith(".attn2"):
                # image-to-video (added K/V projections): the processor attends to the image context first, then to
                # the text; the text's call is the layer's cross-attention, the image's is left out
                call = 1 if getattr(module, "add_k_proj", None) is not None else 0
                sites.append(AttentionSite(name, module, "cross", "block", 1, call=call))
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
        f, h, w = video_sample(call, "Wan transformer")
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

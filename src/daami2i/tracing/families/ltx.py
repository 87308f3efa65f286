"""LTX-Video text to video (``LTXVideoTransformer3DModel``, ``LTXPipeline``): LTX-Video 0.9 and its
0.9.x successors run through ``LTXPipeline``.

Every block has a video self-attention (``transformer_blocks.{i}.attn1``, over all video tokens of all
latent frames) and a cross-attention to the T5 text (``attn2``), both read where
``LTXVideoAttnProcessor`` calls ``dispatch_attention_fn`` (q and k after the RMS QK-norm across heads
and, in ``attn1``, the rotary embedding). The T5 text is padded to ``max_sequence_length`` (128) and
the padding is **masked** in ``attn2``: the transformer turns the pipeline's boolean mask into an
additive bias of -10000 per key, which the capture honours (a padding key's probability is 0 in
float32), and the stream is labelled from the ids the encoder received, so padding is never a word
column. Guidance is one batch ``[uncond, cond]`` (``do_classifier_free_guidance``).

The pipeline packs the (B, C, F, H, W) latents into (B, F * H * W, C) tokens (patch 1, frame-major:
token ``f * H * W + row * W + col``) and passes the latent ``num_frames``, ``height`` and ``width`` as
forward arguments, which is where the adapter reads the grid: the token frames are stacked top to
bottom as one (F * H, W) grid, as Wan's. ``read_call`` hands the trace the packed sample as a (B, F,
H, W, C) view.

Frames (:meth:`LTXAdapter.frame_layout`): the VAE compresses time by 8; its decoder's three
temporal upsamplers each double the frames and drop the first, so ``L`` latent frames decode to
``8 (L - 1) + 1`` video frames: video frame 0 from latent frame 0, frames ``8 j - 7 .. 8 j`` from
latent frame ``j`` (``FrameLayout.causal(L, rows, temporal=8)``). The published decoder's
convolutions are not causal, so a latent frame also touches the frames next to its own; the
layout is where each frame's features are unpacked from (tests/test_ltx.py checks it with a causal
decoder, where it is exactly the latest latent frame that changes a video frame).

Not traced (refused with a ``TraceError``): ``LTXImageToVideoPipeline``, ``LTXConditionPipeline``
and ``LTXI2VLongMultiPromptPipeline`` (conditioning latents join the noise with their own
timesteps and coordinates), a transformer call with ``video_coords`` or without the latent sizes,
transformers with ``patch_size`` or ``patch_size_t`` other than 1, and real-video attribution.
LTX-2 (``LTX2VideoTransformer3DModel``, audio and video) is another family.

>>> from daami2i.testing import tiny_ltx_pipeline
>>> import daami2i
>>> pipe = tiny_ltx_pipeline()
>>> with daami2i.trace(pipe) as trc:
...     _ = pipe("a red fox", num_frames=17, height=64, width=96, num_inference_steps=1, max_sequence_length=16)
>>> gen = trc.last_generation
>>> gen.grid_size, gen.image_size, gen.frames.token_frames, gen.frames.video_frames  # 3 frames of 2 x 3
((6, 3), (192, 96), 3, 17)
>>> gen.frames.source[:10]
(0, 1, 1, 1, 1, 1, 1, 1, 1, 2)
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
    RealRequest,
    RealRun,
    Size,
    Stream,
    timestep_value,
    transformer_of,
)

#: LTX pipelines whose transformer call carries more than text and noise (not traced)
_REFUSED = {
    "LTXImageToVideoPipeline": "image-to-video (the image's latents join the noise with their own timesteps)",
    "LTXConditionPipeline": "conditioned generation (image / video conditions with per-token coordinates)",
    "LTXI2VLongMultiPromptPipeline": "long multi-prompt image-to-video (windows of conditioned latents)",
}

#: positions of the latent sizes in ``LTXVideoTransformer3DModel.forward``'s arguments
_SIZE_ARGS = {"num_frames": 4, "height": 5, "width": 6}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, index: int) -> Any:
    """A forward argument given by keyword or by position."""
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _latent_sizes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int] | None:
    """(frames, height, width) of the latent, as the forward arguments give them, or None."""
    sizes = [_arg(args, kwargs, name, i) for name, i in _SIZE_ARGS.items()]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        return None
    f, h, w = sizes
    return f, h, w


class LTXAdapter(FamilyAdapter):
    name = "ltx"
    pipelines = (
        "LTX-Video 0.9.x text-to-video (an LTXVideoTransformer3DModel `transformer`: LTXPipeline; "
        "frames stacked top to bottom)"
    )
    reads_attention_function = True  # q and k after QK-norm and the rotary embedding
    word_heads_kept = False  # 28 layers x 32 heads of N x T per video: the head mean
    default_steps = 50

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = transformer_of(pipe, "LTXVideoTransformer3DModel")
        if transformer is None:
            return None
        for cls in type(pipe).__mro__:
            if cls.__name__ in _REFUSED:
                raise TraceError(
                    f"{type(pipe).__name__} is LTX-Video {_REFUSED[cls.__name__]}: daami2i traces LTX-Video "
                    "text-to-video (LTXPipeline) so far"
                )
        config = transformer.config
        p, pt = int(config.patch_size), int(config.patch_size_t)
        if (p, pt) != (1, 1):
            raise TraceError(
                f"this LTX-Video transformer has patch_size={p}, patch_size_t={pt}: daami2i traces the published "
                "patch 1 (LTXPipeline gives the rotary embedding the latent sizes, which only fit patch 1)"
            )
        return transformer

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (name.startswith("transformer_blocks.") and callable(getattr(module, "set_processor", None))):
                continue
            if name.endswith(".attn1"):
                sites.append(AttentionSite(name, module, "self", "block", 1))
            elif name.endswith(".attn2"):
                sites.append(AttentionSite(name, module, "cross", "block", 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states (B, F*H*W, C), encoder_hidden_states (B, T, D), timestep,
        encoder_attention_mask, num_frames=F, height=H, width=W, ...)``: the sample is handed on as a
        (B, F, H, W, C) view when the sizes fit the tokens, else as it came (``geometry`` refuses it)."""
        sample = _arg(args, kwargs, "hidden_states", 0)
        context = _arg(args, kwargs, "encoder_hidden_states", 1)
        t = _arg(args, kwargs, "timestep", 2)
        sizes = _latent_sizes(args, kwargs)
        coords = _arg(args, kwargs, "video_coords", 8)
        if (
            coords is None
            and sizes is not None
            and isinstance(sample, torch.Tensor)
            and sample.dim() == 3
            and sample.shape[1] == sizes[0] * sizes[1] * sizes[2]
        ):
            sample = sample.unflatten(1, sizes)  # (B, F, H, W, C): frame-major tokens
        return DenoiserCall(sample, context, timestep_value(t))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
            shape = tuple(getattr(sample, "shape", ()))
            sizes = _latent_sizes((), kwargs)
            raise TraceError(
                "the LTX-Video transformer was called without packed (B, frames * height * width, C) latents whose "
                "num_frames / height / width arguments fit them (got "
                f"{type(sample).__name__} of shape {shape}, sizes {sizes}, video_coords "
                f"{'given' if kwargs.get('video_coords') is not None else 'none'}): daami2i reads the grid from those "
                "arguments, as LTXPipeline passes them"
            )
        f, h, w = (int(v) for v in sample.shape[1:4])
        latent = (f * h, w)  # the latent frames stacked top to bottom; patch 1: one token per latent pixel
        return latent, latent

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout:
        """Video frame 0 from latent frame 0, then 8 video frames per latent frame (see the module docstring)."""
        latent_frames = int(call.sample.shape[1])
        temporal = int(getattr(pipe, "vae_temporal_compression_ratio", 8) or 8)
        layout = FrameLayout.causal(latent_frames, grid[0] // latent_frames, temporal)
        note = (
            f"LTX-Video VAE: the first video frame from latent frame 0, then {temporal} video frames per latent "
            "frame (each temporal upsampler doubles the frames and drops the first); patch 1"
        )
        return FrameLayout(layout.token_frames, layout.rows, layout.source, note)

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        return latent_size  # patch 1: one token per latent position, every layer

    def default_latent(self, denoiser: Any) -> Size:
        """LTX-Video's published 161 frames of 480 x 704: 21 latent frames of 15 x 22, stacked."""
        return 21 * 15, 22

    def pixel_scale(self, pipe: Any) -> int:
        """The VAE scales space by 32 (``vae_spatial_compression_ratio``)."""
        return int(getattr(pipe, "vae_spatial_compression_ratio", 32) or 32)

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        raise TraceError("attribution of a real video is not supported yet; trace a generation with daami2i.trace")

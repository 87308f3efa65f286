"""CogVideoX text to video (``CogVideoXTransformer3DModel``, ``CogVideoXPipeline``): 1.0 (2b, 5b) and
1.5 (``patch_size_t = 2``).

Every block has one attention layer (``transformer_blocks.{i}.attn1``) that is **joint**:
``CogVideoXAttnProcessor2_0`` joins the T5 text and the video tokens into ``[text, video]`` and calls
``F.scaled_dot_product_attention`` once (q and k after QK-norm, RoPE on the video part only), where
daami2i reads it. The text is the ``max_sequence_length`` (226) T5 positions the pipeline encoded
without a mask: the padding positions are keys of every query (they take a share of each row) but
never word columns, since the stream is labelled from the ids the encoder received
(``Stream(encoder="text_encoder")``). Guidance is one batch ``[uncond, cond]`` (the pipeline has no
``do_classifier_free_guidance`` attribute; it is read from ``encode_prompt``'s argument).

Video tokens are frame-major over a (B, F, C, H, W) latent cut into ``patch_size`` x ``patch_size``
patches (1.5: pairs of latent frames), stored as the token frames stacked top to bottom, as Wan's.

Frames (:meth:`CogVideoXAdapter.frame_layout`). The VAE decodes latent frames in chunks of
``vae.num_latent_frames_batch_size`` (2; the first chunk takes the odd remainder too): a chunk of
``s`` latent frames gives ``4 (s - 1) + 1`` frames when ``s`` is odd (its first latent frame one
video frame, every other one 4) and ``4 s`` when even (4 each). So an odd count ``L`` of decoded
latent frames gives ``4 (L - 1) + 1`` frames (49 frames: 13), an even one ``4 L`` (45 frames: 12 ->
48). CogVideoX 1.5 pads the latent frames at the front to a multiple of 2 and drops those frames
before decoding; the number it added lives only in ``CogVideoXPipeline.__call__``'s local
``additional_frames``, which the adapter reads from the running call's frame (0 when the transformer
runs outside the pipeline). How it was checked (tests/test_cogvideox.py): decoding one latent frame
+1 at a time with the tiny VAE's GroupNorms applied per frame (the stock ones mix the frames of a
chunk), the decoded frames that change are exactly those from the frame's first one onwards, so the
latest latent frame that changes a video frame is its source, for 1..7 latent frames; with the stock
VAE each chunk's first changed frame agrees; in a 1.5 run, changing padded latent frame 0 after the
last step changes no decoded frame, changing frame 1 changes all of them.

Not traced: the image-to-video, video-to-video and Fun-control pipelines (their transformers take
image or control latents beside the noise, and their layouts are unverified here) and real-video
attribution.

>>> from daami2i.testing import tiny_cogvideox_pipeline
>>> import daami2i
>>> pipe = tiny_cogvideox_pipeline(patch_size_t=2)
>>> with daami2i.trace(pipe) as trc:
...     _ = pipe("a red fox", num_frames=9, height=32, width=32, num_inference_steps=1, max_sequence_length=16)
>>> gen = trc.last_generation
>>> gen.grid_size, gen.frames.token_frames, gen.frames.video_frames  # 3 latent frames padded to 4: 2 token frames
((4, 2), 2, 9)
>>> gen.frames.source  # padded latent frame 0 is dropped: video frame 0 is latent frame 1, in token frame 0
(0, 1, 1, 1, 1, 1, 1, 1, 1)
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from ...errors import TraceError
from ...heatmaps.frames import FrameLayout
from .base import (
    AttentionSite,
    DenoiserCall,
    JointLayerOrder,
    RealRequest,
    RealRun,
    Size,
    Stream,
    timestep_value,
    transformer_of,
    video_sample,
)

#: CogVideoX pipelines whose transformer call carries more than text and noise (not traced yet)
_REFUSED = {
    "CogVideoXImageToVideoPipeline": "image-to-video (the image latents join the noise)",
    "CogVideoXVideoToVideoPipeline": "video-to-video (its frames come from the input video)",
    "CogVideoXFunControlPipeline": "Fun control (the control video's latents join the noise)",
}


def decoded_sources(latent_frames: int, temporal: int = 4, batch: int = 2) -> list[int]:
    """Per decoded video frame, the latent frame it comes from, for ``AutoencoderKLCogVideoX``'s chunked
    decoding (``batch`` latent frames a chunk, the first one with the remainder).

    >>> decoded_sources(3)
    [0, 1, 1, 1, 1, 2, 2, 2, 2]
    >>> decoded_sources(2)
    [0, 0, 0, 0, 1, 1, 1, 1]
    >>> len(decoded_sources(13)), len(decoded_sources(12)), decoded_sources(1)
    (49, 48, [0])
    """
    if latent_frames < 1 or temporal < 1 or batch < 1:
        raise TraceError(f"cannot decode {latent_frames} latent frames (time by {temporal}, chunks of {batch})")
    first = latent_frames if latent_frames < batch else batch + latent_frames % batch
    chunks = [first] + [batch] * ((latent_frames - first) // batch)  # latent frames per chunk
    out: list[int] = []
    start = 0
    for size in chunks:
        for j in range(start, start + size):
            # an odd chunk keeps its first frame once and stretches the others; an even one stretches all
            out += [j] * (1 if size % 2 and j == start else temporal)
        start += size
    return out


def _added_frames(pipe: Any) -> int | None:
    """The latent frames the running ``CogVideoXPipeline.__call__`` of ``pipe`` padded at the front
    (its local ``additional_frames``), None when the transformer runs outside it, -1 when it runs inside
    the pipeline's call but that local is not found (a changed diffusers)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            if local.get("self") is pipe and "additional_frames" in local:
                value = local["additional_frames"]
                return int(value) if isinstance(value, int) else -1
            if local.get("self") is pipe and frame.f_code.co_name == "__call__":
                return -1  # inside the pipeline's call, but its padding is not where it used to be
            frame = frame.f_back
        return None
    finally:
        del frame


class CogVideoXAdapter(JointLayerOrder):
    name = "cogvideox"
    pipelines = (
        "CogVideoX 1.0 / 1.5 text-to-video (a CogVideoXTransformer3DModel `transformer`: CogVideoXPipeline; "
        "frames stacked top to bottom)"
    )
    reads_attention_function = True
    text_first = True
    guidance_from_encode_prompt = True  # no do_classifier_free_guidance attribute on the pipeline
    word_heads_kept = False  # 42 layers x 48 heads of N x T per video: the head mean
    default_steps = 50

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = transformer_of(pipe, "CogVideoXTransformer3DModel")
        if transformer is None:
            return None
        for cls in type(pipe).__mro__:
            if cls.__name__ in _REFUSED:
                raise TraceError(
                    f"{type(pipe).__name__} is CogVideoX {_REFUSED[cls.__name__]}: daami2i traces CogVideoX "
                    "text-to-video (CogVideoXPipeline) so far"
                )
        config = transformer.config
        if int(config.in_channels) != int(config.out_channels) or getattr(config, "ofs_embed_dim", None):
            raise TraceError(
                f"this CogVideoX transformer takes {config.in_channels} input channels for {config.out_channels} "
                "output ones (image or control latents beside the noise: an image-to-video or control model): "
                "daami2i traces CogVideoX text-to-video so far"
            )
        return transformer

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        return [
            AttentionSite(name, module, "joint", "block", 1)
            for name, module in denoiser.named_modules()
            if name.startswith("transformer_blocks.") and callable(getattr(module, "set_processor", None))
        ]

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states (B, F, C, H, W), encoder_hidden_states (B, T, D), timestep, ...)``."""
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        f, h, w = video_sample(call, "CogVideoX transformer", frames_axis=1)
        p, pt = _patches(denoiser)
        if f % pt:
            raise TraceError(
                f"the CogVideoX 1.5 transformer got {f} latent frames, not a multiple of its patch_size_t={pt} "
                "(CogVideoXPipeline pads them; pass latents with a multiple of it)"
            )
        if h % p or w % p:
            raise TraceError(
                f"the CogVideoX latent is {h}x{w}, not a multiple of the transformer's patch size {p}: ask for a "
                f"height and width that are multiples of {8 * p} pixels"
            )
        latent = (f // pt * h, w)  # the token frames' latents stacked top to bottom
        return self.layer_grid(denoiser, latent, 1), latent

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout:
        """Which token frame each decoded video frame comes from (see the module docstring)."""
        latent_frames = int(call.sample.shape[1])
        _, pt = _patches(denoiser)
        added = _added_frames(pipe) if pt > 1 else 0
        if added == -1:
            added = None
            warnings.warn(
                "daami2i could not read how many latent frames CogVideoXPipeline padded in front (its local "
                "'additional_frames'; a newer diffusers?): the video-frame mapping assumes none, so frame= and "
                "expand_as may be off by the padding",
                UserWarning,
                stacklevel=2,
            )
        dropped = added if added is not None and 0 <= added < latent_frames else 0
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
        batch = int(getattr(getattr(pipe, "vae", None), "num_latent_frames_batch_size", 2) or 2)
        kept = latent_frames - dropped
        source = tuple((dropped + j) // pt for j in decoded_sources(kept, temporal, batch))
        token_frames = latent_frames // pt
        note = (
            f"CogVideoX VAE: {kept} latent frames decode in chunks of {batch} ({temporal} video frames per latent "
            "frame, an odd chunk's first one frame); "
            f"{pt} latent frame(s) per token frame"
        )
        if dropped:
            note += f"; the first {dropped} (padding) latent frame(s) are not decoded"
        elif pt > 1 and added is None:
            note += "; the transformer ran outside CogVideoXPipeline: no padding frames assumed"
        return FrameLayout(token_frames, grid[0] // token_frames, source, note)

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        p, _ = _patches(denoiser)
        return latent_size[0] // p, latent_size[1] // p

    def default_latent(self, denoiser: Any) -> Size:
        """The transformer's sample size (49 frames of 60 x 90 latents for 1.0, 81 of 300 x 300 for 1.5)."""
        config = denoiser.config
        _, pt = _patches(denoiser)
        latent_frames = (int(config.sample_frames) - 1) // int(config.temporal_compression_ratio) + 1
        return -(-latent_frames // pt) * int(config.sample_height), int(config.sample_width)

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        raise TraceError("attribution of a real video is not supported yet; trace a generation with daami2i.trace")


def _patches(denoiser: Any) -> tuple[int, int]:
    """(spatial patch size, latent frames per token frame)."""
    config = denoiser.config
    return int(config.patch_size), int(getattr(config, "patch_size_t", None) or 1)

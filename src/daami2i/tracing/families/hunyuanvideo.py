"""HunyuanVideo 1.0 text to video (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoPipeline``).

Layers. The dual-stream blocks (``transformer_blocks.{i}.attn``, added q / k / v projections for the
text) and the single-stream blocks (``single_transformer_blocks.{i}.attn``, one projection of the
fused sequence) all run **joint** attention over ``[video, text]``, read where
``HunyuanVideoAttnProcessor2_0`` calls ``dispatch_attention_fn`` (q and k after the per-head RMS
QK-norm, RoPE on the video part only). The token refiner in front of them
(``context_embedder.token_refiner.*``, text-only self-attention through diffusers'
``AttnProcessor2_0``) is never a site.

Text. The Llama text encoder receives the prompt formatted into the pipeline's chat template,
padded to ``crop_start + max_sequence_length``; the pipeline drops the first ``crop_start`` positions
(the template's system prefix: 95 in the real tokenizer) and the transformer masks the padding keys
with a boolean (B, 1, 1, N) mask. The stream is labelled from the ids the encoder received, its
dropped prefix being the received rows' length minus the text keys (so any ``prompt_template`` /
``crop_start``, even one that keeps some template tokens before the prompt, labels the same words);
padding is never a word column. The CLIP encoder only feeds the pooled embedding (no keys).

Guidance. HunyuanVideo 1.0 is guidance-distilled: ``guidance_scale`` goes into a guidance embedding
and there is no guidance batch. ``true_cfg_scale > 1`` with a negative prompt runs true CFG as a
second transformer call per step (``cache_context("uncond")``) on the very same latents tensor:
the passes are kept apart (``halves="cond"`` never sees the negative prompt; ``"uncond"`` is its
call; ``"both"`` their mean).

Video. Latents (B, C, F, H, W), ``patch_size`` 2 (``patch_size_t`` 1), tokens frame-major, stored as
the token frames stacked top to bottom; the causal VAE gives ``4 (F - 1) + 1`` video frames (frame 0
from latent frame 0, 4 per later one).

Not traced (clear errors): image-to-video (``HunyuanVideoImageToVideoPipeline``, SkyReels, a
transformer with ``image_condition_type``), FramePack (``HunyuanVideoFramepackTransformer3DModel``)
and real-video attribution. HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, another class)
has its own adapter (``hunyuanvideo15.py``).

>>> from daami2i.testing.hunyuanvideo import prompt_template, tiny_hunyuanvideo_pipeline
>>> import daami2i
>>> pipe = tiny_hunyuanvideo_pipeline()
>>> with daami2i.trace(pipe) as trc:
...     _ = pipe("a red fox", num_frames=5, height=32, width=48, num_inference_steps=1,
...              max_sequence_length=16, prompt_template=prompt_template())
>>> gen = trc.last_generation
>>> sorted(trc.attention_layers)  # the refiner's attention is not among them
['single_transformer_blocks.0.attn', 'transformer_blocks.0.attn']
>>> gen.grid_size, gen.frames.token_frames, gen.frames.source
((4, 3), 2, (0, 1, 1, 1, 1))
"""

from __future__ import annotations

from typing import Any

from ...errors import TraceError
from ...heatmaps.frames import FrameLayout
from .base import (
    AttentionSite,
    DenoiserCall,
    JointLayerOrder,
    PassTracker,
    RealRequest,
    RealRun,
    Size,
    Stream,
    timestep_value,
    video_sample,
)
from .flux import _SameLatents

#: pipelines around a HunyuanVideo transformer that are not traced (yet), and why
_REFUSED = {
    "HunyuanVideoImageToVideoPipeline": "image-to-video (the image's latents and tokens join the noise and the text)",
    "HunyuanSkyreelsImageToVideoPipeline": "SkyReels image-to-video (the image's latents join the noise)",
    "HunyuanVideoFramepackPipeline": "FramePack (history latents and image tokens join the sequence)",
}
#: transformer classes of the family that this adapter does not trace (yet)
_OTHER_MODELS = {
    "HunyuanVideoFramepackTransformer3DModel": "HunyuanVideo FramePack",
}


def _class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


class HunyuanVideoAdapter(JointLayerOrder):
    name = "hunyuanvideo"
    pipelines = (
        "HunyuanVideo 1.0 text-to-video (a HunyuanVideoTransformer3DModel `transformer`: HunyuanVideoPipeline; "
        "frames stacked top to bottom)"
    )
    reads_attention_function = True
    text_first = False  # [video, text]
    guidance_as_passes = True  # true CFG: the negative prompt as a second call
    word_heads_kept = False  # 60 layers x 24 heads of N x T per video: the head mean
    default_steps = 50
    second_pass_hint = "HunyuanVideo runs true CFG only with negative_prompt=... and true_cfg_scale > 1"

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = getattr(pipe, "transformer", None)
        if transformer is None or getattr(pipe, "unet", None) is not None:
            return None
        names = _class_names(transformer)
        for model, what in _OTHER_MODELS.items():
            if model in names:
                raise TraceError(
                    f"{type(pipe).__name__} runs a {model} ({what}): daami2i traces HunyuanVideo 1.0 text-to-video "
                    "(HunyuanVideoPipeline) so far"
                )
        if "HunyuanVideoTransformer3DModel" not in names:
            return None
        for cls in type(pipe).__mro__:
            if cls.__name__ in _REFUSED:
                raise TraceError(
                    f"{type(pipe).__name__} is HunyuanVideo {_REFUSED[cls.__name__]}: daami2i traces HunyuanVideo "
                    "text-to-video (HunyuanVideoPipeline) so far"
                )
        condition = getattr(transformer.config, "image_condition_type", None)
        if condition is not None:
            raise TraceError(
                f"this HunyuanVideo transformer has image_condition_type={condition!r} (an image-to-video model): "
                "daami2i traces HunyuanVideo text-to-video so far"
            )
        return transformer

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        """Dual- and single-stream blocks; the token refiner (``context_embedder``) is not a site."""
        sites = []
        for name, module in denoiser.named_modules():
            if not callable(getattr(module, "set_processor", None)):
                continue
            if name.startswith("transformer_blocks.") and name.endswith(".attn"):
                sites.append(AttentionSite(name, module, "joint", "double", 1))
            elif name.startswith("single_transformer_blocks.") and name.endswith(".attn"):
                sites.append(AttentionSite(name, module, "joint", "single", 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states (B, C, F, H, W), timestep, encoder_hidden_states (B, T, D),
        encoder_attention_mask (B, T), pooled_projections, guidance, ...)``."""
        sample = args[0] if args else kwargs.get("hidden_states")
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def new_pass_tracker(self) -> PassTracker:
        return _SameLatents()  # the negative prompt's call gets the very same latents tensor

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        f, h, w = video_sample(call, "HunyuanVideo transformer")
        p, pt = _patches(denoiser)
        if f % pt or h % p or w % p:
            raise TraceError(
                f"the HunyuanVideo latent has {f} frames of {h}x{w}, not a multiple of the transformer's patches "
                f"({pt}, {p}, {p}): ask for a height and width that are multiples of {8 * p} pixels"
            )
        latent = (f // pt * h, w)  # the token frames' latents stacked top to bottom
        return self.layer_grid(denoiser, latent, 1), latent

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout:
        latent_frames = int(call.sample.shape[2])
        _, pt = _patches(denoiser)
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
        return FrameLayout.causal(latent_frames, grid[0] // (latent_frames // pt), temporal, pt)

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        p, _ = _patches(denoiser)
        return latent_size[0] // p, latent_size[1] // p

    def default_latent(self, denoiser: Any) -> Size:
        return 33 * 90, 160  # 129 frames of 720 x 1280: 33 latent frames of 90 x 160, stacked

    def pixel_scale(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("llama", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def dropped_positions(self, stream: Stream, received: list[list[int]], n_keys: int) -> int:
        """The template prefix the pipeline cropped: every row the encoder received is ``crop_start +
        max_sequence_length`` long (padded to it) and the transformer keeps its last ``n_keys``."""
        longest = max((len(row) for row in received), default=n_keys)
        return max(0, longest - n_keys)

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        raise TraceError("attribution of a real video is not supported yet; trace a generation with daami2i.trace")


def _patches(denoiser: Any) -> tuple[int, int]:
    """(spatial patch size, latent frames per token frame)."""
    config = denoiser.config
    return int(config.patch_size), int(getattr(config, "patch_size_t", None) or 1)

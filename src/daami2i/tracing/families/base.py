"""What a model family adapter declares: the only place that knows a family.

Every adapter answers the same questions, so :class:`~daami2i.tracing.trace.Trace` and the recorder
have no family branches: where the attention layers are and how their query and key are read; how
to read one denoiser call (its latent sample, text states and timestep); the geometry (latent ->
token grid); the token layout of a joint sequence; the text streams whose tokens are attention keys;
the guidance convention (batch halves, or separate passes in one step); and how to run the denoiser
on a real image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ...errors import TraceError
from ...heatmaps.frames import FrameLayout

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a denoiser."""

    name: str  # module path, e.g. "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    module: Any  # the diffusers Attention module
    # joint: image and text keys in one softmax (SD3, Flux); temporal: each pixel's tokens across frames
    # as queries and keys (AnimateDiff's motion modules)
    kind: Literal["self", "cross", "joint", "temporal"]
    block: str  # "down" / "mid" / "up" (UNet), "double" / "single" (MMDiT)
    factor: int  # spatial downsampling factor of its resolution relative to the latent (1, 2, 4, ...)
    #: what weighs the keys when the layer is read from its ``to_q`` / ``to_k`` projections:
    #: ``"softmax"`` (softmax(q k^T * scale + mask)), or ``"relu_linear"`` for linear attention
    #: (Sana's self-attention): relu(q) relu(k)^T divided by its row sum (+ 1e-15), in float32
    kernel: Literal["softmax", "relu_linear"] = "softmax"
    #: which of the processor's attention-function calls is the layer's attention (0: the first; Wan
    #: I2V's cross-attention first attends to the image context, then to the text: 1)
    call: int = 0


@dataclass(frozen=True)
class Stream:
    """A text stream whose tokens are keys of joint attention: which tokenizer, which prompt argument,
    where its keys are."""

    name: str  # "clip" or "t5"
    tokenizer: str  # pipeline attribute holding the tokenizer
    prompt_arg: str  # argument of the pipeline's check_inputs holding this stream's prompt
    offset: int  # first text-key column of the stream in the joint sequence's text part
    width: int | None  # number of text-key columns (None: to the end)
    bos: int  # 1 if the tokenizer puts a start token before the prompt, else 0
    lowercase: bool = False  # the pipeline lowercases the prompt before this tokenizer sees it (PixArt)
    #: pipeline attribute of the text encoder: when set, the stream's labels and positions come from
    #: the ids that encoder actually received in this generation (hooked), found by locating the
    #: prompt's tokens in them, so a chat template or a system prompt around the prompt cannot shift
    #: the labels; ``bos`` is then ignored
    encoder: str | None = None
    #: encoder positions the pipeline drops from the front of the encoder's output before it becomes
    #: keys (Qwen-Image's template prefix); only with ``encoder``
    dropped: int = 0


@dataclass(frozen=True)
class DenoiserCall:
    """What one denoiser call is made of, as the adapter reads it from its arguments."""

    sample: Any  # the latent sample (UNet, SD3: (B, C, H, W); Flux: packed tokens (B, N, C))
    context: Any  # the text states (encoder_hidden_states), if any
    timestep: float | None  # the first timestep value, if given
    #: how each attention call captured during this denoiser call becomes the layout the recorder
    #: reads (Lumina 2: per-item [valid text, image, padding] -> [text slots, image]); None: as captured
    rewrite: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class RealRequest:
    """What :func:`daami2i.trace_image` was asked: the image, its caption and the family options."""

    image: Any
    prompt: str
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None  # SD3 / Flux: the T5 prompt length (None: the pipeline's)
    guidance_scale: float = 3.5  # Flux-dev's distilled guidance input


@dataclass
class RealRun:
    """A denoiser prepared to run on a real image's latents: ``call(noisy, t)`` runs it at training
    timestep ``t``, ``noise(latents, noise, t)`` noises the latents as the family's scheduler does."""

    latents: torch.Tensor
    image_size: Size  # (height, width) of the preprocessed image
    call: Callable[[torch.Tensor, int], Any]
    noise: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class PassTracker:
    """Tells whether a denoiser call repeats the step of the previous call (a second guidance pass).
    The base never sees repeats: each call is a new step (UNets run both halves in one batch)."""

    def is_repeat(self, call: DenoiserCall, started: bool) -> bool:
        return False


class FamilyAdapter:
    """Base of the adapters; each subclass describes one model family (see the module docstring)."""

    name: ClassVar[str]
    pipelines: ClassVar[str]  # what it supports, for the unsupported-pipeline error
    #: q and k are read where the processor hands them to its attention function (after QK-norm and
    #: rotary embeddings) rather than from the ``to_q`` / ``to_k`` projections
    reads_attention_function: ClassVar[bool] = False
    #: the joint sequence is [text, image] rather than [image, text]
    text_first: ClassVar[bool] = False
    #: conditional and unconditional guidance run as separate denoiser calls within one step
    guidance_as_passes: ClassVar[bool] = False
    #: the text part of a joint sequence may have another length in each denoiser call (Qwen-Image
    #: pads a call's prompts to their own longest, so the negative prompt's pass differs); a kept text
    #: column past a call's text reads as zero there
    text_length_varies: ClassVar[bool] = False
    #: word maps keep each head apart (DAAM's aggregation); otherwise the head mean is kept
    word_heads_kept: ClassVar[bool] = True
    #: daam-i2i's trace options (low_memory, keep_heads) and layer order apply
    predecessor_layers: ClassVar[bool] = False
    #: the prompt's CLIP tokens come from the pipeline's ``tokenizer`` (no joint text streams)
    single_clip_stream: ClassVar[bool] = False
    #: the pipeline has no ``do_classifier_free_guidance`` attribute: guidance is read from the
    #: ``do_classifier_free_guidance`` argument of its ``encode_prompt`` call (PixArt)
    guidance_from_encode_prompt: ClassVar[bool] = False
    #: video whose spatial layers see each frame as a batch item (AnimateDiff: batch ``B * F``): their
    #: self-attention is kept per frame, their word maps with the frames stacked
    frame_batch: ClassVar[bool] = False
    #: the guidance batch is ``[cond; uncond]`` (Z-Image) rather than ``[uncond; cond]``
    cond_first: ClassVar[bool] = False
    #: the pipeline method whose arguments hold the prompts, called once per generation before the
    #: denoiser (``check_inputs``; Z-Image has none and is read at ``encode_prompt``)
    prompt_method: ClassVar[str] = "check_inputs"
    #: denoising steps assumed by :meth:`Trace.estimate_nbytes` when the number is not known
    default_steps: ClassVar[int] = 50
    #: what a second pass needs, for the error when ``halves="uncond"`` finds none
    second_pass_hint: ClassVar[str] = ""

    def denoiser_of(self, pipe: Any) -> Any | None:
        """The pipeline's denoiser if this family handles it, else None."""
        raise NotImplementedError

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        raise NotImplementedError

    def extra_denoisers(self, pipe: Any, denoiser: Any) -> list[tuple[str, Any]]:
        """Further denoisers that take over some of the steps (Wan 2.2's ``transformer_2``), as
        (pipeline attribute, module): traced like the first, their layers named ``<attribute>.<name>``."""
        return []

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        raise NotImplementedError

    def new_pass_tracker(self) -> PassTracker:
        return PassTracker()

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        """(token grid, latent size) of one denoiser call; ``grid_factor`` is the finest self-attention factor."""
        raise NotImplementedError

    def frame_layout(self, pipe: Any, denoiser: Any, call: DenoiserCall, grid: Size) -> FrameLayout | None:
        """Video families: how the stacked token ``grid`` (frames * rows, columns) splits into token
        frames and which token frame each decoded video frame comes from; None for images."""
        return None

    def reference_tokens(self, call: DenoiserCall, grid: Size) -> int:
        """Image tokens after the output grid's in a joint sequence that are not the output (Flux
        Kontext's reference image, Z-Image's padding): attended to, but neither queried nor stored as
        self-attention; ``[text, image, reference]`` or ``[image, reference, text]``."""
        return 0

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        """(height, width) of the tokens of a layer at ``factor`` for a latent of ``latent_size``."""
        return size_at(latent_size, factor)

    def default_latent(self, denoiser: Any) -> Size:
        """The latent size of the denoiser's default sample size."""
        side = int(getattr(denoiser.config, "sample_size", 64) or 64)
        return side, side

    def pixel_scale(self, pipe: Any) -> int:
        """Pixels per latent position of the pipeline's VAE, for the generation's ``image_size``:
        ``vae_scale_factor`` (video pipelines: ``vae_scale_factor_spatial``), else 8."""
        scale: Any = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
        return int(scale)

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        """Joint models: the text streams whose tokens are keys, for a context of ``n_text`` tokens."""
        return []

    def dropped_positions(self, stream: Stream, received: list[list[int]], n_keys: int) -> int:
        """Encoder positions the pipeline dropped before the stream's key columns, given the id rows
        its encoder ``received`` in this generation and the stream's ``n_keys`` key columns; by default
        ``stream.dropped`` (Sana: the instruction before the prompt, so per call)."""
        return stream.dropped

    def check_site(self, site: AttentionSite) -> None:
        """Raise when a layer's installed processor hides what the capture reads."""

    def predecessor_order(
        self, sites: list[AttentionSite], kind: str, low_memory: bool
    ) -> list[tuple[str, AttentionSite]]:
        """(label, site) in the order the predecessors count ``layer_idx``; by default the layers of
        ``kind`` in module order, labelled by their names."""
        return [(s.name, s) for s in sites if s.kind == kind]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        """Encode a real image and its caption for :func:`daami2i.trace_image`."""
        raise NotImplementedError


class PatchedAdapter(FamilyAdapter):
    """A transformer on one grid of ``patch_size`` x ``patch_size`` patches of a (B, C, H, W) latent
    (SD3, PixArt, Sana, Lumina 2, HiDream): its geometry and every layer's grid."""

    model_label: ClassVar[str] = "diffusion"  # how errors name the model

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        return patch_geometry(denoiser, call, self.model_label)

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        p = int(denoiser.config.patch_size)
        return latent_size[0] // p, latent_size[1] // p


class JointLayerOrder(FamilyAdapter):
    """The predecessors' ``layer_idx`` counts the joint layers in module order, whatever the kind
    (a joint layer serves word maps and self-attention alike), labelled by their module names."""

    def predecessor_order(
        self, sites: list[AttentionSite], kind: str, low_memory: bool
    ) -> list[tuple[str, AttentionSite]]:
        return [(s.name, s) for s in sites if s.kind == "joint"]


def transformer_of(pipe: Any, class_name: str) -> Any | None:
    """The pipeline's ``transformer`` when it is a ``class_name`` (or a subclass) and there is no UNet."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or getattr(pipe, "unet", None) is not None:
        return None
    return transformer if class_name in {cls.__name__ for cls in type(transformer).__mro__} else None


def patch_geometry(denoiser: Any, call: DenoiserCall, model: str) -> tuple[Size, Size]:
    """(token grid, latent size) of a (B, C, H, W) latent cut into ``patch_size`` x ``patch_size`` patches."""
    sample = call.sample
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise TraceError(
            f"the {model} transformer was called without a (B, C, H, W) latent (got {type(sample).__name__})"
        )
    p = int(denoiser.config.patch_size)
    latent = (int(sample.shape[-2]), int(sample.shape[-1]))
    return (latent[0] // p, latent[1] // p), latent


def video_sample(call: DenoiserCall, model: str, frames_axis: int = 2) -> tuple[int, int, int]:
    """(frames, height, width) of a video denoiser's 5-D latent, with a clear error for anything else;
    ``frames_axis`` 2 for (B, C, F, H, W), 1 for (B, F, C, H, W) (CogVideoX)."""
    sample = call.sample
    if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
        layout = "(B, C, frames, H, W)" if frames_axis == 2 else "(B, frames, C, H, W)"
        raise TraceError(
            f"the {model} was called without a {layout} latent "
            f"(got {type(sample).__name__} of shape {tuple(getattr(sample, 'shape', ()))})"
        )
    return int(sample.shape[frames_axis]), int(sample.shape[-2]), int(sample.shape[-1])


def size_at(latent: Size, factor: int) -> Size:
    """Spatial size after downsampling ``latent`` by ``factor`` (each stride-2 step rounds up)."""
    h, w = latent
    for _ in range(int(math.log2(factor))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def timestep_value(t: Any) -> float | None:
    """The first value of a timestep argument (tensor or number), or None."""
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0])
    return float(t) if t is not None else None

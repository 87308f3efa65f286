"""Z-Image (``ZImageTransformer2DModel``): a single-stream transformer called with *lists*, one entry
per batch item: latents (C, 1, H, W) and caption states (L_i, D) of each item's own length.

Where attention happens (``ZSingleStreamAttnProcessor`` calls ``dispatch_attention_fn`` with q and k
final: RMS QK-norm, then complex rotary embeddings):

* ``noise_refiner``: image-only self-attention before any text is joined; **not traced** (it has no
  text keys, its keys include the image's padding, and the main layers' image block gives the
  self-attention maps);
* ``context_refiner``: text-only; not traced;
* ``layers``: the main, joint layers, traced. Per item the sequence is ``[image, image padding,
  caption, caption padding]``: the image's tokens (row-major, 2x2 patches) and the caption's are each
  padded to a multiple of 32 (``SEQ_MULTI_OF``) with repeated tokens that are *not* masked; items
  whose sequences differ in length are padded to the longest and masked (a (B, 1, 1, S) boolean mask,
  only then). The image padding is declared as reference tokens (keys, never queried or stored), the
  caption padding has no word label: word columns come from the ids the Qwen3 encoder received
  (``Stream.encoder``), so the chat template around the prompt cannot shift labels.

Guidance runs in one batch ``[cond; uncond]`` (the reverse of most pipelines); guidance is on when
``guidance_scale > 0``. The pipelines have no ``check_inputs``: the prompts are read from
``encode_prompt``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import TraceError
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
    transformer_of,
)
from .sd3 import _encode, flow_noise

try:  # the transformer's own padding multiple
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
except ImportError:  # pragma: no cover - an older or newer diffusers without the constant
    SEQ_MULTI_OF = 32

PATCH = 2  # the pipelines call the transformer with its default patch_size


def padded(n: int) -> int:
    """``n`` tokens padded to the transformer's multiple."""
    return n + (-n) % SEQ_MULTI_OF


class _SteadyBatch(PassTracker):
    """One call per step; refuses a generation whose batch or text length changes between steps
    (``cfg_truncation < 1`` switches guidance off part-way, halving the batch)."""

    def __init__(self) -> None:
        self.first: tuple[int, int] | None = None

    def is_repeat(self, call: DenoiserCall, started: bool) -> bool:
        shape = (int(call.sample.shape[0]), int(call.context.shape[1]))
        if self.first is None or not started:
            self.first = shape
        elif shape != self.first:
            raise TraceError(
                f"the Z-Image transformer's batch changed during the generation (batch, padded text length) "
                f"{self.first} -> {shape}: cfg_truncation < 1 turns guidance off part-way, which daami2i cannot "
                "trace (use cfg_truncation=1.0, the default, or guidance_scale=0); or the pipeline was called with "
                "prompt_embeds and no prompt, so the trace did not see a new generation begin (pass the prompt)"
            )
        return False


class ZImageAdapter(JointLayerOrder):
    name = "zimage"
    pipelines = (
        "Z-Image (a ZImageTransformer2DModel `transformer`: ZImagePipeline, ZImageImg2ImgPipeline; "
        "not ZImageOmniPipeline)"
    )
    reads_attention_function = True
    word_heads_kept = False
    cond_first = True
    prompt_method = "encode_prompt"
    default_steps = 50

    def denoiser_of(self, pipe: Any) -> Any | None:
        if "Omni" in type(pipe).__name__:  # [text, image, SigLIP] per item: another layout
            return None
        return transformer_of(pipe, "ZImageTransformer2DModel")

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        """The main layers' attention (``layers.{i}.attention``), joint: image and text keys."""
        sites = []
        for name, module in denoiser.named_modules():
            if name.startswith("layers.") and name.endswith(".attention") and hasattr(module, "set_processor"):
                sites.append(AttentionSite(name, module, "joint", "main", 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(x, t, cap_feats, ...)``: the latents stacked to (B, C, H, W), the captions as
        one (B, T, D) tensor padded as the main layers' text part is (T: the longest item's caption
        padded to the multiple)."""
        x = args[0] if args else kwargs.get("x")
        t = args[1] if len(args) > 1 else kwargs.get("t")
        caps = args[2] if len(args) > 2 else kwargs.get("cap_feats")
        if not isinstance(x, (list, tuple)) or not x or not isinstance(caps, (list, tuple)) or len(caps) != len(x):
            raise TraceError(
                "the Z-Image transformer was called without one latent and one caption tensor per batch item "
                f"(got x={type(x).__name__}, cap_feats={type(caps).__name__})"
            )
        if not all(isinstance(xi, torch.Tensor) for xi in x):  # omni mode: a list of images per item
            raise TraceError("the Z-Image transformer was called in omni mode (several images per item): not traced")
        shapes = {tuple(xi.shape) for xi in x}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != 1:
            raise TraceError(
                f"the Z-Image transformer's latents are not one (C, 1, H, W) shape for every item: {sorted(shapes)}"
            )
        sample = torch.stack([xi[:, 0] for xi in x])  # (B, C, H, W)
        length = padded(max(int(c.shape[0]) for c in caps))
        context = caps[0].new_zeros(len(caps), length, int(caps[0].shape[-1]))  # (B, T, D)
        for i, c in enumerate(caps):
            context[i, : c.shape[0]] = c
        return DenoiserCall(sample, context, timestep_value(t))

    def new_pass_tracker(self) -> PassTracker:
        return _SteadyBatch()

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        p = int(kwargs.get("patch_size", PATCH))
        h, w = int(call.sample.shape[-2]), int(call.sample.shape[-1])
        if h % p or w % p:
            raise TraceError(f"a {h}x{w} Z-Image latent is not a whole number of {p}x{p} patches")
        return (h // p, w // p), (h, w)

    def reference_tokens(self, call: DenoiserCall, grid: Size) -> int:
        """The image's padding to the multiple of 32: keys of the softmax, neither pixels nor words."""
        n = grid[0] * grid[1]
        return padded(n) - n

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        return latent_size[0] // PATCH, latent_size[1] // PATCH

    def default_latent(self, denoiser: Any) -> Size:
        return 128, 128  # the pipelines' 1024 px default through the VAE's 8

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("qwen", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        """The latents as the img2img pipeline encodes them; the caption is encoded at the first call
        (inside the trace, so the text encoder's ids are seen); the transformer takes ``1 - t / 1000``."""
        latents, size, device, dtype = _encode(pipe, denoiser, request.image, request.height, request.width)
        b, _, lh, lw = latents.shape
        if lh % PATCH or lw % PATCH:
            side = PATCH * int(pipe.vae_scale_factor)
            raise TraceError(f"Z-Image needs image sides that are multiples of {side}, got {size[0]}x{size[1]}")
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        embeds: list[torch.Tensor] = []

        def call(noisy: torch.Tensor, t: int) -> Any:
            if not embeds:
                # the class's method: the trace patches the instance's to read a generation's prompts
                prompt_embeds, _ = type(pipe).encode_prompt(
                    pipe, request.prompt, device=device, do_classifier_free_guidance=False, **extra
                )
                embeds.extend(e.to(dtype) for e in prompt_embeds)
            tt = torch.full([b], (n_train - t) / n_train, device=device, dtype=dtype)
            return denoiser(list(noisy.unsqueeze(2).unbind(0)), tt, embeds * b, return_dict=False)

        return RealRun(latents, size, call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

"""Flux.2 Klein (``Flux2Transformer2DModel``): Flux's joint ``[text, image]`` sequences, Qwen3 text keys.

What differs from Flux.1 (:mod:`.flux`, whose geometry, reference tokens and pass tracking apply
unchanged): the single-stream blocks are ``Flux2ParallelSelfAttention`` layers whose q, k and v come
out of one fused projection with the MLP input (``to_qkv_mlp_proj``, no ``to_q`` / ``to_k``), and
their calls carry no ``encoder_hidden_states``: the text length is the model input's. The text is
one Qwen3 stream, padded to ``max_sequence_length`` (512) and unmasked in the transformer; the
pipeline wraps the prompt in Qwen's chat template before tokenising, so the labels come from the ids
the text encoder received (``Stream.encoder``). Position ids are (N, 4) ``t, h, w, l``; reference
images (editing) follow the output's tokens with ``t`` = 10, 20, ... Guidance is a second
transformer call per step (the empty prompt, inside ``cache_context("uncond")``) when
``guidance_scale > 1`` and the model is not step-distilled; it is never averaged with the first.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import QueryError, TraceError
from .base import AttentionSite, DenoiserCall, RealRequest, RealRun, Stream, timestep_value
from .flux import FluxAdapter
from .sd3 import flow_noise


def find_flux2_sites(transformer: Any) -> list[AttentionSite]:
    """Every attention layer of a Flux.2 transformer: the double-stream blocks' ``attn`` and the
    single-stream blocks' fused ``attn``; all joint, on the one image-token grid (factor 1)."""
    sites = []
    for name, module in transformer.named_modules():
        if not callable(getattr(module, "set_processor", None)):
            continue
        if name.startswith("transformer_blocks."):
            block = "double"
        elif name.startswith("single_transformer_blocks."):
            block = "single"
        else:
            continue
        sites.append(AttentionSite(name, module, "joint", block, 1))
    return sites


class Flux2Adapter(FluxAdapter):
    name = "flux2"
    pipelines = (
        "Flux.2 Klein (a Flux2Transformer2DModel `transformer` with a Qwen3 text encoder: Flux2KleinPipeline, "
        "its inpaint pipeline)"
    )
    model_class = "Flux2Transformer2DModel"
    default_steps = 50
    second_pass_hint = (
        "Flux.2 Klein runs the empty negative prompt as a second call only with guidance_scale > 1 on a model "
        "that is not step-distilled (is_distilled=False)"
    )

    def denoiser_of(self, pipe: Any) -> Any | None:
        denoiser = super().denoiser_of(pipe)
        if denoiser is None:
            return None
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is not None and "Qwen3" not in type(encoder).__name__:
            return None  # Flux2Pipeline's Mistral 3 encoder and its processor are another text stream
        return denoiser

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        return find_flux2_sites(denoiser)

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, ...)``; the KV-cache
        modes (reference keys cached between text and image, several attention calls per layer) are refused."""
        if kwargs.get("kv_cache_mode") is not None:
            raise TraceError(
                f"the Flux.2 transformer was called with kv_cache_mode={kwargs['kv_cache_mode']!r} "
                "(Flux2KleinKVPipeline with reference images): its reference keys sit between the text and the "
                "image and are attended in separate calls, a layout daami2i does not trace; use Flux2KleinPipeline "
                "with the same image=..., which appends the reference tokens as keys"
            )
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("qwen3", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        """The real image through the VAE as Klein encodes its reference images (mode, 2x2 patches,
        batch-norm statistics), noised by rectified flow and denoised at ``t / 1000``."""
        device, dtype = denoiser.device, denoiser.dtype
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(request.image, height=request.height, width=request.width)
        h, w = (int(s) for s in pixels.shape[-2:])
        if h % (2 * pipe.vae_scale_factor) or w % (2 * pipe.vae_scale_factor):
            raise QueryError(f"Flux.2 needs image sides that are multiples of {2 * pipe.vae_scale_factor}, got {h}x{w}")
        # (B, 4C, h / 2s, w / 2s): the VAE's mode, 2x2 patches, normalised by its batch-norm statistics
        latents = pipe._encode_vae_image(pixels.to(device=device, dtype=vae.dtype), None).to(dtype)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, text_ids = pipe.encode_prompt(prompt=request.prompt, device=device, **extra)
        ids = pipe._prepare_latent_ids(latents).to(device)  # (B, N, 4): t, h, w, l
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            packed = pipe._pack_latents(noisy)  # (B, N, 4C)
            tt = torch.full([packed.shape[0]], t / n_train, device=device, dtype=dtype)  # Klein passes t / 1000
            return denoiser(
                hidden_states=packed,
                timestep=tt,
                guidance=None,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=ids,
                return_dict=False,
            )

        return RealRun(latents, (h, w), call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

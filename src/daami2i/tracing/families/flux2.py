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
``Flux2KleinKVPipeline`` with a reference image caches the reference tokens' keys: its calls are
rewritten into the same ``[text, image, reference]`` layout (:func:`_kv_layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ...errors import QueryError, TraceError
from .base import AttentionSite, DenoiserCall, RealRequest, RealRun, Size, Stream, timestep_value
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


def _kv_layout(n_text: int, n_ref: int, n_img: int) -> Callable[[Any], Any]:
    """The rewrite of the joint calls of a KV-cache denoiser call (``Flux2KleinKVPipeline`` with
    reference images). The first attention call of each layer there has the queries ``[text, image]``
    and the keys ``[text, reference, image]`` (cached, or extracted in the first step; the reference
    tokens' own self-attention is a second call, not read). The keys are put in the order
    ``[text, image, reference]`` (a softmax does not depend on the order of its keys) and the queries
    padded with zero rows for the reference tokens, which are never queried: Kontext's layout."""

    def rewrite(call: Any) -> Any:
        b, heads, s_q, d = call.q.shape
        if s_q != n_text + n_img or call.k.shape[2] != n_text + n_ref + n_img or call.bias is not None:
            raise TraceError(
                f"layer {call.layer} attended over {s_q} queries and {call.k.shape[2]} keys in a Flux.2 KV-cache call "
                f"with {n_text} text, {n_ref} reference and {n_img} image tokens: this layout is not one daami2i "
                "understands"
            )
        k = call.k
        k = torch.cat([k[:, :, :n_text], k[:, :, n_text + n_ref :], k[:, :, n_text : n_text + n_ref]], dim=2)
        q = torch.cat([call.q, call.q.new_zeros(b, heads, n_ref, d)], dim=2)  # shape: (B, H, T + N + R, D)
        return dataclasses.replace(call, q=q, k=k)

    return rewrite


class Flux2Adapter(FluxAdapter):
    name = "flux2"
    pipelines = (
        "Flux.2 Klein (a Flux2Transformer2DModel `transformer` with a Qwen3 text encoder: Flux2KleinPipeline, "
        "its inpaint and KV-cache pipelines)"
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
        """``forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, ...)``; in a KV-cache
        mode each captured call is rewritten into the ``[text, image, reference]`` layout (:func:`_kv_layout`)."""
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        mode = kwargs.get("kv_cache_mode")
        if mode is None:
            return DenoiserCall(sample, context, timestep_value(t))
        if mode == "extract":
            n_ref = int(kwargs.get("num_ref_tokens", 0) or 0)
        elif mode == "cached":
            cache = kwargs.get("kv_cache")
            n_ref = int(getattr(cache, "num_ref_tokens", 0) or 0) if cache is not None else 0
        else:
            raise TraceError(
                f"the Flux.2 transformer was called with kv_cache_mode={mode!r}, which daami2i does not know"
            )
        if not isinstance(sample, torch.Tensor) or not isinstance(context, torch.Tensor) or n_ref <= 0:
            return DenoiserCall(sample, context, timestep_value(t))  # the transformer runs plain attention then
        n_img = int(sample.shape[1]) - (n_ref if mode == "extract" else 0)
        return DenoiserCall(sample, context, timestep_value(t), _kv_layout(int(context.shape[1]), n_ref, n_img))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        """Flux's geometry from the (N, 4) ids; in the KV cache's first step the reference tokens come
        first (``[reference, output]``), so the output's tokens are the ids with ``t = 0``."""
        ids = kwargs.get("img_ids")
        if kwargs.get("kv_cache_mode") == "extract" and isinstance(ids, torch.Tensor) and ids.shape[-1] == 4:
            ids = ids[0] if ids.dim() == 3 else ids
            out = ids[ids[:, 0] == 0]
            grid = (int(out[:, 1].max().item()) + 1, int(out[:, 2].max().item()) + 1) if len(out) else (0, 0)
            if grid[0] * grid[1] != out.shape[0] or not bool((ids[ids.shape[0] - out.shape[0] :, 0] == 0).all()):
                raise TraceError(
                    "the Flux.2 transformer's img_ids in kv_cache_mode='extract' do not end with one full grid of "
                    "output tokens: this layout is not one daami2i understands"
                )
            return grid, (grid[0] * 2, grid[1] * 2)
        return super().geometry(denoiser, call, kwargs, grid_factor)

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

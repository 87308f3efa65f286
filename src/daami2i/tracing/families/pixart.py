"""PixArt-Σ and PixArt-α (``PixArtTransformer2DModel``): a transformer with UNet-style separate
layers, self-attention (``attn1``) and cross-attention to T5 (``attn2``, padding masked) in every
block, on one grid of 2x2 patches; guidance in one batch ``[uncond; cond]``, decided in
``encode_prompt`` (the pipelines have no ``do_classifier_free_guidance`` attribute); the prompt is
lowercased before T5 sees it."""

from __future__ import annotations

from typing import Any

import torch

from .base import (
    AttentionSite,
    DenoiserCall,
    PatchedAdapter,
    RealRequest,
    RealRun,
    Stream,
    timestep_value,
    transformer_of,
)


class PixArtAdapter(PatchedAdapter):
    name = "pixart"
    model_label = "PixArt"
    pipelines = (
        "PixArt-Σ / PixArt-α (a PixArtTransformer2DModel `transformer`: PixArtSigmaPipeline, PixArtAlphaPipeline)"
    )
    guidance_from_encode_prompt = True
    default_steps = 20

    def denoiser_of(self, pipe: Any) -> Any | None:
        return transformer_of(pipe, "PixArtTransformer2DModel")

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (
                hasattr(module, "set_processor") and hasattr(module, "to_q") and name.startswith("transformer_blocks.")
            ):
                continue
            kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
            sites.append(AttentionSite(name, module, kind, "transformer", 1))  # type: ignore[arg-type]
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return DenoiserCall(sample, context, timestep_value(kwargs.get("timestep")))

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer", "prompt", 0, None, 0, lowercase=True, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        device, dtype = denoiser.device, denoiser.dtype
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(request.image, height=request.height, width=request.width)
        pixels = pixels.to(device=device, dtype=vae.dtype)
        h, w = pixels.shape[-2:]
        latents = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).to(dtype)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, mask, _, _ = pipe.encode_prompt(
            request.prompt, do_classifier_free_guidance=False, device=device, clean_caption=False, **extra
        )
        b = latents.shape[0]
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(denoiser, "use_additional_conditions", False):  # PixArt-α 1024: size conditioning
            added = {
                "resolution": torch.tensor([[float(h), float(w)]], device=device, dtype=dtype).repeat(b, 1),
                "aspect_ratio": torch.tensor([[float(h) / float(w)]], device=device, dtype=dtype).repeat(b, 1),
            }

        def call(noisy: torch.Tensor, t: int) -> Any:
            return denoiser(
                noisy,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=torch.tensor([t], device=device).expand(b),
                added_cond_kwargs=added,
                return_dict=False,
            )

        def noise(x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
            return pipe.scheduler.add_noise(x, eps, torch.tensor([t], device=device))

        return RealRun(latents, (int(h), int(w)), call, noise)

"""UNet family (SD 1.x / 2.x, SDXL and their img2img / inpaint pipelines): ``UNet2DConditionModel``.

Self-attention (``attn1``) and cross-attention (``attn2``) are separate layers at several
resolutions; their query and key are read from the ``to_q`` / ``to_k`` projections. Guidance runs
both halves in one batch, ``[uncond; cond]``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...errors import UnsupportedPipelineError
from .base import AttentionSite, DenoiserCall, FamilyAdapter, RealRequest, RealRun, Size, size_at, timestep_value

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def find_sites(unet: Any) -> list[AttentionSite]:
    """Every attention layer of a UNet2DConditionModel, with its kind, block and resolution factor."""
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    sites = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(1) == "down_blocks":
            block, level = "down", int(m.group(2))
        elif m.group(1) == "up_blocks":
            block, level = "up", n_up - 1 - int(m.group(2))
        else:
            block, level = "mid", n_down - 1
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        sites.append(AttentionSite(name, module, kind, block, 2**level))  # type: ignore[arg-type]
    return sites


class UNetAdapter(FamilyAdapter):
    name = "unet"
    pipelines = (
        "SD 1.x / 2.x and SDXL (a UNet2DConditionModel `unet`: StableDiffusionPipeline, "
        "StableDiffusionXLPipeline and their img2img / inpaint variants)"
    )
    predecessor_layers = True
    single_clip_stream = True

    def denoiser_of(self, pipe: Any) -> Any | None:
        from diffusers import UNet2DConditionModel

        unet = getattr(pipe, "unet", None)
        return unet if isinstance(unet, UNet2DConditionModel) else None

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        return find_sites(denoiser)

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        sample = args[0] if args else kwargs.get("sample")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        return DenoiserCall(sample, context, timestep_value(t))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        latent = (int(call.sample.shape[-2]), int(call.sample.shape[-1]))
        return size_at(latent, grid_factor), latent

    def predecessor_order(
        self, sites: list[AttentionSite], kind: str, low_memory: bool
    ) -> list[tuple[str, AttentionSite]]:
        """daam-i2i's / DAAM's layer order: the self- (attn1) or cross- (attn2) attention layers of the
        up blocks, then of the down blocks (the mid block is never located), with ``low_memory`` the
        first transformer of each block only; labels ``'{up|down}-attn-{i}'`` restart in each block."""
        out = []
        for block in ("up", "down"):
            by_block: dict[int, list[AttentionSite]] = {}
            for s in sites:
                if s.kind == kind and s.block == block:
                    by_block.setdefault(int(s.name.split(".")[1]), []).append(s)
            for idx in sorted(by_block):
                for i, s in enumerate(by_block[idx][: 1 if low_memory else None]):
                    out.append((f"{block}-attn-{i}", s))
        return out

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        image, prompt, height, width = request.image, request.prompt, request.height, request.width
        if denoiser.config.in_channels != pipe.vae.config.latent_channels:
            raise UnsupportedPipelineError(
                f"real-image attribution needs a UNet that takes plain latents ({pipe.vae.config.latent_channels} "
                f"channels); this one takes {denoiser.config.in_channels} (an inpainting UNet?)"
            )
        device, dtype = denoiser.device, denoiser.dtype
        pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(
            device=device, dtype=pipe.vae.dtype
        )
        h, w = pixels.shape[-2:]
        latents = (pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor).to(dtype)
        extra: dict[str, Any] = {}
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: pooled text and size conditioning
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            time_ids = pipe._get_add_time_ids(
                (h, w),
                (0, 0),
                (h, w),
                dtype=embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).to(device)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        else:
            embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
        embeds = embeds.to(dtype)

        def call(noisy: torch.Tensor, t: int) -> Any:
            return denoiser(noisy, torch.tensor([t], device=device), encoder_hidden_states=embeds, **extra)

        def noise(latents: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
            return pipe.scheduler.add_noise(latents, eps, torch.tensor([t], device=device))

        return RealRun(latents, (int(h), int(w)), call, noise)

"""Real-image attribution: heat maps for an image the user already has.

The image is encoded with the pipeline's VAE, noised to a few timesteps (optionally several noise
draws each), and the denoiser is run once per (timestep, draw) under the trace with the caption as
its text condition. Every run counts as one captured "step", so the maps are sums over them exactly
as for a generated image, and every query of :class:`~daami2i.GlobalHeatMap` works unchanged.
UNet pipelines (SD 1.x/2.x, SDXL) and SD3 / Flux transformers are supported; the latter are called
with the inputs their own pipelines build (Flux: packed latents, position ids, distilled guidance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import QueryError, UnsupportedPipelineError
from .trace import Trace


@torch.no_grad()
def trace_image(
    pipe: Any,
    image: Any,
    prompt: str,
    *,
    timesteps: Sequence[int] = (200, 400, 600),
    draws: int = 1,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    guidance_scale: float = 3.5,
    **trace_options: Any,
) -> Trace:
    """Trace the denoiser on a real ``image`` described by ``prompt``; returns the finished trace.

    >>> from daami2i.testing import tiny_sd_pipeline
    >>> from PIL import Image
    >>> pipe = tiny_sd_pipeline()
    >>> trc = trace_image(pipe, Image.new("RGB", (96, 64), "white"), "a red cat", timesteps=(300,))
    >>> trc.compute_global_heat_map().compute_word_heat_map("cat").value.shape
    torch.Size([8, 12])

    ``timesteps`` are on the scheduler's training scale (0 = clean, ``num_train_timesteps`` = pure
    noise); ``draws`` noise samples are averaged per timestep. Only the conditional pass is run
    (there is no guidance), so ``halves`` is always ``"cond"``. Other keywords go to :class:`Trace`.

    SD3 and Flux (rectified flow) are noised as ``(1 - s) x + s e`` with ``s = t / num_train_timesteps``;
    ``max_sequence_length`` is their T5 prompt length (the pipeline's default if None) and
    ``guidance_scale`` Flux-dev's distilled guidance input.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise QueryError(f"prompt must be a non-empty caption of the image, got {prompt!r}")
    if not isinstance(draws, int) or draws < 1:
        raise QueryError(f"draws must be a positive integer, got {draws!r}")
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    steps = [int(t) for t in timesteps]
    if not steps or any(not 0 <= t < n_train for t in steps):
        raise QueryError(f"timesteps must be a non-empty list in [0, {n_train - 1}], got {list(timesteps)!r}")
    if trace_options.get("halves", "cond") != "cond":
        raise QueryError("real-image attribution runs only the conditional pass: halves must be 'cond'")
    trc = Trace(pipe, **trace_options)
    if trc.family is not None:
        return _joint(
            pipe, trc, image, prompt, steps, draws, generator, height, width, max_sequence_length, guidance_scale
        )
    unet = trc.unet
    if unet.config.in_channels != pipe.vae.config.latent_channels:
        raise UnsupportedPipelineError(
            f"real-image attribution needs a UNet that takes plain latents ({pipe.vae.config.latent_channels} "
            f"channels); this one takes {unet.config.in_channels} (an inpainting UNet?)"
        )
    device, dtype = unet.device, unet.dtype
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=pipe.vae.dtype)
    h, w = pixels.shape[-2:]
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = latents.to(dtype)
    unet_kwargs: dict[str, Any] = {}
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
        unet_kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
    with trc:
        trc._begin(prompt)
        trc._cfg_override = False
        try:
            for t in steps:
                for _ in range(draws):
                    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, dtype)
                    tt = torch.tensor([t], device=device)
                    noisy = pipe.scheduler.add_noise(latents, noise, tt)
                    unet(noisy, tt, encoder_hidden_states=embeds.to(dtype), **unet_kwargs)
        finally:
            trc._cfg_override = None
    gen = trc.last_generation
    gen.image_size = (int(h), int(w))
    from PIL import Image

    gen.images = [image] if isinstance(image, Image.Image) else []
    return trc


def _joint(
    pipe: Any,
    trc: Trace,
    image: Any,
    prompt: str,
    steps: list[int],
    draws: int,
    generator: torch.Generator | None,
    height: int | None,
    width: int | None,
    max_sequence_length: int | None,
    guidance_scale: float,
) -> Trace:
    """:func:`trace_image` for SD3 / Flux: the transformer is called as their pipelines call it."""
    assert trc.family is not None
    transformer, vae = trc.unet, pipe.vae
    device, dtype = transformer.device, transformer.dtype
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=vae.dtype)
    h, w = pixels.shape[-2:]
    shift = vae.config.shift_factor or 0.0
    latents = ((vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor).to(dtype)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    kwargs: dict[str, Any]
    if trc.family.packed:  # Flux: 2x2 latent patches packed into tokens, positions as ids
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, **extra)
        b, c, lh, lw = latents.shape
        if lh % 2 or lw % 2:
            raise QueryError(f"Flux needs image sides that are multiples of {2 * pipe.vae_scale_factor}, got {h}x{w}")
        kwargs = {
            "pooled_projections": pooled,
            "encoder_hidden_states": embeds,
            "txt_ids": text_ids,
            "img_ids": pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype),
        }
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full([b], guidance_scale, device=device, dtype=torch.float32)
    else:  # SD3
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False, **extra
        )
        kwargs = {"pooled_projections": pooled, "encoder_hidden_states": embeds}
    with trc:
        trc._begin(prompt)
        trc._stream_prompts = {}
        trc._cfg_override = False
        try:
            for t in steps:
                for _ in range(draws):
                    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, dtype)
                    s = t / n_train
                    noisy = (1 - s) * latents + s * noise
                    if trc.family.packed:
                        noisy = pipe._pack_latents(noisy, *noisy.shape)
                        tt = torch.full([noisy.shape[0]], s, device=device, dtype=dtype)  # Flux takes t / 1000
                    else:
                        tt = torch.full([noisy.shape[0]], float(t), device=device, dtype=dtype)
                    transformer(hidden_states=noisy, timestep=tt, return_dict=False, **kwargs)
        finally:
            trc._cfg_override = None
    gen = trc.last_generation
    gen.image_size = (int(h), int(w))
    from PIL import Image

    gen.images = [image] if isinstance(image, Image.Image) else []
    return trc

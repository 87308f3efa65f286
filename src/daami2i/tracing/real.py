"""Real-image attribution: heat maps for an image the user already has.

The image is encoded with the pipeline's VAE, noised to a few timesteps (optionally several noise
draws each), and the denoiser is run once per (timestep, draw) under the trace with the caption as
its text condition. Every run counts as one captured "step", so the maps are sums over them exactly
as for a generated image, and every query of :class:`~daami2i.GlobalHeatMap` works unchanged.
Each model family's adapter encodes the image and caption and calls its denoiser as the family's own
pipeline does (``FamilyAdapter.prepare_real``; Flux: packed latents, position ids, distilled guidance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import QueryError
from .families import RealRequest
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
    request = RealRequest(image, prompt, height, width, max_sequence_length, guidance_scale)
    device, dtype = trc.unet.device, trc.unet.dtype
    with trc:
        trc._begin(prompt)
        trc._stream_prompts = {}
        trc._cfg_override = False
        try:
            run = trc.adapter.prepare_real(pipe, trc.unet, request)  # traced: its encoders' ids label words
            for t in steps:
                for _ in range(draws):
                    noise = torch.randn(run.latents.shape, generator=generator, dtype=torch.float32).to(device, dtype)
                    run.call(run.noise(run.latents, noise, t), t)
        finally:
            trc._cfg_override = None
    gen = trc.last_generation
    gen.image_size = run.image_size
    from PIL import Image

    gen.images = [image] if isinstance(image, Image.Image) else []
    return trc

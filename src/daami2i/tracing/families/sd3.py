"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint sequences ``[image, text]``; CLIP-L+G then T5 text
keys; guidance in one batch; the latent patched by ``patch_size``."""

from __future__ import annotations

from typing import Any

import torch

from .base import DenoiserCall, PassTracker, PatchedAdapter, RealRequest, RealRun, Size, Stream
from .mmdit import MMDiTAdapter


class _SameTimestep(PassTracker):
    """SD3's skip-layer guidance calls the transformer again at the same float32 timestep (not captured)."""

    def __init__(self) -> None:
        self.last: float | None = None

    def is_repeat(self, call: DenoiserCall, started: bool) -> bool:
        repeat = started and call.timestep is not None and call.timestep == self.last
        self.last = call.timestep
        return repeat


class SD3Adapter(MMDiTAdapter, PatchedAdapter):
    name = "sd3"
    model_label = "SD3"
    pipelines = "SD3 / SD3.5 (an SD3Transformer2DModel `transformer`: StableDiffusion3Pipeline and its img2img)"
    model_class = "SD3Transformer2DModel"

    def new_pass_tracker(self) -> PassTracker:
        return _SameTimestep()

    def default_latent(self, denoiser: Any) -> Size:
        side = int(getattr(denoiser.config, "sample_size", 128) or 128)
        return side, side

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        clip = int(getattr(pipe, "tokenizer_max_length", 77))
        out = [Stream("clip", "tokenizer", "prompt", 0, min(clip, n_text), 1)]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            out.append(Stream("t5", "tokenizer_3", "prompt_3", clip, None, 0, encoder="text_encoder_3"))
        return out

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        image, prompt, height, width = request.image, request.prompt, request.height, request.width
        latents, size, device, dtype = _encode(pipe, denoiser, image, height, width)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False, **extra
        )
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            tt = torch.full([noisy.shape[0]], float(t), device=device, dtype=dtype)
            return denoiser(
                hidden_states=noisy,
                timestep=tt,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                return_dict=False,
            )

        return RealRun(latents, size, call, lambda x, eps, t: flow_noise(x, eps, t / n_train))


def _encode(pipe: Any, denoiser: Any, image: Any, height: int | None, width: int | None) -> tuple[Any, Size, Any, Any]:
    """A real image through the VAE as rectified-flow pipelines scale it: (latents, (h, w), device, dtype)."""
    vae = pipe.vae
    device, dtype = denoiser.device, denoiser.dtype
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=vae.dtype)
    h, w = pixels.shape[-2:]
    shift = vae.config.shift_factor or 0.0
    latents = ((vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor).to(dtype)
    return latents, (int(h), int(w)), device, dtype


def flow_noise(latents: torch.Tensor, noise: torch.Tensor, s: float) -> torch.Tensor:
    """Rectified-flow noising: ``(1 - s) x + s e`` with ``s`` in [0, 1]."""
    return (1 - s) * latents + s * noise

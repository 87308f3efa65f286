"""Flux.1 (``FluxTransformer2DModel``): joint sequences ``[text, image]``; T5 text keys; latents packed
2x2 into tokens with position ids; true classifier-free guidance as a second transformer call."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ...errors import QueryError, TraceError
from .base import DenoiserCall, PassTracker, RealRequest, RealRun, Size, Stream
from .mmdit import MMDiTAdapter
from .sd3 import _encode, flow_noise


class _SameLatents(PassTracker):
    """Flux's true CFG runs the negative prompt on the very same latents tensor in the same step
    (timesteps cannot tell: bf16 rounds neighbouring ones together)."""

    def __init__(self) -> None:
        self.last: weakref.ref[torch.Tensor] | None = None

    def is_repeat(self, call: DenoiserCall, started: bool) -> bool:
        sample = call.sample
        last = self.last() if self.last is not None else None
        repeat = started and isinstance(sample, torch.Tensor) and last is sample
        self.last = weakref.ref(sample) if isinstance(sample, torch.Tensor) else None
        return repeat


class FluxAdapter(MMDiTAdapter):
    name = "flux"
    pipelines = "Flux.1 (a FluxTransformer2DModel `transformer`: FluxPipeline and its img2img)"
    model_class = "FluxTransformer2DModel"
    text_first = True
    guidance_as_passes = True
    second_pass_hint = "true classifier-free guidance needs negative_prompt=... and true_cfg_scale > 1"

    def new_pass_tracker(self) -> PassTracker:
        return _SameLatents()

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        ids = kwargs.get("img_ids")
        if not isinstance(ids, torch.Tensor) or ids.shape[-1] < 3:
            raise TraceError("the Flux transformer was called without img_ids, so the image grid is unknown")
        ids = ids[0] if ids.dim() == 3 else ids
        out = ids[ids[:, 0] == 0] if bool((ids[:, 0] != 0).any()) else ids  # Kontext: reference ids have 1
        grid = (int(out[:, 1].max().item()) + 1, int(out[:, 2].max().item()) + 1)
        if grid[0] * grid[1] != out.shape[0] or not bool((ids[: out.shape[0], 0] == 0).all()):
            raise TraceError(
                f"the Flux transformer's img_ids do not start with one full {grid[0]}x{grid[1]} grid of output "
                "tokens: this layout is not one daami2i understands"
            )
        return grid, (grid[0] * 2, grid[1] * 2)  # each token packs a 2x2 latent patch

    def reference_tokens(self, call: DenoiserCall, grid: Size) -> int:
        """Kontext appends the reference image's tokens after the output's (its ids start with 1)."""
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or sample.dim() != 3:
            return 0
        return max(0, int(sample.shape[1]) - grid[0] * grid[1])

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        return latent_size[0] // 2, latent_size[1] // 2

    def default_latent(self, denoiser: Any) -> Size:
        side = int(getattr(denoiser.config, "sample_size", 128) or 128)
        return side, side

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer_2", "prompt_2", 0, None, 0, encoder="text_encoder_2")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        image, prompt, height, width = request.image, request.prompt, request.height, request.width
        latents, (h, w), device, dtype = _encode(pipe, denoiser, image, height, width)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, **extra)
        b, _, lh, lw = latents.shape
        if lh % 2 or lw % 2:
            raise QueryError(f"Flux needs image sides that are multiples of {2 * pipe.vae_scale_factor}, got {h}x{w}")
        kwargs: dict[str, Any] = {
            "pooled_projections": pooled,
            "encoder_hidden_states": embeds,
            "txt_ids": text_ids,
            "img_ids": pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype),
        }
        if denoiser.config.guidance_embeds:
            kwargs["guidance"] = torch.full([b], request.guidance_scale, device=device, dtype=torch.float32)
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            packed = pipe._pack_latents(noisy, *noisy.shape)
            tt = torch.full([packed.shape[0]], t / n_train, device=device, dtype=dtype)  # Flux takes t / 1000
            return denoiser(hidden_states=packed, timestep=tt, return_dict=False, **kwargs)

        return RealRun(latents, (h, w), call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

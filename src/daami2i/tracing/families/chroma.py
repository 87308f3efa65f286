"""Chroma (``ChromaTransformer2DModel``): Flux's layout and processors, T5 alone (its padding masked
in the joint attention), the negative prompt as a second transformer call in each step."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import QueryError
from .base import RealRequest, RealRun, Stream
from .flux import FluxAdapter
from .sd3 import _encode, flow_noise


class ChromaAdapter(FluxAdapter):
    name = "chroma"
    pipelines = "Chroma (a ChromaTransformer2DModel `transformer`: ChromaPipeline and its img2img)"
    model_class = "ChromaTransformer2DModel"
    second_pass_hint = "Chroma runs the negative prompt as a second call only with guidance_scale > 1"

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("t5", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        latents, (h, w), device, dtype = _encode(pipe, denoiser, request.image, request.height, request.width)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, text_ids, text_mask, *_ = pipe.encode_prompt(
            prompt=request.prompt, device=device, do_classifier_free_guidance=False, **extra
        )
        b, _, lh, lw = latents.shape
        if lh % 2 or lw % 2:
            raise QueryError(f"Chroma needs image sides that are multiples of {2 * pipe.vae_scale_factor}, got {h}x{w}")
        ids = pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype)
        mask = pipe._prepare_attention_mask(b, ids.shape[0], dtype, text_mask)
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            packed = pipe._pack_latents(noisy, *noisy.shape)
            tt = torch.full([packed.shape[0]], t / n_train, device=device, dtype=dtype)
            return denoiser(
                hidden_states=packed,
                timestep=tt,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=ids,
                attention_mask=mask,
                return_dict=False,
            )

        return RealRun(latents, (h, w), call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

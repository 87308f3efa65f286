"""Sana and Sana Sprint (``SanaTransformer2DModel``): a transformer with separate layers in every
block, on one grid of 1x1 patches (the DC-AE latent scales by 32):

* self-attention (``attn1``) is *linear*: ``SanaLinearAttnProcessor2_0`` computes no softmax and
  calls no attention function. What it weighs the values by is, per head, in float32,
  ``w_ij = relu(q_i) . relu(k_j) / (sum_j' relu(q_i) . relu(k_j') + 1e-15)`` (q and k after the
  layer's QK-norm, which Sprint applies across heads before the split; no scale, no mask; a query
  whose relu is zero weighs nothing). The layer is read from its ``to_q`` / ``to_k`` projections
  and its site says ``kernel="relu_linear"``, so the recorder computes exactly these weights;
* cross-attention (``attn2``) is softmax attention to Gemma-2's last hidden states, read where
  ``SanaAttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` with the padding mask as an
  additive (B, heads, 1, keys) bias.

The text keys: the pipeline puts its complex human instruction (a long system prompt) before the
prompt, tokenises ``instruction + prompt`` to ``n_instruction + max_sequence_length - 2`` tokens
and keeps the encoder's first output (``<bos>``) and its last ``max_sequence_length - 1``. So the
stream is labelled from the ids Gemma received (``Stream.encoder``), and the positions the selection
drops are the received length minus the key count, per call (:meth:`SanaAdapter.dropped_positions`).
Guidance: one batch ``[uncond; cond]`` (``do_classifier_free_guidance``); Sana Sprint embeds its
guidance and runs one batch of images.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...errors import TraceError
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

#: the processor of Sana's linear self-attention, whose weights the ``relu_linear`` kernel computes
LINEAR_PROCESSOR = "SanaLinearAttnProcessor2_0"


class SanaAdapter(PatchedAdapter):
    name = "sana"
    model_label = "Sana"
    pipelines = (
        "Sana / Sana Sprint (a SanaTransformer2DModel `transformer`: SanaPipeline, SanaSprintPipeline; "
        "linear self-attention read as relu(q) relu(k)^T, row-normalised)"
    )
    default_steps = 20
    second_pass_hint = "Sana runs both guidance halves in one batch; Sana Sprint has no unconditional pass"

    def denoiser_of(self, pipe: Any) -> Any | None:
        return transformer_of(pipe, "SanaTransformer2DModel")

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (
                hasattr(module, "set_processor") and hasattr(module, "to_q") and name.startswith("transformer_blocks.")
            ):
                continue
            if getattr(module, "is_cross_attention", False):
                sites.append(AttentionSite(name, module, "cross", "transformer", 1))
                continue
            linear = type(module.get_processor()).__name__ == LINEAR_PROCESSOR
            kernel = "relu_linear" if linear else "softmax"
            sites.append(AttentionSite(name, module, "self", "transformer", 1, kernel))  # type: ignore[arg-type]
        return sites

    def check_site(self, site: AttentionSite) -> None:
        proc = type(site.module.get_processor()).__name__
        linear = proc == LINEAR_PROCESSOR
        if site.kernel == "relu_linear" and not linear:
            raise TraceError(
                f"layer {site.name} ran Sana's linear attention when the trace was made but now has the processor "
                f"{proc}: make the trace after setting the processors"
            )
        if site.kernel == "softmax" and "Linear" in proc:
            raise TraceError(
                f"layer {site.name} runs the linear-attention processor {proc}, which daami2i cannot read (only "
                f"{LINEAR_PROCESSOR}); use the model's default processor while tracing"
            )

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("gemma", "tokenizer", "prompt", 0, None, 0, lowercase=True, encoder="text_encoder")]

    def dropped_positions(self, stream: Stream, received: list[list[int]], n_keys: int) -> int:
        """The pipeline keeps the encoder's first position and its last ``n_keys - 1``: a prompt's
        key column is its encoder position minus (row length - ``n_keys``). The prompt's rows are
        the longest (the instruction before it; the negative prompt is encoded without one)."""
        return max(0, max((len(row) for row in received), default=n_keys) - n_keys)

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        if bool(getattr(denoiser.config, "guidance_embeds", False)):
            raise TraceError(
                "daami2i.trace_image does not noise real images for Sana Sprint (its SCM schedule); use a Sana "
                "pipeline (SanaPipeline) or trace a generation"
            )
        device, dtype = denoiser.device, denoiser.dtype
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(request.image, height=request.height, width=request.width)
        pixels = pixels.to(device=device, dtype=vae.dtype)
        h, w = pixels.shape[-2:]
        latents = (vae.encode(pixels).latent * vae.config.scaling_factor).to(dtype)  # (1, C, H/32, W/32)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        instruction = _default_instruction(pipe)  # as the pipeline's own generations encode the prompt
        embeds, mask, _, _ = pipe.encode_prompt(
            request.prompt,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            complex_human_instruction=instruction,
            **extra,
        )
        b = latents.shape[0]
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        t_scale = float(getattr(denoiser.config, "timestep_scale", 1.0) or 1.0)

        def call(noisy: torch.Tensor, t: int) -> Any:
            return denoiser(
                noisy,
                encoder_hidden_states=embeds.to(dtype),
                encoder_attention_mask=mask,
                timestep=torch.full([b], float(t) * t_scale, device=device),
                return_dict=False,
            )

        def noise(x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
            s = t / n_train  # flow matching: the pipeline's sigmas are its timesteps / num_train_timesteps
            return (1 - s) * x + s * eps

        return RealRun(latents, (int(h), int(w)), call, noise)


def _default_instruction(pipe: Any) -> list[str] | None:
    """The complex human instruction the pipeline's ``__call__`` puts before prompts by default."""
    try:
        param = inspect.signature(pipe.__call__).parameters.get("complex_human_instruction")
    except (TypeError, ValueError):
        return None
    default = param.default if param is not None else None
    return list(default) if isinstance(default, (list, tuple)) else None

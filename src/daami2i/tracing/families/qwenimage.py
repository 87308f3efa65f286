"""Qwen-Image (``QwenImageTransformer2DModel``): double-stream blocks whose joint sequence is
``[text, image]`` (``QwenDoubleStreamAttnProcessor2_0``, read at its ``dispatch_attention_fn`` call,
after QK-norm and rotary embeddings; text padding masked there by a boolean (B, 1, 1, S) mask).

The text keys are Qwen2.5-VL's last hidden states of the prompt formatted into the pipeline's chat
template, with the template's first ``prompt_template_encode_start_idx`` positions (its system
prefix) dropped: the stream takes its labels from the ids the text encoder received. Latents are
packed 2x2 into tokens; ``img_shapes`` gives each item's token grid (Edit and Edit Plus: the
reference images' grids follow the output's; those tokens are keys, not output, and their vision
tokens sit in the prompt's template before the prompt, in the kept positions: the labels come from
the received ids all the same). True classifier-free guidance runs
the negative prompt as a second transformer call on the same latents in each step (``cache_context``
"cond" then "uncond"); its text may have another length.

>>> from daami2i.testing import tiny_qwenimage_pipeline
>>> from daami2i.tracing.families import adapter_for
>>> pipe = tiny_qwenimage_pipeline()
>>> adapter = adapter_for(pipe)[1]
>>> adapter.name, adapter.text_first, adapter.guidance_as_passes
('qwenimage', True, True)
>>> adapter.text_streams(pipe, 8)[0].dropped == pipe.prompt_template_encode_start_idx
True
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch

from ...errors import QueryError, TraceError
from .base import DenoiserCall, PassTracker, RealRequest, RealRun, Size, Stream, timestep_value
from .mmdit import MMDiTAdapter
from .sd3 import flow_noise


class _SameInput(PassTracker):
    """The negative prompt's call repeats the step's input: the very same latents tensor (text to
    image), or an equal one at the same timestep (Edit concatenates the latents and the reference
    image's tokens anew for each call)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None  # a copy of the previous call's sample
        self.last_t: float | None = None

    def is_repeat(self, call: DenoiserCall, started: bool) -> bool:
        sample, last = call.sample, self.last
        if not isinstance(sample, torch.Tensor):
            self.last, self.last_t = None, None
            return False
        repeat = (
            started
            and last is not None
            and call.timestep == self.last_t
            and last.shape == sample.shape
            and last.device == sample.device
            and bool(torch.equal(last, sample))
        )
        self.last, self.last_t = sample.detach().clone(), call.timestep
        return repeat


class QwenImageAdapter(MMDiTAdapter):
    name = "qwenimage"
    pipelines = (
        "Qwen-Image (a QwenImageTransformer2DModel `transformer`: QwenImagePipeline, QwenImageEditPipeline and "
        "QwenImageEditPlusPipeline, whose reference images' tokens are keys after the output's)"
    )
    model_class = "QwenImageTransformer2DModel"
    text_first = True
    guidance_as_passes = True
    #: the negative prompt's pass has its own text length (the pipeline pads to the longest prompt of a call)
    text_length_varies = True
    default_steps = 50
    second_pass_hint = "true classifier-free guidance needs negative_prompt=... and true_cfg_scale > 1"

    def new_pass_tracker(self) -> PassTracker:
        return _SameInput()

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        # forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes, ...)
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        return DenoiserCall(sample, context, timestep_value(t))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        shapes: Any = kwargs.get("img_shapes")
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or sample.dim() != 3:
            raise TraceError(
                "the Qwen-Image transformer was called without packed (B, tokens, C) latents "
                f"(got {type(sample).__name__})"
            )
        try:
            item = list(shapes[0])  # (frames, h, w) per image of the first item: the output, then references
            frames, h, w = (int(v) for v in item[0])
            total = sum(prod(int(v) for v in s) for s in item)
        except (TypeError, ValueError, IndexError, KeyError) as err:
            raise TraceError(
                f"the Qwen-Image transformer was called without img_shapes [[(1, h, w), ...], ...] (got {shapes!r}), "
                "so the image grid is unknown"
            ) from err
        if frames != 1 or total != int(sample.shape[1]):
            raise TraceError(
                f"the Qwen-Image transformer's img_shapes {item} do not describe its {int(sample.shape[1])} image "
                "tokens as one output frame (and reference images): this layout is not one daami2i understands"
            )
        return (h, w), (h * 2, w * 2)  # each token packs a 2x2 latent patch

    def reference_tokens(self, call: DenoiserCall, grid: Size) -> int:
        """Edit appends the reference image's tokens after the output's."""
        sample = call.sample
        if not isinstance(sample, torch.Tensor) or sample.dim() != 3:
            return 0
        return max(0, int(sample.shape[1]) - grid[0] * grid[1])

    def layer_grid(self, denoiser: Any, latent_size: Size, factor: int) -> Size:
        return latent_size[0] // 2, latent_size[1] // 2

    def default_latent(self, denoiser: Any) -> Size:
        return 128, 128  # the pipelines' default_sample_size: 1024 px at a VAE scaling by 8

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        dropped = int(getattr(pipe, "prompt_template_encode_start_idx", 0) or 0)
        return [Stream("qwen", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder", dropped=dropped)]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        if type(pipe).__name__.startswith("QwenImageEdit") or getattr(pipe, "processor", None) is not None:
            raise TraceError(
                f"daami2i.trace_image does not attribute real images with an edit pipeline ({type(pipe).__name__}: "
                "its reference image joins the text encoder's prompt and the transformer's keys); trace the edit "
                "itself with daami2i.trace, or a QwenImagePipeline with the same transformer"
            )
        device, dtype = denoiser.device, denoiser.dtype
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(request.image, height=request.height, width=request.width)
        pixels = pixels.to(device=device, dtype=vae.dtype)
        h, w = (int(s) for s in pixels.shape[-2:])
        lh, lw = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
        if lh % 2 or lw % 2 or lh * pipe.vae_scale_factor != h or lw * pipe.vae_scale_factor != w:
            raise QueryError(
                f"Qwen-Image needs image sides that are multiples of {2 * pipe.vae_scale_factor}, got {h}x{w}"
            )
        z = int(vae.config.z_dim)
        mean = torch.tensor(vae.config.latents_mean, device=device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=device).view(1, z, 1, 1, 1)
        latents = vae.encode(pixels[:, :, None]).latent_dist.mean  # (B, z, 1, h, w): one video frame
        latents = ((latents - mean) / std).to(dtype)[:, :, 0]  # normalised as the pipelines do; (B, z, h, w)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, mask = pipe.encode_prompt(request.prompt, device=device, **extra)
        b = latents.shape[0]
        shapes = [[(1, lh // 2, lw // 2)]] * b
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full([b], request.guidance_scale, device=device, dtype=torch.float32)
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            packed = pipe._pack_latents(noisy, *noisy.shape)  # (B, h/2 * w/2, 4z)
            tt = torch.full([b], t / n_train, device=device, dtype=dtype)  # the pipelines pass t / 1000
            return denoiser(
                hidden_states=packed,
                timestep=tt,
                guidance=guidance,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=shapes,
                return_dict=False,
            )

        return RealRun(latents, (h, w), call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

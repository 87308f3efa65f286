"""Lumina 2 (``Lumina2Transformer2DModel``): a single-stream transformer. Its attention layers:

* ``context_refiner.*``: text-only self-attention over the caption; no image token, not traced;
* ``noise_refiner.*``: image-only self-attention before any text is mixed in; traced as ``"self"``
  layers (like SD3.5's image-only second attention), so they are among the default self-attention
  layers; choose others with ``self_layers=[...]`` (see ``trc.attention_layers``);
* ``layers.*``: joint attention over ``[valid text, image]`` per batch item: the caption keeps only
  its first ``encoder_attention_mask.sum()`` positions (its padding is cut, not masked), so the
  image starts at a different position in each item and each call, and the items are zero-padded
  at the end to the longest, with a key mask when the lengths differ.

The processor (``Lumina2AttnProcessor2_0``) calls ``F.scaled_dot_product_attention`` with its own
``scale`` and the key heads already repeated (grouped-query attention), so the capture reads final
q and k. Each captured joint call is rewritten (``DenoiserCall.rewrite``) into one fixed layout,
``[encoder positions 0..L-1, image]`` with ``L`` the text encoder's padded length: position ``j`` of
the caption is text column ``j`` in every item and pass, the cut padding positions become keys
masked out (probability exactly 0), and the trailing padding is dropped; so padding is never a label
nor a pixel. The text keys are the Gemma encoder's positions, which start with the pipeline's system
prompt: the prompt's tokens are located in the ids the encoder received (``Stream.encoder``).

Guidance: the prompt, then the negative prompt, as two transformer calls on the same latents tensor
in each step (no ``cache_context``); only the first ``cfg_trunc_ratio`` of the steps run the second.
The transformer's timestep is ``1 - t / 1000`` (0 = noise, 1 = clean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ...errors import QueryError, TraceError
from ...storage.recorder import AttentionCall
from .base import (
    AttentionSite,
    DenoiserCall,
    JointLayerOrder,
    PassTracker,
    PatchedAdapter,
    RealRequest,
    RealRun,
    Size,
    Stream,
    timestep_value,
    transformer_of,
)
from .flux import _SameLatents
from .sd3 import _encode, flow_noise


def _joint_layout(mask: torch.Tensor) -> Callable[[AttentionCall], AttentionCall]:
    """The rewrite of this denoiser call's joint attention calls for a caption padding ``mask`` (B, L):
    item ``i``'s ``[valid caption (L_i), image (N), padding]`` becomes ``[L slots, image (N)]`` with
    slots ``L_i..L-1`` masked keys (the query rows there are filler, never read).

    >>> q = torch.arange(5.0).view(1, 1, 5, 1)  # one head: 2 caption tokens, 3 image tokens
    >>> out = _joint_layout(torch.tensor([[1, 1, 0, 0]]))(AttentionCall("layers.0.attn", "joint", 1, q, q, None, 1.0))
    >>> out.k.flatten().tolist(), out.bias.flatten().tolist()
    ([0.0, 1.0, 0.0, 0.0, 2.0, 3.0, 4.0], [0.0, 0.0, -inf, -inf, 0.0, 0.0, 0.0])
    """
    lengths = mask.bool().sum(dim=1).tolist()  # valid caption tokens per item, as the model counts them
    width = int(mask.shape[1])

    def rewrite(call: AttentionCall) -> AttentionCall:
        if call.kind != "joint":  # the image-only noise refiner: already [image]
            return call
        b, heads, s, d = call.q.shape
        n = s - max(lengths)  # image tokens
        if len(lengths) != b or n <= 0 or call.k.shape[2] != s:
            raise TraceError(
                f"layer {call.layer} attended over {s} tokens with a batch of {b}, but the Lumina 2 caption mask "
                f"gives {len(lengths)} items of {lengths} valid text tokens: this layout is not one daami2i understands"
            )
        device = call.q.device
        slots = torch.arange(width + n, device=device)
        index = torch.zeros(b, width + n, dtype=torch.long, device=device)  # slot -> position in the call
        bias = torch.zeros(b, 1, 1, width + n, device=device)
        for i, length in enumerate(lengths):
            index[i, :length] = slots[:length]
            index[i, width:] = length + slots[:n]
            bias[i, ..., length:width] = -math.inf  # the caption's cut padding: keys that are not there
        if call.bias is not None:  # the model's own key mask (items of different lengths), moved along
            if call.bias.shape[-2] != 1:
                raise TraceError(f"layer {call.layer} has a per-query attention mask, which Lumina 2 does not use")
            own = call.bias.expand(b, 1, 1, s).gather(-1, index.view(b, 1, 1, -1))
            bias = bias + own
        take = index.view(b, 1, -1, 1).expand(b, heads, -1, d)
        q, k = call.q.gather(2, take), call.k.gather(2, take)  # (B, heads, L + N, d)
        return AttentionCall(call.layer, call.kind, call.factor, q, k, bias, call.scale)

    return rewrite


class Lumina2Adapter(JointLayerOrder, PatchedAdapter):
    name = "lumina2"
    model_label = "Lumina 2"
    pipelines = "Lumina 2 (a Lumina2Transformer2DModel `transformer`: Lumina2Pipeline)"
    reads_attention_function = True
    text_first = True
    guidance_as_passes = True
    word_heads_kept = False
    default_steps = 30
    second_pass_hint = (
        "Lumina 2 runs the negative prompt as a second call only with guidance_scale > 1, and only in the first "
        "cfg_trunc_ratio of the steps"
    )

    def denoiser_of(self, pipe: Any) -> Any | None:
        return transformer_of(pipe, "Lumina2Transformer2DModel")

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        sites = []
        for name, module in denoiser.named_modules():
            if not (hasattr(module, "set_processor") and hasattr(module, "to_q")):
                continue
            if name.startswith("noise_refiner."):
                sites.append(AttentionSite(name, module, "self", "noise_refiner", 1))
            elif name.startswith("layers."):
                sites.append(AttentionSite(name, module, "joint", "layers", 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        def arg(name: str, i: int) -> Any:
            return kwargs[name] if name in kwargs else args[i] if len(args) > i else None

        sample, context, mask = (
            arg("hidden_states", 0),
            arg("encoder_hidden_states", 2),
            arg("encoder_attention_mask", 3),
        )
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise TraceError(
                "the Lumina 2 transformer was called without an encoder_attention_mask (B, L): the caption "
                "length of its joint sequence is unknown"
            )
        if isinstance(context, torch.Tensor) and (context.dim() != 3 or tuple(context.shape[:2]) != tuple(mask.shape)):
            raise TraceError(
                f"the Lumina 2 transformer's encoder_hidden_states {tuple(context.shape)} and encoder_attention_mask "
                f"{tuple(mask.shape)} do not match"
            )
        return DenoiserCall(sample, context, timestep_value(arg("timestep", 1)), _joint_layout(mask))

    def new_pass_tracker(self) -> PassTracker:
        return _SameLatents()  # both guidance calls of a step get the very same latents tensor

    def default_latent(self, denoiser: Any) -> Size:
        side = int(getattr(denoiser.config, "sample_size", 128) or 128)
        return side, side

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        return [Stream("gemma", "tokenizer", "prompt", 0, None, 0, encoder="text_encoder")]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        latents, (h, w), device, dtype = _encode(pipe, denoiser, request.image, request.height, request.width)
        p = int(denoiser.config.patch_size)
        if latents.shape[-2] % p or latents.shape[-1] % p:
            raise QueryError(
                f"Lumina 2 needs image sides that are multiples of {p * pipe.vae_scale_factor}, got {h}x{w}"
            )
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        embeds, mask, _, _ = pipe.encode_prompt(
            request.prompt, do_classifier_free_guidance=False, device=device, **extra
        )
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            tt = torch.full([noisy.shape[0]], 1 - t / n_train, device=device, dtype=dtype)  # Lumina: 1 = clean
            return denoiser(
                hidden_states=noisy,
                timestep=tt,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                return_dict=False,
            )

        return RealRun(latents, (h, w), call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

"""HunyuanVideo 1.5 text to video (``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15Pipeline``).

Layers. Dual-stream blocks only (``transformer_blocks.{i}.attn``; 54 in the published model): each
runs **joint** attention over ``[video, text]``, read where ``HunyuanVideo15AttnProcessor2_0`` calls
``dispatch_attention_fn`` (q and k after the per-head RMS QK-norm, RoPE on the video part only). The
token refiner (``context_embedder.token_refiner.*``, text-only, diffusers' ``AttnProcessor2_0``) is
never a site.

Text. Three segments join the video: the image embedding (``image_embeds``, 729 tokens, all zero and
masked in text to video), the ByT5 glyph text (the prompt's quoted parts, 256 positions; all masked
when the prompt quotes nothing) and the Qwen2.5-VL text (the chat-templated prompt, ``1000`` positions
after the dropped system prefix). The transformer **reorders each item's text by its masks**:
``[valid image, valid ByT5, valid Qwen, padding image, padding ByT5, padding Qwen]``, so the Qwen tokens
start at another position in each call (the prompt and the negative prompt differ), and it masks
with a (B, 1, S, S) query-and-key mask. Every captured call is rewritten (``DenoiserCall.rewrite``)
into one layout, ``[video (N), ByT5 positions 0..L2-1, Qwen positions 0..L1-1]``: the image tokens
(masked keys in text to video: checked) are dropped, the padding positions stay as masked keys
(probability exactly 0), and the mask becomes the key mask of the video queries' rows. The Qwen
stream is labelled from the ids the encoder received (the template prefix the pipeline dropped being
the received rows' length minus ``L1``); padding is never a word column. The ByT5 keys take part in
every softmax but are not word columns (the glyph encoder receives ``Text "..."`` rather than the
prompt).

Guidance. The pipeline's guider (``ClassifierFreeGuidance``) runs the prompt, then the negative
prompt (``""`` by default), as two transformer calls per step on the very same input tensor (inside
``cache_context("pred_cond")`` / ``("pred_uncond")``); with ``guidance_scale <= 1`` or outside the
guider's ``start`` / ``stop`` fractions a step has one call. The passes are kept apart
(``halves="cond"`` never sees the negative prompt).

Video. The transformer's input is ``[latents, condition latents, mask]`` (B, 2C + 1, F, H, W),
patch 1: tokens frame-major over ``(F, H, W)``, stored stacked top to bottom; the causal VAE
(space by 16) gives ``4 (F - 1) + 1`` frames (frame 0 from latent frame 0, 4 per later one).

Not traced (clear errors): image to video (``HunyuanVideo15ImageToVideoPipeline``, any call with
non-zero ``image_embeds``) and real-video attribution.

>>> from daami2i.testing.hunyuanvideo15 import tiny_hunyuanvideo15_pipeline
>>> import daami2i
>>> pipe = tiny_hunyuanvideo15_pipeline()
>>> with daami2i.trace(pipe) as trc:
...     _ = pipe("a red fox", num_frames=5, height=32, width=48, num_inference_steps=1, output_type="np")
>>> gen = trc.last_generation
>>> sorted(trc.attention_layers)  # the refiner's attention is not among them
['transformer_blocks.0.attn', 'transformer_blocks.1.attn']
>>> gen.grid_size, gen.frames.token_frames, gen.frames.source
((4, 3), 2, (0, 1, 1, 1, 1))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ...errors import TraceError
from ...storage.recorder import AttentionCall
from .base import AttentionSite, DenoiserCall, Size, Stream, timestep_value, video_sample
from .hunyuanvideo import HunyuanVideoAdapter, _class_names, _patches

#: pipelines around a HunyuanVideo 1.5 transformer that are not traced (yet), and why
_REFUSED = {
    "HunyuanVideo15ImageToVideoPipeline": "image-to-video (the image's latents and SigLIP tokens join the sequence)",
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, i: int) -> Any:
    return kwargs[name] if name in kwargs else args[i] if len(args) > i else None


def _joint_layout(
    qwen_mask: torch.Tensor, byt5_mask: torch.Tensor, n_image: int
) -> Callable[[AttentionCall], AttentionCall]:
    """The rewrite of this denoiser call's joint attention calls, for the Qwen ``qwen_mask`` (B, L1),
    the ByT5 ``byt5_mask`` (B, L2) and ``n_image`` masked image tokens: each item's
    ``[video, text reordered by the masks]`` becomes ``[video, ByT5 L2, Qwen L1]`` (positions in the
    encoders' order), the image tokens dropped, the key mask of the video rows kept.

    >>> q = torch.arange(6.0).view(1, 1, 6, 1)  # model order [v, v, ByT5 0, Qwen 0, image, ByT5 1 (padding)]
    >>> own = torch.tensor([0, 0, 0, 0, -math.inf, -math.inf]).view(1, 1, 1, 6)
    >>> call = AttentionCall("transformer_blocks.0.attn", "joint", 1, q, q, own, 1.0)
    >>> out = _joint_layout(torch.tensor([[1]]), torch.tensor([[1, 0]]), 1)(call)
    >>> out.k.flatten().tolist(), out.bias.flatten().tolist()  # [v, v, ByT5 0, ByT5 1, Qwen 0]
    ([0.0, 1.0, 2.0, 5.0, 3.0], [0.0, 0.0, 0.0, -inf, 0.0])
    """
    m1, m2 = qwen_mask.bool(), byt5_mask.bool()
    b, l1, l2 = int(m1.shape[0]), int(m1.shape[1]), int(m2.shape[1])
    n_text = n_image + l2 + l1
    # the encoders' order [image, ByT5, Qwen] and validity; the model puts valid tokens first, each
    # group in that order: a stable sort by (padding, segment)
    segment = torch.cat([torch.zeros(n_image), torch.ones(l2), torch.full((l1,), 2.0)]).to(m1.device)
    valid = torch.cat([torch.zeros(b, n_image, dtype=torch.bool, device=m1.device), m2, m1], dim=1)  # (B, T)
    key = (~valid).float() * 3 + segment
    order = torch.sort(key, dim=1, stable=True).indices  # model position -> encoder position
    where = torch.argsort(order, dim=1)  # encoder position -> model position, (B, T)
    kept = where[:, n_image:]  # ByT5 then Qwen positions in the call's text part, (B, L2 + L1)
    expected = torch.zeros(b, l2 + l1, device=m1.device).masked_fill_(~valid[:, n_image:], -math.inf)

    def rewrite(call: AttentionCall) -> AttentionCall:
        bq, heads, s, d = call.q.shape
        n = s - n_text  # video tokens
        if bq != b or n <= 0 or call.k.shape[2] != s:
            raise TraceError(
                f"layer {call.layer} attended over {s} tokens with a batch of {bq}, but the HunyuanVideo 1.5 masks "
                f"give {b} items of {n_image} image, {l2} ByT5 and {l1} Qwen tokens: this layout is not one daami2i "
                "understands"
            )
        device = call.q.device
        video = torch.arange(n, device=device).expand(b, n)
        index = torch.cat([video, n + kept.to(device)], dim=1)  # (B, N + L2 + L1): new slot -> call position
        if call.bias is None:
            raise TraceError(f"layer {call.layer} ran without the attention mask HunyuanVideo 1.5 always passes")
        own = call.bias.expand(b, -1, -1, -1)[:, :1, :1, :].float()  # the first video query's row: the key mask
        gathered = own.gather(-1, index.view(b, 1, 1, -1))
        dropped = own[..., n:].flatten(1).gather(1, where[:, :n_image].to(device))  # the image keys
        if bool(torch.isfinite(dropped).any()) or not torch.equal(gathered[..., n:].flatten(1), expected.to(device)):
            raise TraceError(
                f"layer {call.layer}'s attention mask is not the text-to-video one (image tokens masked, the "
                "ByT5 and Qwen tokens by their masks): image-conditioned HunyuanVideo 1.5 is not traced"
            )
        take = index.view(b, 1, -1, 1).expand(b, heads, -1, d)
        q, k = call.q.gather(2, take), call.k.gather(2, take)  # (B, heads, N + L2 + L1, d)
        return AttentionCall(call.layer, call.kind, call.factor, q, k, gathered, call.scale, call.kernel)

    return rewrite


class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    name = "hunyuanvideo15"
    pipelines = (
        "HunyuanVideo 1.5 text-to-video (a HunyuanVideo15Transformer3DModel `transformer`: HunyuanVideo15Pipeline; "
        "frames stacked top to bottom)"
    )
    second_pass_hint = (
        "HunyuanVideo 1.5 runs the negative prompt as a second call when its guider's guidance_scale > 1, "
        "between the guider's start and stop fractions of the steps"
    )

    def denoiser_of(self, pipe: Any) -> Any | None:
        transformer = getattr(pipe, "transformer", None)
        if transformer is None or getattr(pipe, "unet", None) is not None:
            return None
        if "HunyuanVideo15Transformer3DModel" not in _class_names(transformer):
            return None
        for cls in type(pipe).__mro__:
            if cls.__name__ in _REFUSED:
                raise TraceError(
                    f"{type(pipe).__name__} is HunyuanVideo 1.5 {_REFUSED[cls.__name__]}: daami2i traces HunyuanVideo "
                    "1.5 text-to-video (HunyuanVideo15Pipeline) so far"
                )
        return transformer

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        """The dual-stream blocks; the token refiner (``context_embedder``) is not a site."""
        return [
            AttentionSite(name, module, "joint", "double", 1)
            for name, module in denoiser.named_modules()
            if name.startswith("transformer_blocks.")
            and name.endswith(".attn")
            and callable(getattr(module, "set_processor", None))
        ]

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states (B, 2C + 1, F, H, W), timestep, encoder_hidden_states (B, L1, D),
        encoder_attention_mask (B, L1), timestep_r, encoder_hidden_states_2 (B, L2, D2),
        encoder_attention_mask_2 (B, L2), image_embeds (B, I, D3))``. The context is the key mask of
        the rewritten text part, (B, L2 + L1)."""
        sample = _arg(args, kwargs, "hidden_states", 0)
        t = _arg(args, kwargs, "timestep", 1)
        mask, mask_2 = (
            _arg(args, kwargs, "encoder_attention_mask", 3),
            _arg(args, kwargs, "encoder_attention_mask_2", 6),
        )
        image = _arg(args, kwargs, "image_embeds", 7)
        for what, value in (("encoder_attention_mask", mask), ("encoder_attention_mask_2", mask_2)):
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise TraceError(
                    f"the HunyuanVideo 1.5 transformer was called without {what} (B, L): the layout of its text "
                    "tokens is unknown"
                )
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise TraceError("the HunyuanVideo 1.5 transformer was called without image_embeds (B, tokens, D)")
        if not bool((image == 0).all()):
            raise TraceError(
                "the HunyuanVideo 1.5 transformer was called with image embeddings (image to video): daami2i traces "
                "HunyuanVideo 1.5 text-to-video so far"
            )
        if mask.shape[0] != mask_2.shape[0] or mask.shape[0] != image.shape[0]:
            raise TraceError(
                f"the HunyuanVideo 1.5 transformer's masks {tuple(mask.shape)}, {tuple(mask_2.shape)} and image "
                f"embeddings {tuple(image.shape)} have different batch sizes"
            )
        context = torch.cat([mask_2, mask], dim=1)  # (B, L2 + L1): the rewritten text part
        return DenoiserCall(sample, context, timestep_value(t), _joint_layout(mask, mask_2, int(image.shape[1])))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        f, h, w = video_sample(call, "HunyuanVideo 1.5 transformer")
        p, pt = _patches(denoiser)
        if f % pt or h % p or w % p:
            raise TraceError(
                f"the HunyuanVideo 1.5 latent has {f} frames of {h}x{w}, not a multiple of the transformer's patches "
                f"({pt}, {p}, {p})"
            )
        latent = (f // pt * h, w)  # the token frames' latents stacked top to bottom
        return self.layer_grid(denoiser, latent, 1), latent

    def default_latent(self, denoiser: Any) -> Size:
        return 31 * 30, 53  # 121 frames of 480 x 848: 31 latent frames of 30 x 53 (space by 16), stacked

    def pixel_scale(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor_spatial", 16) or 16)

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        """The Qwen stream, after the ByT5 positions (``tokenizer_2_max_length`` of them, as the pipeline
        pads the glyph text) to the end of the text part."""
        l2 = int(getattr(pipe, "tokenizer_2_max_length", 256))
        return [Stream("qwen", "tokenizer", "prompt", l2, None, 0, encoder="text_encoder")]

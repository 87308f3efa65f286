"""HiDream-I1 (``HiDreamImageTransformer2DModel``): joint attention over ``[image, text]`` with FOUR
text sources, three of which are keys.

Where attention happens: every block's ``attn1`` (a ``HiDreamAttention``) is joint;
``HiDreamAttnProcessor`` calls ``F.scaled_dot_product_attention`` with q and k final (RMS QK-norm,
then the rotary embedding; no mask, no scale argument). Double-stream blocks
(``double_stream_blocks.{i}.block.attn1``) concatenate image and text queries and keys; single-stream
blocks (``single_stream_blocks.{i}.block.attn1``) get one sequence. Either way the sequence is

``[image (h*w), image padding, T5 (L), Llama last layer (M), Llama layer of this block (M)]``

* **image**: the latent in 2x2 patches, row-major. A non-square latent is padded to the
  transformer's ``max_seq`` tokens, and the padding's keys are multiplied by zero, not masked: they
  stay in the softmax with logit 0. They are declared as reference tokens (keys, never queried nor
  stored), so padding never becomes a pixel. Square latents are not padded.
* **T5** (``text_encoder_3``): ``L = min(max_sequence_length, tokenizer_3.model_max_length)``
  positions, padding unmasked.
* **Llama** (``text_encoder_4``, a ``LlamaForCausalLM``): the pipeline stacks every layer's hidden
  states; the transformer keys the layer ``llama_layers[-1]`` (the second segment, carried through
  the double-stream blocks) and, per block ``i``, the layer ``llama_layers[i]`` (the third segment,
  fresh in each block). Both are the same ``<|begin_of_text|>`` + prompt + padding positions; they
  are two streams, ``"llama"`` and ``"llama_block"``, with their own word maps (averaged by default,
  like SD3's CLIP and T5; ``stream=`` picks one).
* The two CLIP encoders' pooled output only feeds the timestep embedding: no keys.

Labels come from the ids each encoder received (``Stream.encoder``): the Llama tokenizer's start
token cannot shift them. Guidance runs in one batch ``[uncond; cond]`` when ``guidance_scale > 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import TraceError
from .base import (
    AttentionSite,
    DenoiserCall,
    JointLayerOrder,
    PatchedAdapter,
    RealRequest,
    RealRun,
    Size,
    Stream,
    patch_geometry,
    timestep_value,
    transformer_of,
)
from .sd3 import _encode, flow_noise


@dataclass(frozen=True)
class HiDreamCall(DenoiserCall):
    """A HiDream denoiser call; ``padding`` is filled by :meth:`HiDreamAdapter.geometry` (which sees the
    transformer) with the image padding tokens of this call, read by ``reference_tokens``."""

    padding: list[int] = field(default_factory=list)


def text_lengths(pipe: Any, n_text: int) -> tuple[int, int]:
    """(T5 positions, Llama positions per segment) of a text part of ``n_text`` keys: the pipeline pads
    both encoders to ``min(max_sequence_length, model_max_length)``, the Llama one twice.

    >>> from daami2i.testing import tiny_hidream_pipeline
    >>> text_lengths(tiny_hidream_pipeline(), 3 * 128)  # the default max_sequence_length
    (128, 128)
    """
    t5_max = int(getattr(getattr(pipe, "tokenizer_3", None), "model_max_length", n_text) or n_text)
    llama_max = int(getattr(getattr(pipe, "tokenizer_4", None), "model_max_length", n_text) or n_text)
    for m in range(1, n_text + 1):
        t5, llama = min(m, t5_max), min(m, llama_max)
        if t5 + 2 * llama == n_text:
            return t5, llama
    raise TraceError(
        f"HiDream's text part has {n_text} keys, which is no T5 length plus two Llama lengths of one "
        "max_sequence_length: were prompt_embeds_t5 / prompt_embeds_llama3 of other lengths passed? "
        "Pass the prompt instead"
    )


class HiDreamAdapter(JointLayerOrder, PatchedAdapter):
    name = "hidream"
    pipelines = "HiDream-I1 (a HiDreamImageTransformer2DModel `transformer`: HiDreamImagePipeline)"
    reads_attention_function = True
    word_heads_kept = False
    default_steps = 50

    def denoiser_of(self, pipe: Any) -> Any | None:
        return transformer_of(pipe, "HiDreamImageTransformer2DModel")

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        """Every block's ``attn1``: joint, ``"double"`` or ``"single"``, on the one token grid."""
        sites = []
        for name, module in denoiser.named_modules():
            if not (name.endswith(".attn1") and hasattr(module, "set_processor")):
                continue
            block = name.split(".", 1)[0]
            if block in ("double_stream_blocks", "single_stream_blocks"):
                sites.append(AttentionSite(name, module, "joint", block.split("_", 1)[0], 1))
        return sites

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        """``transformer(hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
        pooled_embeds, ...)``; the context is a (B, L + 2M, 0) stand-in for the text keys' count."""
        names = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3")
        got = {n: (args[i] if len(args) > i else kwargs.get(n)) for i, n in enumerate(names)}
        sample, t5, llama = got["hidden_states"], got["encoder_hidden_states_t5"], got["encoder_hidden_states_llama3"]
        if not isinstance(t5, torch.Tensor) or t5.dim() != 3:
            raise TraceError(
                f"the HiDream transformer was called without (B, L, D) T5 states (got {type(t5).__name__})"
            )
        layer = llama[0] if isinstance(llama, (list, tuple, torch.Tensor)) and len(llama) else None
        if not isinstance(layer, torch.Tensor) or layer.dim() != 3:
            raise TraceError(
                "the HiDream transformer was called without Llama states stacked per layer (layers, B, M, D) "
                f"(got {type(llama).__name__})"
            )
        n_text = int(t5.shape[1]) + 2 * int(layer.shape[1])
        context = t5.new_empty(int(t5.shape[0]), n_text, 0)  # (B, L + 2M, 0): only its length is read
        return HiDreamCall(sample, context, timestep_value(got["timesteps"]))

    def geometry(
        self, denoiser: Any, call: DenoiserCall, kwargs: dict[str, Any], grid_factor: int
    ) -> tuple[Size, Size]:
        grid, latent = patch_geometry(denoiser, call, "HiDream")
        p = int(denoiser.config.patch_size)
        if latent[0] % p or latent[1] % p:
            raise TraceError(f"a {latent[0]}x{latent[1]} HiDream latent is not a whole number of {p}x{p} patches")
        n, max_seq = grid[0] * grid[1], int(denoiser.max_seq)
        padding = 0
        if latent[0] != latent[1]:  # the transformer pads non-square latents to max_seq tokens
            if n > max_seq:
                raise TraceError(
                    f"a {latent[0]}x{latent[1]} HiDream latent has {n} tokens, more than the {max_seq} the "
                    "transformer pads non-square images to (max_resolution): use a smaller image"
                )
            padding = max_seq - n
        if isinstance(call, HiDreamCall):
            call.padding[:] = [padding]
        return grid, latent

    def reference_tokens(self, call: DenoiserCall, grid: Size) -> int:
        """The image padding of a non-square latent (zeroed keys, in the softmax): keys, not pixels."""
        if not isinstance(call, HiDreamCall) or not call.padding:
            raise TraceError("HiDream's image padding is known only after the adapter's geometry of the call")
        return call.padding[0]

    def default_latent(self, denoiser: Any) -> Size:
        """``max_resolution`` is the latent of the pipeline's default area (128 for 1024 px)."""
        h, w = (int(v) for v in denoiser.config.max_resolution)
        return h, w

    def text_streams(self, pipe: Any, n_text: int) -> list[Stream]:
        t5, llama = text_lengths(pipe, n_text)
        return [
            Stream("t5", "tokenizer_3", "prompt_3", 0, t5, 0, encoder="text_encoder_3"),
            Stream("llama", "tokenizer_4", "prompt_4", t5, llama, 0, encoder="text_encoder_4"),
            Stream("llama_block", "tokenizer_4", "prompt_4", t5 + llama, llama, 0, encoder="text_encoder_4"),
        ]

    def prepare_real(self, pipe: Any, denoiser: Any, request: RealRequest) -> RealRun:
        """The VAE's mean latent (shifted, scaled), noised ``(1 - s) x + s e`` with ``s = t / 1000``; the
        transformer is given ``t`` as the pipeline gives it the scheduler's timesteps; the caption
        is encoded here, inside the trace (its encoders' ids label the words)."""
        latents, size, device, dtype = _encode(pipe, denoiser, request.image, request.height, request.width)
        extra = {} if request.max_sequence_length is None else {"max_sequence_length": request.max_sequence_length}
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(
            prompt=request.prompt, device=device, dtype=dtype, do_classifier_free_guidance=False, **extra
        )
        b = int(latents.shape[0])
        n_train = int(pipe.scheduler.config.num_train_timesteps)

        def call(noisy: torch.Tensor, t: int) -> Any:
            return denoiser(
                hidden_states=noisy,
                timesteps=torch.full([b], float(t), device=device, dtype=dtype),
                encoder_hidden_states_t5=t5.to(dtype),
                encoder_hidden_states_llama3=llama.to(dtype),
                pooled_embeds=pooled.to(dtype),
                return_dict=False,
            )

        return RealRun(latents, size, call, lambda x, eps, t: flow_noise(x, eps, t / n_train))

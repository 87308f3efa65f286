"""MMDiT adapter (SD3, Flux): joint-attention layers, token layout and text streams.

In joint attention the image and text tokens are one sequence, so one softmax covers both: a word
map is the image-query rows restricted to the text-key columns, and the self-attention map the
same rows restricted to the image-key columns. The query and key are taken where the model's own
processor hands them to the attention function (after QK normalisation and rotary embeddings), by
wrapping that function for the duration of a traced layer call (see :mod:`.capture`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TraceError
from .unet import AttentionSite


@dataclass(frozen=True)
class Stream:
    """A text stream of a model: which tokenizer, which prompt argument, where its keys are."""

    name: str  # "clip" or "t5"
    tokenizer: str  # pipeline attribute holding the tokenizer
    prompt_arg: str  # argument of the pipeline's check_inputs holding this stream's prompt
    offset: int  # first text-key column of the stream in the joint sequence's text part
    width: int | None  # number of text-key columns (None: to the end)
    bos: int  # 1 if the tokenizer puts a start token before the prompt, else 0


@dataclass(frozen=True)
class Family:
    """What daami2i needs to know about one transformer class."""

    name: str
    text_first: bool  # joint sequence is [text, image] (Flux) rather than [image, text] (SD3)
    packed: bool  # latents are packed 2x2 into tokens by the pipeline (Flux)


FAMILIES = {
    "SD3Transformer2DModel": Family("sd3", text_first=False, packed=False),
    "FluxTransformer2DModel": Family("flux", text_first=True, packed=True),
}


def family_of(transformer: Any) -> Family | None:
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


def find_dit_sites(transformer: Any) -> list[AttentionSite]:
    """Every attention layer of an SD3 / Flux transformer.

    ``kind`` is ``"joint"`` for layers whose keys hold the text (SD3 ``attn``, Flux double- and
    single-stream blocks) and ``"self"`` for image-only ones (SD3.5's dual ``attn2``); ``block``
    is ``"double"`` or ``"single"``; every layer works on the one image-token grid (factor 1).
    """
    sites = []
    for name, module in transformer.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        single = name.startswith("single_transformer_blocks.")
        joint = single or getattr(module, "add_k_proj", None) is not None
        sites.append(
            AttentionSite(name, module, "joint" if joint else "self", "single" if single else "double", 1)  # type: ignore[arg-type]
        )
    return sites


def streams_of(pipe: Any, family: Family, n_text: int) -> list[Stream]:
    """The text streams whose tokens are keys of the joint attention, for a context of ``n_text`` tokens."""
    if family.name == "sd3":
        clip = int(getattr(pipe, "tokenizer_max_length", 77))
        out = [Stream("clip", "tokenizer", "prompt", 0, min(clip, n_text), 1)]
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            out.append(Stream("t5", "tokenizer_3", "prompt_3", clip, None, 0))
        return out
    return [Stream("t5", "tokenizer_2", "prompt_2", 0, None, 0)]


def grid_of(family: Family, transformer: Any, sample: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the image-token grid of one transformer call."""
    if family.packed:
        ids = kwargs.get("img_ids")
        if not isinstance(ids, torch.Tensor) or ids.shape[-1] < 3:
            raise TraceError("the Flux transformer was called without img_ids, so the image grid is unknown")
        ids = ids[0] if ids.dim() == 3 else ids
        return int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise TraceError(f"the SD3 transformer was called without a (B, C, H, W) latent (got {type(sample).__name__})")
    p = int(transformer.config.patch_size)
    return int(sample.shape[-2]) // p, int(sample.shape[-1]) // p

"""What SD3 and Flux (MMDiT, joint attention) share.

In joint attention the image and text tokens are one sequence, so one softmax covers both: a word
map is the image-query rows restricted to the text-key columns, and the self-attention map the same
rows restricted to the image-key columns. The query and key are taken where the model's own
processor hands them to the attention function (after QK normalisation and rotary embeddings), by
wrapping that function for the duration of a traced layer call (see :mod:`..capture`).
"""

from __future__ import annotations

from typing import Any

from .base import AttentionSite, DenoiserCall, JointLayerOrder, timestep_value, transformer_of


def find_joint_sites(transformer: Any) -> list[AttentionSite]:
    """Every attention layer of an MMDiT transformer.

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


class MMDiTAdapter(JointLayerOrder):
    """Joint-attention transformers called as ``transformer(hidden_states, encoder_hidden_states, ...)``."""

    model_class: str  # the transformer class this family handles
    reads_attention_function = True
    word_heads_kept = False
    default_steps = 28

    def denoiser_of(self, pipe: Any) -> Any | None:
        return transformer_of(pipe, self.model_class)

    def find_sites(self, denoiser: Any) -> list[AttentionSite]:
        return find_joint_sites(denoiser)

    def read_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        sample = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        return DenoiserCall(sample, context, timestep_value(t))

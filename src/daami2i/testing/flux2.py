"""A tiny offline Flux.2 Klein pipeline: the real diffusers and transformers classes, random weights.

The text encoder is a small ``Qwen3ForCausalLM`` with :func:`daami2i.testing.llm.qwen_tokenizer` (a
Qwen2-format tokenizer with Qwen's chat template, which the pipeline applies before tokenising); it
has 27 layers, so the pipeline's default ``text_encoder_out_layers=(9, 18, 27)`` (the hidden states
Klein stacks into its text features) exist. The VAE (``AutoencoderKLFlux2``) scales by 4 and the
pipeline patchifies its latents 2x2, so a 64x64 image has an 8x8 grid of image tokens.

>>> pipe = tiny_flux2_pipeline()
>>> pipe(prompt="a cat", num_inference_steps=2, height=64, width=96).images[0].size
(96, 64)
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Flux2Kind = Literal["text2img", "inpaint", "kv"]

#: Qwen3's hidden size in the tiny encoder; Klein stacks three of its layers' states (joint dim 3x)
QWEN_HIDDEN = 16


def _qwen3_encoder(tokenizer: Any, seed: int, layers: int = 27) -> Any:
    """A small random ``Qwen3ForCausalLM`` whose vocabulary is the tokenizer's."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=QWEN_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise RuntimeError("the tiny Qwen3 encoder's vocabulary does not match its tokenizer")
    return model


def _flux2_vae(seed: int) -> Any:
    """A small ``AutoencoderKLFlux2`` (4 latent channels, scale 4) with a non-trivial batch norm."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    with torch.no_grad():  # the patchified latents are normalised by these statistics (16 = 4 x 2 x 2)
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 1.5, vae.bn.num_features))
    return vae.eval()


def tiny_flux2_pipeline(
    seed: int = 0,
    kind: Flux2Kind = "text2img",
    num_layers: int = 1,
    num_single_layers: int = 2,
    distilled: bool = False,
) -> Any:
    """A random Flux.2 Klein pipeline (double- and single-stream blocks, 4-axis rotary embeddings).

    ``kind="inpaint"`` is ``Flux2KleinInpaintPipeline`` (``image=..., mask_image=...``), ``kind="kv"``
    ``Flux2KleinKVPipeline`` (reference images through a KV cache). ``distilled=True`` registers
    ``is_distilled`` (no guidance pass, whatever ``guidance_scale``). Call the pipelines with
    ``prompt=`` as a keyword: Klein's first positional argument is the reference image.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinInpaintPipeline,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from . import _kind_class
    from .llm import qwen_tokenizer

    classes: dict[str, Any] = {
        "text2img": Flux2KleinPipeline,
        "inpaint": Flux2KleinInpaintPipeline,
        "kv": Flux2KleinKVPipeline,
    }
    cls = _kind_class(classes, kind)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 3)
    transformer: Any = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * QWEN_HIDDEN,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=_flux2_vae(seed + 1),
        text_encoder=_qwen3_encoder(tokenizer, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

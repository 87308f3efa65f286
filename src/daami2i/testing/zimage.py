"""A tiny offline Z-Image pipeline (``ZImagePipeline``, ``ZImageImg2ImgPipeline``) built from configs
with the real diffusers and transformers classes: a ``ZImageTransformer2DModel`` (one image-only
noise-refiner layer, one text-only context-refiner layer, two main layers), a Qwen3 text encoder
(``Qwen3Model``) behind :func:`daami2i.testing.llm.qwen_tokenizer` (Qwen's chat template, which the
pipeline applies before tokenising), and a small VAE. Random weights, nothing downloaded.

>>> pipe = tiny_zimage_pipeline()
>>> pipe("a red cat", num_inference_steps=2, height=64, width=80).images[0].size
(80, 64)
>>> len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
True
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from . import _dit_vae, _kind_class
from .llm import qwen_tokenizer

ZImageKind = Literal["text2img", "img2img"]


def _qwen3_encoder(tokenizer: Any, hidden: int, seed: int) -> Any:
    """A two-layer random ``Qwen3Model`` whose vocabulary is the tokenizer's."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def tiny_zimage_pipeline(
    kind: ZImageKind = "text2img", seed: int = 0, num_layers: int = 2, num_refiner_layers: int = 1
) -> Any:
    """A random Z-Image pipeline (see the module docstring), offline.

    The VAE scales by 4 and the transformer patches 2x2, so a 64x80 image has an 8x10 grid of image
    tokens (80, padded by the transformer to 96, a multiple of 32). Height and width must be
    multiples of 8. ``kind="img2img"`` is ``ZImageImg2ImgPipeline`` (``image=..., strength=...``).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImageImg2ImgPipeline,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    cls = _kind_class({"text2img": ZImagePipeline, "img2img": ZImageImg2ImgPipeline}, kind)
    tokenizer = qwen_tokenizer()
    text_hidden = 32
    torch.manual_seed(seed + 3)
    transformer: Any = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=num_layers,
        n_refiner_layers=num_refiner_layers,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=text_hidden,
        axes_dims=[4, 6, 6],  # sums to the head dimension (32 / 2)
        axes_lens=[1024, 64, 64],  # caption positions reach the padded prompt length
    )
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_dit_vae(seed + 1, 4, 3),
        text_encoder=_qwen3_encoder(tokenizer, text_hidden, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

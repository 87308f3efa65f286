"""A tiny offline Lumina 2 pipeline (``Lumina2Pipeline``) built from configs with the real classes.

The text encoder is a small random ``Gemma2Model`` with the Gemma-format tokenizer of
:mod:`daami2i.testing.llm`; the pipeline puts its system prompt and ``" <Prompt Start> "`` before the
prompt, as the real one does. The transformer patches 2x2 and uses grouped-query attention (two
query heads share one key/value head); the VAE scales by 8, as the pipeline assumes, so a 128x192
image has a 16x24 latent and an 8x12 grid of image tokens.

>>> pipe = tiny_lumina2_pipeline()
>>> pipe("a red cat", num_inference_steps=2, height=64, width=96).images[0].size
(96, 64)
>>> len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
True
"""

from __future__ import annotations

from typing import Any

import torch

from . import _dit_vae
from .llm import gemma_tokenizer


def _gemma_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    """A random two-layer ``Gemma2Model`` of hidden size ``width`` for ``tokenizer``'s vocabulary."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width // 2,
        query_pre_attn_scalar=width // 2,
        max_position_embeddings=1024,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def tiny_lumina2_pipeline(seed: int = 0, num_layers: int = 2, num_refiner_layers: int = 1) -> Any:
    """A random ``Lumina2Pipeline`` (see the module docstring): ``num_layers`` joint blocks over
    [valid text, image], ``num_refiner_layers`` text-only and image-only refiner blocks each."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = gemma_tokenizer()
    text_width = 32
    torch.manual_seed(seed + 3)
    transformer: Any = Lumina2Transformer2DModel(
        sample_size=16,  # the default image: 128 px
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=num_layers,
        num_refiner_layers=num_refiner_layers,
        num_attention_heads=2,
        num_kv_heads=1,  # grouped-query attention: the key heads are repeated before SDPA
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),  # sums to the head size, 16
        axes_lens=(300, 64, 64),
        cap_feat_dim=text_width,
    ).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_dit_vae(seed + 1, 4, 4),
        text_encoder=_gemma_encoder(tokenizer, text_width, seed + 5),
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny random Sana pipeline (``SanaPipeline``, and ``SanaSprintPipeline``), built offline from
small configs with the real diffusers and transformers classes.

Like the published models: a ``SanaTransformer2DModel`` with patch 1 whose blocks have linear
self-attention (``SanaLinearAttnProcessor2_0``) and softmax cross-attention to a ``Gemma2Model``'s
last hidden states (padding masked), an ``AutoencoderDC`` that scales by 32, and the Gemma-format
tokenizer of :func:`daami2i.testing.llm.gemma_tokenizer`. So a 256x384 image has an 8x12 grid of
image tokens. The transformer's sample size is 16 (the 512 px aspect-ratio bins; Sprint's 32, its
1024 px bins): with the default ``use_resolution_binning=True`` the pipeline generates at the
nearest bin and resizes to the size asked for; ``use_resolution_binning=False`` generates at that size.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

SanaKind = Literal["text2img", "sprint"]


def _gemma_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    """A two-layer random ``Gemma2Model`` whose vocabulary is the tokenizer's."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def _dc_vae(seed: int, latent_channels: int) -> Any:
    """A tiny ``AutoencoderDC`` of six levels (residual blocks only): images scale by 32, as DC-AE's."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    vae: Any = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=4,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8,) * 6,
        decoder_block_out_channels=(8,) * 6,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6,
        decoder_qkv_multiscales=((),) * 6,
        scaling_factor=0.4,
    )
    return vae.eval()


def tiny_sana_pipeline(seed: int = 0, num_layers: int = 2, kind: SanaKind = "text2img") -> Any:
    """A random Sana pipeline (see the module docstring), offline; ``kind="sprint"`` a
    ``SanaSprintPipeline`` (embedded guidance, QK-norm across heads, the SCM scheduler, no batch
    guidance).

    >>> pipe = tiny_sana_pipeline()
    >>> kw = dict(use_resolution_binning=False, max_sequence_length=32)
    >>> pipe("a cat", num_inference_steps=2, height=64, width=96, **kw).images[0].size
    (96, 64)
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    """
    from diffusers import (
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaSprintPipeline,
        SanaTransformer2DModel,
        SCMScheduler,
    )

    from .llm import gemma_tokenizer

    if kind not in ("text2img", "sprint"):
        raise ValueError(f"kind must be 'text2img' or 'sprint', got {kind!r}")
    sprint = kind == "sprint"
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed + 3)
    transformer: Any = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=num_layers,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        mlp_ratio=2.0,
        sample_size=32 if sprint else 16,  # sizes with aspect-ratio bins (1024 / 512 px): the defaults work
        patch_size=1,
        guidance_embeds=sprint,
        qk_norm="rms_norm_across_heads" if sprint else None,
    )
    if sprint:
        cls: Any = SanaSprintPipeline
        scheduler: Any = SCMScheduler()
    else:
        cls = SanaPipeline
        scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=_gemma_encoder(tokenizer, 32, seed + 5),
        vae=_dc_vae(seed + 1, 4),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny random HunyuanVideo 1.0 text-to-video pipeline (``HunyuanVideoPipeline``), built offline
from small configs with the real diffusers and transformers classes.

Like the published model: a ``HunyuanVideoTransformer3DModel`` with patch 2 (``patch_size_t`` 1),
dual-stream blocks whose joint attention runs over ``[video, text]`` and single-stream blocks over the
same concatenation, a token refiner (text-only self-attention) in front of them, and a guidance
embedding (the model is guidance-distilled); an ``AutoencoderKLHunyuanVideo`` that compresses time
by 4 (causal: ``(num_frames - 1) / 4 + 1`` latent frames) and space by 8; a two-layer ``LlamaModel``
(the pipeline reads its third-last hidden states) with the Llama-3-format tokenizer of
:func:`daami2i.testing.hidream.llama_tokenizer` (``<|end_of_text|>`` pads); a ``CLIPTextModel``
(its pooled output feeds the timestep embedding) with :func:`daami2i.testing.clip_tokenizer`;
``FlowMatchEulerDiscreteScheduler``.

The pipeline formats the prompt into its chat template and drops the template's first
``crop_start`` positions (95: the system prefix in the real Llama 3 tokenizer). The tiny tokenizer
cuts that prefix into :data:`PREFIX_TOKENS` (168) tokens, so the default template keeps 73 of its
tokens before the prompt (a call with the defaults works, with ``max_sequence_length`` of at least
about 80); :func:`prompt_template` gives the template with the tiny tokenizer's ``crop_start``, so
the kept text starts at the prompt, as in the real model.

>>> pipe = tiny_hunyuanvideo_pipeline()
>>> kw = dict(num_frames=5, height=32, width=48, num_inference_steps=2, max_sequence_length=16)
>>> pipe("a red fox", prompt_template=prompt_template(), output_type="np", **kw).frames[0].shape
(5, 32, 48, 3)
>>> video_token_grid(pipe, num_frames=5, height=32, width=48)  # (latent frames, rows, columns)
(2, 2, 3)
"""

from __future__ import annotations

from typing import Any

import torch

from . import _text_encoder, clip_tokenizer
from .hidream import llama_tokenizer

#: tokens of the default template's system prefix (up to the user turn's "\n\n") in the tiny tokenizer
PREFIX_TOKENS = 168
#: widths of the tiny text encoders: Llama (the transformer's ``text_embed_dim``), CLIP (pooled)
LLAMA_HIDDEN, CLIP_HIDDEN = 24, 16


def video_token_grid(pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) grid of video tokens the transformer sees for this video size:
    ``(num_frames - 1) // 4 + 1`` latent frames (over ``patch_size_t``), latents by 8 over ``patch_size``."""
    config = pipe.transformer.config
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    p, spatial = int(config.patch_size), pipe.vae_scale_factor_spatial
    return latent_frames // int(config.patch_size_t), height // spatial // p, width // spatial // p


def prompt_template(crop_start: int | None = None) -> dict[str, Any]:
    """The pipeline's default chat template, with ``crop_start`` the tiny tokenizer's prefix length
    (:data:`PREFIX_TOKENS`) unless given: pass it as ``prompt_template=`` to the tiny pipeline.

    >>> tok = tiny_llama_tokenizer()
    >>> t = prompt_template()
    >>> len(tok(t["template"].split("{}")[0]).input_ids) == t["crop_start"]
    True
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return {
        "template": DEFAULT_PROMPT_TEMPLATE["template"],
        "crop_start": PREFIX_TOKENS if crop_start is None else crop_start,
    }


def tiny_llama_tokenizer() -> Any:
    """:func:`daami2i.testing.hidream.llama_tokenizer` with ``<|end_of_text|>`` as its padding token."""
    tok = llama_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def _llama_model(tokenizer: Any, seed: int) -> Any:
    """A two-layer random ``LlamaModel`` (the pipeline reads ``hidden_states[-3]``: the embeddings)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=2 * LLAMA_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaModel(config).eval()
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise RuntimeError("the tiny Llama encoder's vocabulary does not match its tokenizer")
    return model


def _hunyuan_vae(seed: int) -> Any:
    """A tiny ``AutoencoderKLHunyuanVideo``: 4 latent channels, time by 4, space by 8 (four levels)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8,) * 4,
        layers_per_block=1,
        norm_num_groups=2,
        mid_block_add_attention=False,
        temporal_compression_ratio=4,
        spatial_compression_ratio=8,
    )
    return vae.eval()


def _hunyuan_transformer(seed: int, num_layers: int, num_single_layers: int) -> Any:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer: Any = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=LLAMA_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        rope_axes_dim=(4, 6, 6),  # (frame, row, column); even, summing to the head width
    )
    return transformer.eval()


def tiny_hunyuanvideo_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1) -> Any:
    """A random HunyuanVideo pipeline (see the module docstring), offline: ``num_layers`` dual-stream
    and ``num_single_layers`` single-stream blocks, one token-refiner block.

    >>> pipe = tiny_hunyuanvideo_pipeline()
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    >>> pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    (4, 8)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    tokenizer = tiny_llama_tokenizer()
    pipe: Any = HunyuanVideoPipeline(
        text_encoder=_llama_model(tokenizer, seed + 5),
        tokenizer=tokenizer,
        transformer=_hunyuan_transformer(seed + 3, num_layers, num_single_layers),
        vae=_hunyuan_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # the published scheduler's shift
        text_encoder_2=_text_encoder(CLIP_HIDDEN, seed + 2),
        tokenizer_2=clip_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny random LTX-Video text-to-video pipeline (``LTXPipeline``), built offline from small configs
with the real diffusers and transformers classes.

Like the published LTX-Video 0.9 models: an ``LTXVideoTransformer3DModel`` with patch 1 whose
blocks have a video self-attention (``attn1``, rotary embeddings on q and k) and a cross-attention
(``attn2``) to the ``T5EncoderModel``'s last hidden states with the padding masked; an
``AutoencoderKLLTXVideo`` that compresses time by 8 (``(num_frames - 1) / 8 + 1`` latent frames) and
space by 32 (a spatial patch of 4 and three spatio-temporal stages); the flow-matching
``FlowMatchEulerDiscreteScheduler``; the T5-format tokenizer of :func:`daami2i.testing.t5_tokenizer`.
The pipeline packs the (B, C, F, H, W) latents into (B, F * H * W, C) tokens before the transformer.
So 17 frames at 64 x 96 are 3 latent frames of 2 x 3 latents and a (3, 2, 3) grid of 18 video
tokens, frame-major. Guidance is one batch ``[uncond, cond]`` (``guidance_scale > 1``).

>>> pipe = tiny_ltx_pipeline()
>>> kw = dict(num_frames=17, height=64, width=96, num_inference_steps=2, max_sequence_length=16)
>>> pipe(prompt="a red fox", output_type="np", **kw).frames[0].shape  # (frames, height, width, rgb)
(17, 64, 96, 3)
>>> video_token_grid(pipe, num_frames=17, height=64, width=96)  # (latent frames, rows, columns)
(3, 2, 3)
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from daami2i.testing import _t5_encoder, t5_tokenizer

LATENT_CHANNELS = 8
Version = Literal["0.9", "0.9.1", "0.9.5"]


def video_token_grid(pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) grid of video tokens the transformer sees for this video size:
    ``(num_frames - 1) // temporal + 1`` latent frames of ``height / spatial`` x ``width / spatial``,
    cut into the transformer's ``patch_size_t`` x ``patch_size`` x ``patch_size`` patches."""
    config = pipe.transformer.config
    p, pt = int(config.patch_size), int(config.patch_size_t)
    temporal, spatial = int(pipe.vae_temporal_compression_ratio), int(pipe.vae_spatial_compression_ratio)
    latent_frames = (num_frames - 1) // temporal + 1
    return latent_frames // pt, height // spatial // p, width // spatial // p


def _ltx_vae(seed: int, version: Version, decoder_causal: bool) -> Any:
    """A tiny ``AutoencoderKLLTXVideo``: time by 8, space by 32, as LTX-Video's (one layer per block).
    ``"0.9.1"`` conditions the decoder on a timestep; ``"0.9.5"`` is the later VAE's layout as well
    (its down blocks, three residual upsamplers that halve the channels, timestep-conditioned)."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    layout: dict[str, Any]
    if version == "0.9.5":
        layout = dict(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("LTXVideo095DownBlock3D",) * 4,
            decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, True),
            decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False,) * 4,
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True, True, True),
            upsample_factor=(2, 2, 2),
            spatial_compression_ratio=32,
            temporal_compression_ratio=8,
        )
    else:
        layout = dict(
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False,) * 5,
        )
    vae: Any = AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        patch_size=4,
        patch_size_t=1,
        decoder_causal=decoder_causal,
        timestep_conditioning=version != "0.9",
        **layout,
    )
    return vae.eval()


def tiny_ltx_pipeline(
    seed: int = 0,
    num_layers: int = 2,
    text_width: int = 32,
    version: Version = "0.9",
    decoder_causal: bool = False,
) -> Any:
    """A random LTX-Video text-to-video pipeline (see the module docstring), offline.

    ``version`` picks the VAE: ``"0.9"`` (LTX-Video 0.9), ``"0.9.1"`` (its decoder takes
    ``decode_timestep``), ``"0.9.5"`` (the later VAE's blocks, also timestep-conditioned); the
    transformer is the same class in all. ``decoder_causal=True`` builds a decoder whose convolutions
    only look back in time (the published decoders are not causal).

    >>> pipe = tiny_ltx_pipeline()
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer), pipe.vae_temporal_compression_ratio
    (True, 8)
    """
    if version not in ("0.9", "0.9.1", "0.9.5"):
        raise ValueError(f"version must be '0.9', '0.9.1' or '0.9.5', got {version!r}")
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed + 3)
    heads, head_dim = 2, 8
    transformer: Any = LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        num_layers=num_layers,
        caption_channels=text_width,
    )
    transformer.eval()
    tokenizer = t5_tokenizer()
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_ltx_vae(seed + 1, version, decoder_causal),
        text_encoder=_t5_encoder(tokenizer, text_width, seed + 5),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny random CogVideoX text-to-video pipeline (``CogVideoXPipeline``), built offline from small
configs with the real diffusers and transformers classes.

Like the published models: a ``CogVideoXTransformer3DModel`` with patch 2 whose blocks run one
joint attention over ``[T5 text, video]`` (``CogVideoXAttnProcessor2_0``, RoPE on the video part,
as CogVideoX-5b; ``rotary=False`` is 2b's sin-cos position embedding), an ``AutoencoderKLCogVideoX``
that compresses time by 4 (``(num_frames - 1) / 4 + 1`` latent frames) and space by 8, the
``CogVideoXDDIMScheduler`` and the T5-format tokenizer of :func:`daami2i.testing.t5_tokenizer`.
``patch_size_t=2`` is CogVideoX 1.5's layout: latent frames are padded at the front to a multiple of
2 and patched in pairs. The transformer's ``max_text_seq_length`` is the text length the pipeline
must be called with (``max_sequence_length``; 226 for the published models, 16 here). So 9 frames
at 32x32 are 3 latent frames of 4x4 latents and a (3, 2, 2) grid of 12 video tokens, frame-major,
after the 16 text tokens. Guidance runs as one batch ``[uncond, cond]``. The VAE decodes ``L``
latent frames to ``4 (L - 1) + 1`` frames only when ``L`` is odd (49 frames: 13), to ``4 L`` when
it is even: ask for ``num_frames = 8 k + 1``.

>>> pipe = tiny_cogvideox_pipeline()
>>> kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=16)
>>> pipe(prompt="a red fox", output_type="np", **kw).frames[0].shape  # (frames, height, width, rgb)
(9, 32, 32, 3)
>>> video_token_grid(pipe, num_frames=9, height=32, width=32)  # (latent frames, rows, columns)
(3, 2, 2)
"""

from __future__ import annotations

from typing import Any

import torch

from daami2i.testing import _t5_encoder, t5_tokenizer

TEXT_LENGTH = 16


def video_token_grid(pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) grid of video tokens the transformer sees for this video size.

    Latent frames are ``(num_frames - 1) // temporal_compression_ratio + 1``; with ``patch_size_t``
    they are padded up to a multiple of it and patched in groups of ``patch_size_t``.
    """
    config = pipe.transformer.config
    p, pt = config.patch_size, config.patch_size_t or 1
    spatial = pipe.vae_scale_factor_spatial
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    return -(-latent_frames // pt), height // spatial // p, width // spatial // p


def _cogvideox_vae(seed: int) -> Any:
    """A tiny ``AutoencoderKLCogVideoX``: time by 4, space by 8 (four levels), as the published one."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLCogVideoX(
        block_out_channels=(8,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return vae.eval()


def tiny_cogvideox_pipeline(
    seed: int = 0, num_layers: int = 2, rotary: bool = True, patch_size_t: int | None = None
) -> Any:
    """A random CogVideoX pipeline (see the module docstring), offline.

    >>> pipe = tiny_cogvideox_pipeline(patch_size_t=2)  # CogVideoX 1.5: 3 latent frames padded to 4
    >>> kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    >>> pipe(prompt="a red fox", output_type="np", **kw).frames[0].shape
    (9, 32, 32, 3)
    >>> video_token_grid(pipe, num_frames=9, height=32, width=32)
    (2, 2, 2)
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    """
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    if patch_size_t is not None and not rotary:
        raise ValueError("patch_size_t (CogVideoX 1.5) needs rotary=True")
    torch.manual_seed(seed + 3)
    transformer: Any = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE splits it 4 / 6 / 6 over (frame, row, column)
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=num_layers,
        # latent size the position embeddings are made for (pixels / 8); 1.5's RoPE grid cannot exceed it,
        # so 1.5 gets room for 128 x 128 px (the conformance suite's 64 x 96)
        sample_width=8 if patch_size_t is None else 16,
        sample_height=8 if patch_size_t is None else 16,
        sample_frames=9,
        patch_size=2,
        patch_size_t=patch_size_t,
        patch_bias=patch_size_t is None,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )
    transformer.eval()
    tokenizer = t5_tokenizer()
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, 32, seed + 5),
        vae=_cogvideox_vae(seed + 1),
        transformer=transformer,
        # the published models' scheduler config (v-prediction, zero terminal SNR, trailing steps)
        scheduler=CogVideoXDDIMScheduler(
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            snr_shift_scale=1.0,
            timestep_spacing="trailing",
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

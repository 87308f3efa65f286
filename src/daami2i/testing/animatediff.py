"""A tiny random AnimateDiff pipeline (``AnimateDiffPipeline``), built offline from small configs with
the real diffusers and transformers classes.

Like the published models: a Stable Diffusion 1.x UNet (:func:`daami2i.testing.tiny_unet`,
``"sd1"``) and a ``MotionAdapter`` with the same block widths, joined by the pipeline into a
``UNetMotionModel``; the CLIP text encoder and the real CLIP tokenizer of :mod:`daami2i.testing`; the
SD VAE (2-D, by 8) that decodes each frame alone, so video frames and latent frames are the same.
The spatial attention layers see each frame as a batch item (batch ``B * F``, the 77 CLIP tokens
repeated per frame); the motion modules' temporal self-attention sees each latent pixel as a batch
item (batch ``B * H * W``, sequence ``F``). Guidance runs as one batch ``[uncond, cond]``.

>>> pipe = tiny_animatediff_pipeline()
>>> kw = dict(num_frames=4, height=64, width=64, num_inference_steps=2)
>>> pipe(prompt="a red fox", output_type="np", **kw).frames[0].shape  # (frames, height, width, rgb)
(4, 64, 64, 3)
>>> type(pipe.unet).__name__, pipe.vae_scale_factor  # 64 px: an 8x8 latent in every frame
('UNetMotionModel', 8)
"""

from __future__ import annotations

from typing import Any

import torch

from daami2i.testing import _scheduler, _text_encoder, _vae, clip_tokenizer, tiny_unet


def _motion_adapter(seed: int) -> Any:
    """A random ``MotionAdapter`` for :func:`tiny_unet` ``("sd1")``: the same block widths, one motion
    layer per UNet layer, two heads, sequences of up to 32 frames (as the published adapters)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter: Any = MotionAdapter(
        block_out_channels=(16, 32, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
    )
    return adapter.eval()


def tiny_animatediff_pipeline(seed: int = 0) -> Any:
    """A random AnimateDiff pipeline (see the module docstring), offline.

    >>> pipe = tiny_animatediff_pipeline()
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    """
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(32, seed + 2),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet("sd1", 64, seed + 3),
        motion_adapter=_motion_adapter(seed + 4),
        scheduler=_scheduler(),
    )
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny random Wan 2.1 text-to-video pipeline (``WanPipeline``), built offline from small configs
with the real diffusers and transformers classes.

Like the published models: a ``WanTransformer3DModel`` with patch ``(1, 2, 2)`` whose blocks have
a video self-attention (``attn1``) and a cross-attention to the ``UMT5EncoderModel``'s last hidden
states (``attn2``), padded with zeros to ``max_sequence_length``; an ``AutoencoderKLWan`` that
compresses time by 4 (``(num_frames - 1) / 4 + 1`` latent frames) and space by 8; the flow-matching
``UniPCMultistepScheduler`` of the published models; the T5-format tokenizer of
:func:`daami2i.testing.t5_tokenizer`. So 5 frames at 32x32 are 2 latent frames of 4x4 latents and
a (2, 2, 2) grid of 8 video tokens, frame-major. Guidance runs as a second transformer call per
step (``guidance_scale > 1``).

>>> pipe = tiny_wan_pipeline()
>>> kw = dict(num_frames=5, height=32, width=32, num_inference_steps=2, max_sequence_length=16)
>>> pipe(prompt="a red fox", output_type="np", **kw).frames[0].shape  # (frames, height, width, rgb)
(5, 32, 32, 3)
>>> video_token_grid(pipe, num_frames=5, height=32, width=32)  # (latent frames, rows, columns)
(2, 2, 2)
"""

from __future__ import annotations

from typing import Any

import torch

from daami2i.testing import t5_tokenizer


def video_token_grid(pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) grid of video tokens the transformer sees for this video size.

    Latent frames are ``(num_frames - 1) // scale_factor_temporal + 1`` (the VAE is causal: the first
    frame is its own latent frame), then the transformer patches ``patch_size = (t, h, w)``.
    """
    pt, ph, pw = pipe.transformer.config.patch_size
    temporal = pipe.vae.config.scale_factor_temporal
    spatial = pipe.vae.config.scale_factor_spatial
    latent_frames = (num_frames - 1) // temporal + 1
    return latent_frames // pt, height // spatial // ph, width // spatial // pw


def _umt5_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    """A two-layer random ``UMT5EncoderModel`` whose vocabulary is the tokenizer's."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def _wan_vae(seed: int) -> Any:
    """A tiny ``AutoencoderKLWan``: 16 latent channels, time by 4, space by 8, as Wan 2.1's."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return vae.eval()


def _wan_transformer(seed: int, num_layers: int, text_width: int) -> Any:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    transformer: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=text_width,
        freq_dim=32,
        ffn_dim=16,
        num_layers=num_layers,
        rope_max_seq_len=32,
    )
    return transformer.eval()


def tiny_wan_pipeline(
    seed: int = 0, num_layers: int = 2, text_width: int = 16, boundary_ratio: float | None = None
) -> Any:
    """A random Wan 2.1 text-to-video pipeline (see the module docstring), offline.

    ``boundary_ratio`` makes it Wan 2.2 A14B's two-stage layout: a second transformer
    (``transformer_2``, other weights) denoises the steps whose timestep is below
    ``boundary_ratio * 1000``.

    >>> pipe = tiny_wan_pipeline()
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    >>> tiny_wan_pipeline(boundary_ratio=0.9).transformer_2 is not None
    True
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    transformer = _wan_transformer(seed + 3, num_layers, text_width)
    second = _wan_transformer(seed + 7, num_layers, text_width) if boundary_ratio is not None else None
    tokenizer = t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer, text_width, seed + 5),
        vae=_wan_vae(seed + 1),
        # Wan 2.1's scheduler: UniPC on flow matching with shift 3 (480p; 5.0 for 720p)
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer,
        transformer_2=second,
        boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v_pipeline(seed: int = 0, num_layers: int = 2, text_width: int = 16) -> Any:
    """A random Wan 2.1 image-to-video pipeline (``WanImageToVideoPipeline``), offline: the transformer
    takes the first frame's latents as 20 more input channels and, in every cross-attention, first
    attends to a tiny ``CLIPVisionModel``'s tokens of the image (``image_dim``, ``added_kv_proj_dim``),
    then to the text. The processor takes the last 512 context tokens as the text, so call it with
    ``max_sequence_length=512``.

    >>> from PIL import Image
    >>> pipe = tiny_wan_i2v_pipeline()
    >>> image = Image.new("RGB", (48, 32), (200, 80, 40))
    >>> kw = dict(num_frames=5, height=32, width=48, num_inference_steps=2, max_sequence_length=512)
    >>> pipe(image=image, prompt="a red fox", output_type="np", **kw).frames[0].shape
    (5, 32, 48, 3)
    """
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 3)
    transformer: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=36,  # 16 noise channels + 4 mask + 16 of the image's latents
        out_channels=16,
        text_dim=text_width,
        freq_dim=32,
        ffn_dim=16,
        num_layers=num_layers,
        rope_max_seq_len=32,
        image_dim=16,
        added_kv_proj_dim=16,
    ).eval()
    torch.manual_seed(seed + 9)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    tokenizer = t5_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer, text_width, seed + 5),
        vae=_wan_vae(seed + 1),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=vision,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

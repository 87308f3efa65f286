"""A tiny random HunyuanVideo 1.5 text-to-video pipeline (``HunyuanVideo15Pipeline``), built offline
from small configs with the real diffusers and transformers classes.

Like the published model: a ``HunyuanVideo15Transformer3DModel`` with patch 1 (``patch_size_t`` 1)
and dual-stream blocks only, whose joint attention runs over ``[video, text]``, the text part being
each item's valid image-embedding, ByT5 and Qwen tokens first, then their padding (the transformer
reorders them by their masks), and a token refiner in front of them; an
``AutoencoderKLHunyuanVideo15`` that compresses time by 4 (causal: ``(num_frames - 1) / 4 + 1``
latent frames) and space by 16; a two-layer ``Qwen2_5_VLTextModel`` (the pipeline reads its
third-last hidden states) with :func:`daami2i.testing.llm.qwen_tokenizer`; a two-layer
``T5EncoderModel`` with the (file-free) ``ByT5Tokenizer`` for the glyph text (the quoted parts of a
prompt); a ``ClassifierFreeGuidance`` guider (guidance scale 6) and
``FlowMatchEulerDiscreteScheduler`` (shift 5).

The pipeline formats the prompt into its chat template and drops the first
``prompt_template_encode_start_idx`` encoder positions (108: the system prefix in the real Qwen
tokenizer); the tiny pipeline sets it to the prefix's length in the tiny tokenizer
(:data:`PREFIX_TOKENS`), and shortens the padded lengths (Qwen ``tokenizer_max_length`` 1000 -> 24,
ByT5 256 -> 16, image tokens 729 -> 4) so that a call is fast.

>>> pipe = tiny_hunyuanvideo15_pipeline()
>>> kw = dict(num_frames=5, height=32, width=48, num_inference_steps=2)
>>> pipe("a red fox", output_type="np", **kw).frames[0].shape
(5, 32, 48, 3)
>>> video_token_grid(pipe, num_frames=5, height=32, width=48)  # (latent frames, rows, columns)
(2, 2, 3)
"""

from __future__ import annotations

from typing import Any

import torch

from .llm import qwen_tokenizer

#: widths of the tiny encoders: Qwen (the transformer's ``text_embed_dim``), ByT5 (``text_embed_2_dim``),
#: the image embedding (``image_embed_dim``; zeros in text to video)
QWEN_HIDDEN, BYT5_HIDDEN, IMAGE_HIDDEN = 24, 16, 8
#: padded text lengths of the tiny pipeline: Qwen (after the dropped prefix), ByT5, image tokens
QWEN_LENGTH, BYT5_LENGTH, IMAGE_TOKENS = 24, 16, 4


def video_token_grid(pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) grid of video tokens the transformer sees for this video size:
    ``(num_frames - 1) // 4 + 1`` latent frames (over ``patch_size_t``), latents by 16 over ``patch_size``."""
    config = pipe.transformer.config
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    p, spatial = int(config.patch_size), pipe.vae_scale_factor_spatial
    return latent_frames // int(config.patch_size_t), height // spatial // p, width // spatial // p


def system_prefix_tokens(pipe: Any) -> int:
    """Tokens of the chat template before the user's prompt (the system turn and ``<|im_start|>user\\n``)
    as the pipeline's tokenizer splits them: what ``prompt_template_encode_start_idx`` drops."""
    marker = "\x00"
    messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": marker}]
    text = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(pipe.tokenizer(text.split(marker)[0]).input_ids)


def _qwen_text_model(tokenizer: Any, seed: int) -> Any:
    """A two-layer random ``Qwen2_5_VLTextModel`` whose vocabulary is exactly ``tokenizer``'s."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=QWEN_HIDDEN,
        intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLTextModel(config).eval()
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise RuntimeError("the tiny Qwen encoder's vocabulary does not match its tokenizer")
    return model


def _byt5_encoder(tokenizer: Any, seed: int) -> Any:
    """A two-layer random ``T5EncoderModel`` over ByT5's byte vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=BYT5_HIDDEN,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int) -> Any:
    """A tiny ``AutoencoderKLHunyuanVideo15``: 4 latent channels, time by 4, space by 16 (five levels)."""
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8,) * 5,
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    )
    return vae.eval()


def _transformer(seed: int, num_layers: int) -> Any:
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    transformer: Any = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1,  # latents, the (zero) condition latents and their mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=QWEN_HIDDEN,
        text_embed_2_dim=BYT5_HIDDEN,
        image_embed_dim=IMAGE_HIDDEN,
        rope_axes_dim=(4, 6, 6),  # (frame, row, column); even, summing to the head width
        target_size=64,
        task_type="t2v",
    )
    return transformer.eval()


def tiny_hunyuanvideo15_pipeline(seed: int = 0, num_layers: int = 2, guidance_scale: float = 6.0) -> Any:
    """A random HunyuanVideo 1.5 pipeline (see the module docstring), offline: ``num_layers``
    dual-stream blocks, one token-refiner block, a guider with ``guidance_scale``.

    >>> pipe = tiny_hunyuanvideo15_pipeline()
    >>> pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    True
    >>> pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    (4, 16)
    >>> pipe.prompt_template_encode_start_idx == system_prefix_tokens(pipe)
    True
    """
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from transformers import ByT5Tokenizer

    tokenizer = qwen_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    pipe: Any = HunyuanVideo15Pipeline(
        text_encoder=_qwen_text_model(tokenizer, seed + 5),
        tokenizer=tokenizer,
        transformer=_transformer(seed + 3, num_layers),
        vae=_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=_byt5_encoder(tokenizer_2, seed + 2),
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    pipe.prompt_template_encode_start_idx = system_prefix_tokens(pipe)
    pipe.tokenizer_max_length = QWEN_LENGTH
    pipe.tokenizer_2_max_length = BYT5_LENGTH
    pipe.vision_num_semantic_tokens = IMAGE_TOKENS
    pipe.set_progress_bar_config(disable=True)
    return pipe

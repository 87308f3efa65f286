"""A tiny offline Qwen-Image pipeline: the real diffusers and transformers classes, random weights.

The text encoder is a two-layer ``Qwen2_5_VLForConditionalGeneration`` (a small vision tower too,
unused by text-to-image) with :func:`daami2i.testing.llm.qwen_tokenizer`; the VAE is a small
``AutoencoderKLQwenImage`` scaling by 4 and the transformer packs 2x2 latent patches, so a 64x96
image has an 8x12 grid of image tokens. ``kind="edit"`` / ``"edit_plus"`` build the Edit pipelines
(a VAE scaling by 16 and an image-only Qwen2-VL processor, :func:`qwen_vl_processor`).

>>> pipe = tiny_qwenimage_pipeline()
>>> pipe("a cat", num_inference_steps=2, height=64, width=96).images[0].size
(96, 64)
>>> pipe.prompt_template_encode_start_idx  # the system prefix, as this tokenizer splits it
60
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import Qwen2VLProcessor as _Qwen2VLProcessor

from .llm import qwen_tokenizer

#: channels of the tiny VAE's latent (the real one has 16); the transformer sees 4 x 4 packed
Z_DIM = 4


#: Qwen2.5-VL's vision markers, special tokens of its tokenizer (the Edit pipeline's template uses them)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_vl_tokenizer() -> Any:
    """:func:`~daami2i.testing.llm.qwen_tokenizer` with Qwen2.5-VL's vision markers added.

    >>> tok = qwen_vl_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("<|vision_start|><|image_pad|>").input_ids)
    ['<|vision_start|>', '<|image_pad|>']
    """
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    return tokenizer


def _qwen25_vl_encoder(tokenizer: Any, hidden: int, seed: int) -> Any:
    """A two-layer Qwen2.5-VL (text decoder and a one-block vision tower) whose vocabulary is exactly
    ``tokenizer``'s (:func:`qwen_vl_tokenizer`: its vision markers included)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS), strict=True))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # multimodal rotary sections (t, h, w) of the head's 16 / 2 frequencies, as Qwen2.5-VL has
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            fullatt_block_indexes=[0],
            window_size=28,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_vae(seed: int, levels: int = 2) -> Any:
    """A small ``AutoencoderKLQwenImage`` (video VAE, one frame here) scaling each side by ``2 ** levels``.

    Edit always encodes its reference image at about 1024 x 1024 pixels, so its VAE has four levels
    (scaling by 16: about 1000 reference tokens) and no residual blocks in its encoder's levels, which
    keeps that encoding well under a second on a CPU.
    """
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLQwenImage(
        base_dim=8 if levels == 2 else 4,
        z_dim=Z_DIM,
        dim_mult=[1] * (levels + 1),
        num_res_blocks=1 if levels == 2 else 0,
        temperal_downsample=[False] + [True] * (levels - 1),
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    return vae.eval()


class ImageQwen2VLProcessor(_Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only: its video processor needs torchvision, which the tiny
    pipelines do without. Text and images go through Qwen2VLProcessor's own code (the image
    placeholder expanded to one ``<|image_pad|>`` per merged patch), with the PIL image processor."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def qwen_vl_processor(tokenizer: Any, max_pixels: int = 56 * 56) -> ImageQwen2VLProcessor:
    """An image-and-text Qwen2-VL processor around ``tokenizer`` (:func:`qwen_vl_tokenizer`) whose
    images are resized to at most ``max_pixels`` (patches of 14, merged 2x2: a few vision tokens).

    >>> proc = qwen_vl_processor(qwen_vl_tokenizer())
    >>> from PIL import Image
    >>> ids = proc(text=["<|vision_start|><|image_pad|><|vision_end|>a cat"], images=Image.new("RGB", (64, 48)))
    >>> ids["image_grid_thw"].tolist()  # resized to 56 x 56: 4 x 4 patches, merged 2x2 into 4 tokens
    [[1, 4, 4]]
    >>> proc.tokenizer.convert_ids_to_tokens(ids["input_ids"][0])[:6]
    ['<|vision_start|>', '<|image_pad|>', '<|image_pad|>', '<|image_pad|>', '<|image_pad|>', '<|vision_end|>']
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels)
    return ImageQwen2VLProcessor(image_processor=images, tokenizer=tokenizer)


#: the tiny Qwen-Image pipelines: text to image, Edit (one reference image) and Edit Plus (one or more)
QwenKind = Literal["text2img", "edit", "edit_plus"]


def tiny_qwenimage_pipeline(seed: int = 0, num_layers: int = 2, kind: QwenKind = "text2img") -> Any:
    """A random ``QwenImagePipeline`` (see the module docstring), built offline in well under a second;
    ``kind="edit"`` a ``QwenImageEditPipeline`` and ``kind="edit_plus"`` a ``QwenImageEditPlusPipeline``.

    The pipeline drops the template's system prefix from the encoder's states; its
    ``prompt_template_encode_start_idx`` (34 for the real tokenizer, 64 for Edit's) is set to that
    prefix's length in the tiny tokenizer, so the text keys are, as in the real model, the prompt and
    the template's end (Edit: the vision tokens of the reference image, then the prompt and the end).

    Edit resizes its reference image to about 1024 x 1024 pixels whatever the output size: its VAE
    scales by 16 (:func:`_qwen_vae`), so the transformer sees about 1000 reference tokens after the
    output's; the Qwen2.5-VL encoder sees the image as a few vision tokens (:func:`qwen_vl_processor`).

    >>> from PIL import Image
    >>> edit = tiny_qwenimage_pipeline(kind="edit")
    >>> type(edit).__name__, edit.vae_scale_factor
    ('QwenImageEditPipeline', 16)
    >>> out = edit(image=Image.new("RGB", (96, 64)), prompt="a cat", num_inference_steps=2, height=64, width=96)
    >>> out.images[0].size
    (96, 64)
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    classes: dict[str, Any] = {
        "text2img": QwenImagePipeline,
        "edit": QwenImageEditPipeline,
        "edit_plus": QwenImageEditPlusPipeline,
    }
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    tokenizer = qwen_vl_tokenizer()
    torch.manual_seed(seed + 3)
    transformer: Any = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=Z_DIM * 4,
        out_channels=Z_DIM,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    # Qwen-Image's scheduler without its shift_terminal (which turns a one-step schedule into NaN)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        time_shift_type="exponential",
    )
    parts: dict[str, Any] = dict(
        scheduler=scheduler,
        vae=_qwen_vae(seed + 1, 2 if kind == "text2img" else 4),
        text_encoder=_qwen25_vl_encoder(tokenizer, 32, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )
    if kind != "text2img":
        parts["processor"] = qwen_vl_processor(tokenizer)
    pipe = classes[kind](**parts)
    # the system prefix: the template up to the prompt (Edit: up to the reference image's vision tokens)
    prefix = pipe.prompt_template_encode.split("{}")[0].split("<|vision_start|>")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe.text_encoder.config.text_config.vocab_size
    if len(tokenizer) != embeds:  # a token the encoder could not embed
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} tokens, the text encoder embeds {embeds}")
    return pipe

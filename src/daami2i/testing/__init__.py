"""Tiny offline Stable Diffusion pipelines built from configs with the real diffusers classes.

Nothing is downloaded: the CLIP BPE tokenizer is the real one (vocabulary shipped with daami2i) and
every weight is random. Use these for tests, examples and benchmarks::

    >>> from daami2i.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline("sd2")
    >>> image = pipe("a cat", num_inference_steps=2, height=128, width=96).images[0]
    >>> image.size  # PIL gives (width, height)
    (96, 128)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

Style = Literal["sd1", "sd2", "sd2-v"]
Kind = Literal["text2img", "img2img", "inpaint"]

CLIP_VOCAB_SIZE = 49408


def clip_tokenizer_path() -> Path:
    """Folder holding the real CLIP BPE tokenizer (``vocab.json``, ``merges.txt``)."""
    return Path(str(resources.files("daami2i") / "assets" / "clip-tokenizer"))


def clip_tokenizer() -> Any:
    """The real CLIP BPE tokenizer, built offline.

    >>> clip_tokenizer()("a photo of a cat").input_ids
    [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_path()), local_files_only=True)
    if len(tok) != CLIP_VOCAB_SIZE:  # an incomplete load silently gives a 2-token vocabulary
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}: assets are damaged")
    return tok


def _text_encoder(hidden: int, seed: int, with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, scale_factor: int = 8) -> Any:
    from diffusers import AutoencoderKL

    levels = {2: 2, 4: 3, 8: 4}[scale_factor]
    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    return vae.eval()


def _scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_unet(style: Style | Literal["sdxl"] = "sd2", sample_size: int = 64, seed: int = 0) -> Any:
    """A small ``UNet2DConditionModel`` with the layout of the named family.

    ``sd1``/``sd2``: cross-attention down/up blocks at latent factors 1 and 2, mid block at 4
    (SD-2 style uses linear projections and per-level head counts). ``sdxl``: attention at factors
    2 and 4 only, two transformer layers at the deepest level, text-time conditioning.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet: Any
    if style == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            norm_num_groups=8,
        )
        return unet.eval()
    if style not in ("sd1", "sd2", "sd2-v"):
        raise ValueError(f"style must be 'sd1', 'sd2', 'sd2-v' or 'sdxl', got {style!r}")
    sd2 = style != "sd1"
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    return unet.eval()


def tiny_sd_pipeline(
    style: Style = "sd2",
    kind: Kind = "text2img",
    sample_size: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    unet: Any = None,
    text_width: int = 32,
) -> Any:
    """A random Stable Diffusion 1.x / 2.x style pipeline (text2img, img2img or inpaint).

    The VAE scales by 8 like the real one, so ``sample_size=64`` gives 512x512 images with a
    64x64 latent, as ``stabilityai/stable-diffusion-2-base`` does. ``sd2-v`` is the v-prediction
    (768) layout; use ``sample_size=96`` for its 96x96 latent. ``unet`` replaces the tiny
    denoiser (e.g. one with real SD sizes, for benchmarks); its ``cross_attention_dim`` must equal
    ``text_width``, the width of the text encoder.
    """
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    classes: dict[str, Any] = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    pipe = classes[kind](
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(text_width, seed + 2),
        tokenizer=clip_tokenizer(),
        unet=unet if unet is not None else tiny_unet(style, sample_size, seed + 3),
        scheduler=_scheduler("v_prediction" if style == "sd2-v" else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_sdxl_pipeline(kind: Kind = "text2img", sample_size: int = 128, seed: int = 0) -> Any:
    """A random SDXL-style pipeline: two text encoders, attention at latent factors 2 and 4."""
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    classes: dict[str, Any] = {
        "text2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    }
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    kwargs: dict[str, Any] = {}
    if kind != "text2img":
        kwargs["requires_aesthetics_score"] = False
    pipe = classes[kind](
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(32, seed + 2),
        text_encoder_2=_text_encoder(32, seed + 4, with_projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=tiny_unet("sdxl", sample_size, seed + 3),
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer(vocab_size: int = 2000) -> Any:
    """A SentencePiece-style (Unigram, metaspace) T5 tokenizer trained offline in about 0.1 s.

    The corpus is sentences of the whole-word entries of the shipped CLIP vocabulary, so common
    English words are one or a few pieces, as with the real T5 tokenizer; ``<pad>`` = 0, ``</s>`` = 1
    (appended to every sequence), ``<unk>`` = 2. Deterministic.

    >>> tok = t5_tokenizer()
    >>> tok.tokenize("a blue square")
    ['▁a', '▁blue', '▁squa', 're']
    """
    import json
    import random

    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Tokenizer

    vocab = json.loads((clip_tokenizer_path() / "vocab.json").read_text())
    words = [w[:-4] for w, i in sorted(vocab.items(), key=lambda x: x[1]) if w.endswith("</w>") and 256 <= i < 6000]
    words = [w for w in words if w.isalpha()]
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        corpus, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend = sp._tokenizer
    backend.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def _t5_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _dit_vae(seed: int, latent_channels: int, levels: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        shift_factor=0.1,
        scaling_factor=1.5,
    )
    return vae.eval()


DitKind = Literal["text2img", "img2img"]


def tiny_sd3_pipeline(
    kind: DitKind = "text2img",
    seed: int = 0,
    num_layers: int = 2,
    qk_norm: str | None = "rms_norm",
    dual_attention_layers: tuple[int, ...] = (0,),
    with_t5: bool = True,
) -> Any:
    """A random Stable Diffusion 3 style pipeline (MMDiT, joint attention), built offline.

    Two CLIP text encoders with the real CLIP tokenizer and a small T5 encoder with
    :func:`t5_tokenizer`; patch size 2 and a VAE scaling by 4, so a 64x64 image has a 16x16
    latent and an 8x8 grid of image tokens. The defaults have SD-3.5's QK RMS-normalisation and one
    dual-attention block (an extra image-only self-attention).

    >>> pipe = tiny_sd3_pipeline()
    >>> pipe("a cat", num_inference_steps=2, height=64, width=96).images[0].size
    (96, 64)
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3Pipeline,
    )

    classes: dict[str, Any] = {"text2img": StableDiffusion3Pipeline, "img2img": StableDiffusion3Img2ImgPipeline}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    torch.manual_seed(seed + 3)
    transformer: Any = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    transformer.eval()
    t5 = t5_tokenizer()
    pipe = classes[kind](
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_dit_vae(seed + 1, 4, 3),
        text_encoder=_text_encoder(16, seed + 2, with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(16, seed + 4, with_projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5, 32, seed + 5) if with_t5 else None,
        tokenizer_3=t5 if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# the tiny Flux-style blocks shared by the Flux and Chroma pipelines
_FLUX_BLOCKS: dict[str, Any] = dict(
    patch_size=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)
)


def _kind_class(classes: dict[str, Any], kind: str) -> Any:
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind]


def tiny_flux_pipeline(
    kind: DitKind | Literal["kontext", "fill"] = "text2img",
    seed: int = 0,
    num_layers: int = 1,
    num_single_layers: int = 2,
) -> Any:
    """A random Flux style pipeline (double- and single-stream blocks, rotary embeddings), offline.

    A CLIP text encoder (pooled) with the real CLIP tokenizer and a small T5 encoder with
    :func:`t5_tokenizer`; the VAE scales by 4 and latents are packed 2x2, so a 64x64 image has an
    8x8 grid of image tokens. ``kind="kontext"`` is FluxKontextPipeline (call it with
    ``image=..., _auto_resize=False, max_area=height * width`` at tiny sizes: it scales to 1024 px),
    ``kind="fill"`` FluxFillPipeline (``image=..., mask_image=...``).

    >>> pipe = tiny_flux_pipeline()
    >>> pipe("a cat", num_inference_steps=2, height=64, width=96, max_sequence_length=32).images[0].size
    (96, 64)
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxImg2ImgPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    classes: dict[str, Any] = {
        "text2img": FluxPipeline,
        "img2img": FluxImg2ImgPipeline,
        "kontext": FluxKontextPipeline,
        "fill": FluxFillPipeline,
    }
    cls = _kind_class(classes, kind)
    torch.manual_seed(seed + 3)
    # Fill's transformer also takes the masked image's packed latents (16) and the packed mask (4 x 4 x 4)
    transformer: Any = FluxTransformer2DModel(
        in_channels=16 + 16 + 64 if kind == "fill" else 16,
        out_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        pooled_projection_dim=16,
        **_FLUX_BLOCKS,
    )
    transformer.eval()
    t5 = t5_tokenizer()
    pipe = cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_dit_vae(seed + 1, 4, 3),
        text_encoder=_text_encoder(16, seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(t5, 32, seed + 5),
        tokenizer_2=t5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_pipeline(cls: Any, transformer: Any, scheduler: Any, seed: int) -> Any:
    """A pipeline whose one text encoder is the small T5 (Chroma, PixArt): VAE by 4, no progress bars."""
    transformer.eval()
    t5 = t5_tokenizer()
    pipe = cls(
        transformer=transformer,
        scheduler=scheduler,
        vae=_dit_vae(seed + 1, 4, 3),
        text_encoder=_t5_encoder(t5, 32, seed + 5),
        tokenizer=t5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chroma_pipeline(
    kind: DitKind = "text2img", seed: int = 0, num_layers: int = 1, num_single_layers: int = 2
) -> Any:
    """A random Chroma pipeline (Flux's blocks, T5 alone with its padding masked), offline.

    A small T5 encoder with :func:`t5_tokenizer`; the VAE scales by 4 and latents are packed 2x2,
    so a 64x64 image has an 8x8 grid of image tokens.

    >>> pipe = tiny_chroma_pipeline()
    >>> pipe("a cat", num_inference_steps=2, height=64, width=96, max_sequence_length=32).images[0].size
    (96, 64)
    """
    import warnings

    from diffusers import (
        ChromaImg2ImgPipeline,
        ChromaPipeline,
        ChromaTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    cls = _kind_class({"text2img": ChromaPipeline, "img2img": ChromaImg2ImgPipeline}, kind)
    torch.manual_seed(seed + 3)
    with warnings.catch_warnings():  # diffusers' own Chroma module imports a name it deprecated
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        transformer: Any = ChromaTransformer2DModel(
            in_channels=16,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            **_FLUX_BLOCKS,
            approximator_num_channels=8,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
    return _t5_pipeline(cls, transformer, FlowMatchEulerDiscreteScheduler(), seed)


def tiny_pixart_pipeline(seed: int = 0, num_layers: int = 2) -> Any:
    """A random PixArt-Σ pipeline (self- and cross-attention per block, T5 with a padding mask), offline.

    A small T5 encoder with :func:`t5_tokenizer`; the VAE scales by 4 and the transformer patches
    2x2, so a 64x64 image has an 8x8 grid of image tokens. Its sample size is 256 px: with the
    pipeline's default ``use_resolution_binning=True`` it generates at the nearest 256 px bin and
    resizes the image to the size asked for; ``use_resolution_binning=False`` generates at that size.
    ``clean_caption=False`` avoids a warning (bs4 / ftfy are not installed here).

    >>> pipe = tiny_pixart_pipeline()
    >>> kw = dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False)
    >>> pipe("a cat", num_inference_steps=2, height=64, width=96, **kw).images[0].size
    (96, 64)
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed + 3)
    transformer: Any = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        sample_size=32,  # a size with aspect-ratio bins (256 px), so the pipeline's defaults work
        patch_size=2,
        caption_channels=32,
    )
    return _t5_pipeline(PixArtSigmaPipeline, transformer, DPMSolverMultistepScheduler(), seed)


def __getattr__(name: str) -> Any:
    """``tiny_<family>_pipeline`` of a family with its own module (``daami2i.testing.<family>``) and
    the tokenizers of :mod:`daami2i.testing.llm`, imported on first use."""
    import importlib

    if name.startswith("tiny_") and name.endswith("_pipeline"):
        module = name[len("tiny_") : -len("_pipeline")]
        try:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise
    if name in ("qwen_tokenizer", "gemma_tokenizer"):
        return getattr(importlib.import_module(f"{__name__}.llm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

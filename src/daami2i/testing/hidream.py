"""A tiny offline HiDream-I1 pipeline (``HiDreamImagePipeline``) built from configs with the real
diffusers and transformers classes, random weights, nothing downloaded.

Its parts, as the real pipeline's: two ``CLIPTextModelWithProjection`` encoders (their pooled output
only feeds the timestep embedding) with :func:`daami2i.testing.clip_tokenizer`; a ``T5EncoderModel``
with :func:`daami2i.testing.t5_tokenizer`; a two-layer ``LlamaForCausalLM`` with :func:`llama_tokenizer`
(a Llama-3-format ``PreTrainedTokenizerFast``: byte-level BPE, ``<|begin_of_text|>`` put first,
``<|end_of_text|>`` as end and, as the pipeline sets it, padding token); a
``HiDreamImageTransformer2DModel`` with one double-stream and one single-stream block (each block
reads its own Llama layer, ``llama_layers``); a small VAE scaling by 8.

The pipeline rescales every requested size to the area of ``(default_sample_size * 8)^2`` pixels in
multiples of 16; the tiny pipeline sets ``default_sample_size = 10`` (80 px): 64x96 stays 64x96 (a
4x6 grid of 2x2 patches, padded by the transformer to its ``max_seq`` of 25 tokens), 64x64 becomes
80x80 (5x5). A pipeline reloaded from disk has the class default of 128 again (1024 px).

>>> pipe = tiny_hidream_pipeline()
>>> pipe("a red cat", num_inference_steps=2, height=64, width=96, max_sequence_length=16).images[0].size
(96, 64)
>>> len(pipe.tokenizer_4) == pipe.text_encoder_4.config.vocab_size
True
>>> pipe.tokenizer_4("a cat").input_ids[0] == pipe.tokenizer_4.bos_token_id
True
"""

from __future__ import annotations

from typing import Any

import torch

from . import _dit_vae, _t5_encoder, _text_encoder, clip_tokenizer, t5_tokenizer

#: Llama 3's special tokens (the start and end of text, and the chat markers of its instruct models)
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
#: hidden sizes of the tiny text encoders: CLIP (pooled, each), T5, Llama
CLIP_HIDDEN, T5_HIDDEN, LLAMA_HIDDEN = 16, 16, 24


def llama_tokenizer(vocab_size: int = 4000) -> Any:
    """A Llama-3-format tokenizer: the byte-level BPE of :func:`daami2i.testing.qwen_tokenizer`'s
    training with Llama 3's special tokens, ``<|begin_of_text|>`` prepended to every sequence.

    >>> tok = llama_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("a blue square").input_ids)
    ['<|begin_of_text|>', 'a', 'Ġblue', 'Ġsqu', 'are']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .llm import _qwen_parts

    vocab, merges = _qwen_parts(vocab_size)
    backend = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(LLAMA_SPECIAL)
    bos = backend.token_to_id(LLAMA_SPECIAL[0])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_SPECIAL[0]} $A",
        pair=f"{LLAMA_SPECIAL[0]} $A {LLAMA_SPECIAL[0]} $B",
        special_tokens=[(LLAMA_SPECIAL[0], bos)],
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA_SPECIAL[0], eos_token=LLAMA_SPECIAL[1])
    tok.model_max_length = 131072
    return tok


def _llama_encoder(tokenizer: Any, seed: int) -> Any:
    """A two-layer random ``LlamaForCausalLM`` whose vocabulary is the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=2 * LLAMA_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",  # the pipeline asks for output_attentions
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        raise RuntimeError("the tiny Llama encoder's vocabulary does not match its tokenizer")
    return model


def _clip_encoder(seed: int) -> Any:
    """A CLIP text encoder with a projection whose positions reach the pipeline's 128 (it pads to
    ``min(max_sequence_length, 218)``; the real HiDream encoders have 248 positions)."""
    encoder = _text_encoder(CLIP_HIDDEN, seed, with_projection=True)
    config = encoder.config
    config.max_position_embeddings = 248
    torch.manual_seed(seed)
    return type(encoder)(config).eval()


def tiny_hidream_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1) -> Any:
    """A random ``HiDreamImagePipeline`` (see the module docstring), offline.

    Block ``i`` (double-stream blocks first, then single-stream ones) reads Llama layer
    ``i % 2``: ``llama_layers`` has one entry per block, as the real model's.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    t5_tok = t5_tokenizer()
    llama_tok = llama_tokenizer()
    n_blocks = num_layers + num_single_layers
    torch.manual_seed(seed + 5)
    transformer: Any = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[T5_HIDDEN, LLAMA_HIDDEN],
        text_emb_dim=2 * CLIP_HIDDEN,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(8, 4, 4),  # sums to the head dimension
        max_resolution=(10, 10),  # max_seq = 25 tokens: the 80 px area's grid, as 128x128 is 1024 px's
        llama_layers=[i % 2 for i in range(n_blocks)],
    )
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_dit_vae(seed + 1, 4, 4),
        text_encoder=_clip_encoder(seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_encoder(seed + 3),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5_tok, T5_HIDDEN, seed + 4),
        tokenizer_3=t5_tok,
        text_encoder_4=_llama_encoder(llama_tok, seed + 6),
        tokenizer_4=llama_tok,
        transformer=transformer.eval(),
    )
    pipe.default_sample_size = 10
    pipe.set_progress_bar_config(disable=True)
    return pipe

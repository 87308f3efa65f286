"""Real-format tokenizers of the language models that newer pipelines use as text encoders, trained
offline in a fraction of a second (their real vocabularies are not on the package index).

:func:`qwen_tokenizer` is a :class:`transformers.Qwen2Tokenizer` (byte-level BPE with Qwen's
pre-tokenizer, ``<|im_start|>`` / ``<|im_end|>`` and a Qwen chat template), as Qwen-Image, Z-Image
and Flux.2 Klein load; :func:`gemma_tokenizer` is a :class:`transformers.GemmaTokenizer` (BPE with
byte fallback, ``▁`` for spaces, ``<bos>`` first), as Lumina 2 and Sana load. Both learn their merges
from sentences of the shipped CLIP vocabulary's whole words, so common English words are one or a
few pieces. Deterministic.

>>> tok = qwen_tokenizer()
>>> tok.tokenize("a blue square")
['a', 'Ġblue', 'Ġsqu', 'are']
>>> len(gemma_tokenizer()("a blue square").input_ids)  # <bos> first
5
"""

from __future__ import annotations

import functools
import json
import random
from typing import Any

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

#: Qwen's chat format: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, then the assistant's
#: turn; ``enable_thinking=False`` adds the empty thinking block (as Qwen3's template does)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
#: Gemma's chat format: ``<start_of_turn>role\ncontent<end_of_turn>\n`` after ``<bos>``
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _corpus() -> list[str]:
    from . import clip_tokenizer_path

    vocab = json.loads((clip_tokenizer_path() / "vocab.json").read_text())
    words = [w[:-4] for w, i in sorted(vocab.items(), key=lambda x: x[1]) if w.endswith("</w>") and 256 <= i < 6000]
    words = [w for w in words if w.isalpha()]
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)]
    return sentences + [s.capitalize() + "." for s in sentences[:500]]


def _vocab_merges(backend: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _qwen_parts(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=QWEN_SPECIAL,
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    return _vocab_merges(backend)


def qwen_tokenizer(vocab_size: int = 4000) -> Any:
    """A Qwen2-format tokenizer (see the module docstring); ``<|endoftext|>`` pads, as in Qwen."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_parts(vocab_size)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


@functools.lru_cache(maxsize=4)
def _gemma_parts(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL + bytes_, show_progress=False, initial_alphabet=["▁"]
    )
    backend.train_from_iterator(_corpus(), trainer)
    return _vocab_merges(backend)


def gemma_tokenizer(vocab_size: int = 4000) -> Any:
    """A Gemma-format tokenizer (see the module docstring); pads on the right with ``<pad>``."""
    from transformers import GemmaTokenizer

    vocab, merges = _gemma_parts(vocab_size)
    tok = GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": GEMMA_SPECIAL[5:]})
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.model_max_length = 8192
    tok.padding_side = "right"
    return tok

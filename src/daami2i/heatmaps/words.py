"""Word maps (DAAM): token lookup and per-(layer, head) aggregation of cross-attention."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import QueryError

Size = tuple[int, int]


@dataclass(frozen=True)
class CrossAttentionLayer:
    """Cross-attention of one layer for one image, summed over steps, kept per head."""

    name: str
    size: Size  # (h, w) of this layer's resolution
    sums: torch.Tensor  # shape: (heads, h*w, tokens) float32


@dataclass(frozen=True)
class TokenStream:
    """One text stream whose tokens are keys of the captured attention (SD3 has CLIP and T5 streams).

    ``first_row`` is the row (last axis of the stored cross-attention) of the prompt's first token:
    1 for CLIP (after its start token), the stream's offset for T5 (no start token).
    """

    name: str  # "clip" or "t5"
    tokenizer: Any
    tokens: list[str] | None  # the prompt's tokens as the tokenizer writes them, without special tokens
    first_row: int
    stop_row: int | None = None  # rows of this stream end before this one (None: at the end of the map)
    # the prompt as this stream's tokenizer saw it: when set (case-sensitive SentencePiece streams such
    # as T5), words are found in the text, ignoring case, and mapped to tokens by character offsets
    text: str | None = None


def clean_token(token: str) -> str:
    """A token without its word-boundary marker (CLIP's ``</w>`` suffix, SentencePiece's ``▁`` prefix)."""
    return token.replace("</w>", "").lstrip("\u2581")


def split_words(tokens: Sequence[str]) -> list[str]:
    """The distinct words of a token sequence (sub-word tokens joined, punctuation dropped), in order.

    Works for CLIP BPE (``</w>`` ends a word) and SentencePiece (``▁`` starts one).

    >>> split_words(["a</w>", "zeb", "ra</w>", ",</w>", "a</w>"])
    ['a', 'zebra']
    >>> split_words(["\u2581a", "\u2581re", "d", "\u2581cat"])
    ['a', 'red', 'cat']
    """
    out: list[str] = []
    part = ""

    def flush() -> None:
        if part and any(ch.isalnum() for ch in part) and part not in out:
            out.append(part)

    for tok in tokens:
        if tok.startswith("\u2581"):
            flush()
            part = ""
        part += clean_token(tok)
        if tok.endswith("</w>"):
            flush()
            part = ""
    flush()
    return out


def token_rows(
    tokenizer: Any,
    prompt_tokens: Sequence[str],
    word: str,
    word_idx: int | None = None,
    offset_idx: int = 0,
    n_rows: int | None = None,
    first_row: int = 1,
) -> list[int]:
    """Rows of the cross-attention map that belong to ``word``; the prompt's first token is at
    ``first_row`` (1 for CLIP, whose start token is row 0).

    With ``word_idx=None`` every occurrence of the word's token sequence in the prompt is merged
    (DAAM's behaviour), shifted by ``offset_idx``; otherwise the token at position ``word_idx`` of
    the tokenized prompt (0 = first token after the start token) is used.
    """
    # CLIP's end-of-word marker is dropped (DAAM's matching); SentencePiece's start-of-word marker is
    # kept, so "red" (``▁re d``) does not match inside "bored" (``▁bo re d``)
    tokens = [t.replace("</w>", "") for t in prompt_tokens]
    if word_idx is not None:
        if not isinstance(word_idx, int) or not 0 <= word_idx < len(tokens):
            raise QueryError(
                f"word_idx must be a token position in [0, {len(tokens) - 1}] of the prompt tokens {tokens}, "
                f"got {word_idx!r}"
            )
        rows = [word_idx + first_row]
    else:
        if not isinstance(word, str) or not word.strip():
            raise QueryError(f"word must be a non-empty string, got {word!r}")
        search = [t.replace("</w>", "") for t in tokenizer.tokenize(word.lower())]
        n = len(search)
        starts = [i + offset_idx for i in range(len(tokens) - n + 1) if tokens[i : i + n] == search]
        rows = [s + j + first_row for s in starts for j in range(n)]
        if not rows:
            raise QueryError(
                f"word {word!r} (tokens {search}) is not in the prompt; its tokens are {tokens}. "
                "Pass one of these words, or word_idx=<position> for a single token."
            )
    return _within(rows, word, n_rows, "(the prompt was truncated, or offset_idx moves it out of range)")


def _within(rows: list[int], word: str, n_rows: int | None, why: str) -> list[int]:
    """``rows``, or an error naming those at or beyond ``n_rows``."""
    bad = [r for r in rows if n_rows is not None and not 0 <= r < n_rows]
    if bad:
        raise QueryError(f"word {word!r} maps to token rows {bad} beyond the {n_rows} rows the text encoder saw {why}")
    return rows


def text_rows(tokenizer: Any, prompt: str, word: str, first_row: int, n_rows: int | None = None) -> list[int] | None:
    """Rows of the tokens overlapping a whole-word occurrence of ``word`` in ``prompt``, ignoring case
    (so "red" finds "Red" and "(red)", which a case-sensitive tokenizer splits differently). None if
    the tokenizer gives no character offsets.

    >>> from daami2i.testing import t5_tokenizer
    >>> tok = t5_tokenizer()
    >>> tok.tokenize("A Red cat")
    ['▁', 'A', '▁', 'R', 'ed', '▁cat']
    >>> text_rows(tok, "A Red cat", "red", first_row=0)
    [3, 4]
    """
    if not isinstance(word, str) or not word.strip():
        raise QueryError(f"word must be a non-empty string, got {word!r}")
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return None
    spans = [(m.start(), m.end()) for m in re.finditer(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, re.I)]
    rows = [first_row + i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]
    if not rows:
        raise QueryError(
            f"word {word!r} is not in the prompt {prompt!r}; its words are {split_words(tokenizer.tokenize(prompt))}"
        )
    return _within(rows, word, n_rows, "(the prompt was truncated)")


def aggregate_layers(
    layers: Sequence[CrossAttentionLayer], grid: Size, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """DAAM's aggregation: each (layer, head) map is upsampled bicubically to the grid and clamped
    at 0, then all are averaged. Returns (tokens, h, w) float32, or (len(rows), h, w) for the
    token ``rows`` alone (each row's map does not depend on the others)."""
    if not layers:
        raise QueryError("no cross-attention was captured: trace with cross_attention=True to compute word maps")
    total: torch.Tensor | None = None
    count = 0
    for layer in layers:
        sums = layer.sums if rows is None else layer.sums[:, :, list(rows)]
        heads, _, n_tok = sums.shape
        h, w = layer.size
        maps = sums.transpose(1, 2).reshape(heads * n_tok, 1, h, w)
        if (h, w) != tuple(grid):
            maps = F.interpolate(maps, size=grid, mode="bicubic", align_corners=False)
        maps = maps.clamp(min=0).view(heads, n_tok, *grid).sum(0)
        total = maps if total is None else total + maps
        count += heads
    assert total is not None
    return total / count

"""Word maps (DAAM): token lookup and per-(layer, head) aggregation of cross-attention."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
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
    # joint layers traced with text relations: the same token columns as queries (head means)
    text_image: torch.Tensor | None = None  # shape: (tokens, h*w) float32, text -> image
    text_text: torch.Tensor | None = None  # shape: (tokens, tokens) float32, text -> text


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

    @property
    def n_seen(self) -> int | None:
        """How many of the prompt's tokens the text encoder saw (None if the prompt is unknown)."""
        if self.tokens is None:
            return None
        if self.stop_row is None:
            return len(self.tokens)
        return max(0, min(len(self.tokens), self.stop_row - self.first_row))

    @property
    def seen_tokens(self) -> list[str] | None:
        """The prompt's tokens the text encoder saw: a prompt longer than the encoder's window is cut."""
        return None if self.tokens is None else self.tokens[: self.n_seen]

    @property
    def truncated(self) -> bool:
        """True when the text encoder saw only the first :attr:`n_seen` of the prompt's tokens."""
        return self.tokens is not None and (self.n_seen or 0) < len(self.tokens)


def tokenize_prompt(tokenizer: Any, prompt: str) -> list[str]:
    """All of a prompt's tokens, however long (no truncation), without transformers' notice that the
    sequence is longer than the model's window: daami2i reads the cut itself and says so once.

    >>> from daami2i.testing import clip_tokenizer
    >>> len(tokenize_prompt(clip_tokenizer(), "a " * 100))
    100
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return list(tokenizer.tokenize(prompt))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return list(tokenizer.tokenize(prompt))
    finally:
        hf_logging.set_verbosity(level)


def locate_tokens(
    rows: Sequence[Sequence[int]], ids: Sequence[int], ignore: Iterable[int] = ()
) -> tuple[int, int] | None:
    """Where a prompt's token ``ids`` sit in the id ``rows`` a text encoder received: ``(start, n)``
    of the first row holding all of them (a template or a system prompt around them is skipped), else
    of the longest prefix of them that runs to the end of a row (the encoder's window cut the prompt;
    trailing ids in ``ignore``, padding or an end token, do not count); None if neither is found.

    >>> locate_tokens([[7, 7, 1, 5, 6, 2, 0, 0]], [5, 6])
    (3, 2)
    >>> locate_tokens([[1, 5, 6, 0]], [5, 6, 8], ignore=[0])  # cut after two tokens
    (1, 2)
    >>> locate_tokens([[1, 5, 6]], [9]) is None
    True
    """
    ids = list(ids)
    if not ids:
        return None
    skip = set(ignore)
    for row in rows:
        row = list(row)
        for start in range(len(row) - len(ids) + 1):
            if row[start : start + len(ids)] == ids:
                return start, len(ids)
    best: tuple[int, int] | None = None
    for row in rows:
        row = list(row)
        end = len(row)
        while end and row[end - 1] in skip:
            end -= 1
        for k in range(min(len(ids) - 1, end), 0, -1):
            if row[end - k : end] == ids[:k]:
                if best is None or k > best[1]:
                    best = (end - k, k)
                break
    return best


def clean_token(token: str) -> str:
    """A token without its word-boundary marker (CLIP's ``</w>`` suffix, SentencePiece's ``▁`` prefix)."""
    return token.replace("</w>", "").lstrip("\u2581")


def is_word(text: str) -> bool:
    """A word has a letter, a digit or a pictograph (emoji); punctuation alone is not a word.

    >>> is_word("café"), is_word("🙂"), is_word("!!")
    (True, True, False)
    """
    return any(ch.isalnum() or unicodedata.category(ch) == "So" for ch in text)


def decode_tokens(tokenizer: Any, tokens: Sequence[str]) -> str:
    """The text of a run of tokens: byte-level BPE (CLIP) pieces decoded to UTF-8, word markers dropped.

    >>> from daami2i.testing import clip_tokenizer
    >>> tok = clip_tokenizer()
    >>> tok.tokenize("café")
    ['cafÃ©</w>']
    >>> decode_tokens(tok, tok.tokenize("café"))
    'café'
    """
    if tokenizer is not None and tokens:
        try:
            ids = tokenizer.convert_tokens_to_ids(list(tokens))
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(ids, list) and all(isinstance(i, int) for i in ids) and (unk is None or unk not in ids):
                text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if isinstance(text, str):
                    return " ".join(text.split())
        except Exception:  # a tokenizer without a decoder: fall back to the pieces themselves
            pass
    return "".join(clean_token(t) for t in tokens)


def word_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """(start, stop) token positions of each word (sub-word tokens joined), punctuation included.

    Works for CLIP BPE (``</w>`` ends a word), SentencePiece (``▁`` starts one) and GPT-2-style
    byte-level BPE (Qwen: ``Ġ``, the space byte, starts one).

    >>> word_spans(["a</w>", "zeb", "ra</w>", ",</w>"])
    [(0, 1), (1, 3), (3, 4)]
    >>> word_spans(["▁a", "▁re", "d", "▁cat"])
    [(0, 1), (1, 3), (3, 4)]
    >>> word_spans(["a", "Ġre", "d", "Ġcat"])
    [(0, 1), (1, 3), (3, 4)]
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for i, tok in enumerate(tokens):
        if tok.startswith(("▁", "\u0120")) and i > start:
            spans.append((start, i))
            start = i
        if tok.endswith("</w>"):
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return spans


def split_words(tokens: Sequence[str], tokenizer: Any = None, n_seen: int | None = None) -> list[str]:
    """The distinct words of a token sequence (sub-word tokens joined, punctuation dropped), in order.

    With ``tokenizer``, byte-level pieces are decoded (``cafÃ©`` -> ``café``). ``n_seen`` (a prompt
    the text encoder cut) keeps only the words whose every token is among the first ``n_seen``.

    >>> split_words(["a</w>", "zeb", "ra</w>", ",</w>", "a</w>"])
    ['a', 'zebra']
    >>> split_words(["▁a", "▁re", "d", "▁cat"])
    ['a', 'red', 'cat']
    >>> split_words(["a</w>", "zeb", "ra</w>", "cat</w>"], n_seen=2)
    ['a']
    """
    out: list[str] = []
    for a, b in word_spans(tokens):
        if n_seen is not None and b > n_seen:
            break
        word = decode_tokens(tokenizer, tokens[a:b])
        if is_word(word) and word not in out:
            out.append(word)
    return out


def _whole_word_at(tokens: Sequence[str], search: Sequence[str], i: int) -> bool:
    """Does ``search`` match ``tokens[i:]`` as whole words (not a piece of a longer word)?"""
    n = len(search)
    if list(tokens[i : i + n]) != list(search):
        return False
    if i > 0 and not (tokens[i - 1].endswith("</w>") or search[0].startswith("▁")):
        return False  # CLIP: the previous token does not end a word ("bob" + "cat</w>")
    if search[-1].endswith("</w>") or i + n == len(tokens):
        return True
    nxt = tokens[i + n]
    return nxt.startswith("▁") or not clean_token(nxt)[:1].isalnum()  # SentencePiece: a new word follows


def token_rows(
    tokenizer: Any,
    prompt_tokens: Sequence[str],
    word: str,
    word_idx: int | None = None,
    offset_idx: int = 0,
    n_rows: int | None = None,
    first_row: int = 1,
    n_seen: int | None = None,
) -> list[int]:
    """Rows of the cross-attention map that belong to ``word``; the prompt's first token is at
    ``first_row`` (1 for CLIP, whose start token is row 0).

    With ``word_idx=None`` every whole-word occurrence of the word's token sequence among the first
    ``n_seen`` tokens (those the text encoder saw; all by default) is merged (DAAM's behaviour),
    shifted by ``offset_idx``; otherwise the token at position ``word_idx`` of the tokenized prompt
    (0 = first token after the start token) is used.

    >>> from daami2i.testing import clip_tokenizer
    >>> tok = clip_tokenizer()
    >>> toks = tok.tokenize("a cat and a catdog")
    >>> toks
    ['a</w>', 'cat</w>', 'and</w>', 'a</w>', 'cat', 'dog</w>']
    >>> token_rows(tok, toks, "cat"), token_rows(tok, toks, "catdog")
    ([2], [5, 6])
    """
    tokens = list(prompt_tokens)
    seen = len(tokens) if n_seen is None else min(n_seen, len(tokens))
    cut = (
        f" (the text encoder saw only the first {seen} of the prompt's {len(tokens)} tokens)"
        if seen < len(tokens)
        else ""
    )
    if word_idx is not None:
        if isinstance(word_idx, bool) or not isinstance(word_idx, int) or not 0 <= word_idx < seen:
            raise QueryError(
                f"word_idx must be a token position in [0, {seen - 1}] of the prompt tokens "
                f"{[t.replace('</w>', '') for t in tokens[:seen]]}{cut}, got {word_idx!r}"
            )
        rows = [word_idx + first_row]
    else:
        if not isinstance(word, str) or not word.strip():
            raise QueryError(f"word must be a non-empty string, got {word!r}")
        if isinstance(offset_idx, bool) or not isinstance(offset_idx, int):
            raise QueryError(f"offset_idx must be an integer token shift, got {offset_idx!r}")
        search = list(tokenizer.tokenize(word.strip().lower()))
        n = len(search)
        found = [i for i in range(len(tokens) - n + 1) if _whole_word_at(tokens, search, i)]
        starts = [i + offset_idx for i in found if i + n <= seen]
        rows = [s + j + first_row for s in starts for j in range(n)]
        if not rows:
            shown = word.strip()
            if found:
                raise QueryError(
                    f"word {shown!r} occurs only after token {seen}, where the prompt was truncated{cut}: the model "
                    "never saw it. Shorten the prompt, or query a word of its first part."
                )
            bare = [t.replace("</w>", "") for t in tokens[:seen]]
            loose = [t.replace("</w>", "") for t in search]
            pieces = [i for i in range(seen - n + 1) if bare[i : i + n] == loose]
            if pieces:
                a, b = next((a, b) for a, b in word_spans(tokens) if a <= pieces[0] < b)
                raise QueryError(
                    f"word {shown!r} is only a piece of the prompt's word {decode_tokens(tokenizer, tokens[a:b])!r} "
                    f"(tokens {bare[a:b]}); query that word, or pass word_idx={pieces[0]} for the piece alone"
                )
            words = split_words(tokens, tokenizer, seen)
            raise QueryError(
                f"word {shown!r} (tokens {loose}) is not in the prompt; its tokens are {bare} (words {words}){cut}. "
                "Pass one of these words, or word_idx=<position> for a single token."
            )
    return _within(rows, word, n_rows, "(offset_idx moves it out of range)")


def encoder_rows(tokenizer: Any) -> int | None:
    """The text encoder's window (77 for CLIP) as the tokenizer states it, or None if it does not."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 100_000 else None


def truncation_note(stream: TokenStream) -> str:
    """One sentence saying where a long prompt was cut, for a truncated ``stream``.

    >>> from daami2i.testing import clip_tokenizer
    >>> tok = clip_tokenizer()
    >>> st = TokenStream("clip", tok, tok.tokenize("a red cat on a mat"), 1, stop_row=4)
    >>> print(truncation_note(st))  # doctest: +NORMALIZE_WHITESPACE
    the prompt is longer than the clip text encoder's window: it saw the first 3 of 6 tokens,
    up to '... a red cat'; 'on a mat' was cut and has no word maps
    """
    toks, n = stream.tokens or [], stream.n_seen or 0
    kept = decode_tokens(stream.tokenizer, toks[:n])
    lost = decode_tokens(stream.tokenizer, toks[n:])
    tail = kept if len(kept) <= 40 else kept[-40:].split(" ", 1)[-1]
    lost = lost if len(lost) <= 60 else lost[:60].rsplit(" ", 1)[0] + " ..."
    return (
        f"the prompt is longer than the {stream.name} text encoder's window: it saw the first {n} of {len(toks)} "
        f"tokens, up to '... {tail}'; {lost!r} was cut and has no word maps"
    )


def _within(rows: list[int], word: str, n_rows: int | None, why: str) -> list[int]:
    """``rows``, or an error naming those at or beyond ``n_rows``."""
    bad = [r for r in rows if n_rows is not None and not 0 <= r < n_rows]
    if bad:
        raise QueryError(f"word {word!r} maps to token rows {bad} beyond the {n_rows} rows the text encoder saw {why}")
    return rows


def text_rows(
    tokenizer: Any, prompt: str, word: str, first_row: int, n_rows: int | None = None, n_seen: int | None = None
) -> list[int] | None:
    """Rows of the tokens overlapping a whole-word occurrence of ``word`` in ``prompt``, ignoring case
    (so "red" finds "Red" and "(red)", which a case-sensitive tokenizer splits differently), among the
    first ``n_seen`` tokens (those the text encoder saw). None if the tokenizer gives no offsets.

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
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]
    if not hits:
        raise QueryError(
            f"word {word!r} is not in the prompt {prompt!r}; its words are "
            f"{split_words(tokenize_prompt(tokenizer, prompt), tokenizer, n_seen)}"
        )
    seen = [i for i in hits if n_seen is None or i < n_seen]
    if not seen:
        raise QueryError(
            f"word {word!r} occurs only after token {n_seen}, where the prompt was truncated (the text encoder saw "
            f"only the first {n_seen} of its {len(offsets)} tokens): the model never saw it. Shorten the prompt, or "
            "query a word of its first part."
        )
    return _within([first_row + i for i in seen], word, n_rows, "(the prompt was truncated)")


def aggregate_layers(
    layers: Sequence[CrossAttentionLayer], grid: Size, rows: Sequence[int] | None = None, frames: int = 1
) -> torch.Tensor:
    """DAAM's aggregation: each (layer, head) map is upsampled bicubically to the grid and clamped
    at 0, then all are averaged. Returns (tokens, h, w) float32, or (len(rows), h, w) for the
    token ``rows`` alone (each row's map does not depend on the others). ``frames > 1``: the maps
    are that many video frames stacked top to bottom, each upsampled on its own."""
    if not layers:
        raise QueryError("no cross-attention was captured: trace with cross_attention=True to compute word maps")
    total: torch.Tensor | None = None
    count = 0
    for layer in layers:
        sums = layer.sums if rows is None else layer.sums[:, :, list(rows)]
        heads, _, n_tok = sums.shape
        h, w = layer.size
        maps = sums.transpose(1, 2).reshape(heads * n_tok, 1, h, w)
        if (h, w) != tuple(grid) and frames > 1:  # frame by frame: (maps * frames, 1, h / frames, w)
            per = maps.reshape(heads * n_tok * frames, 1, h // frames, w)
            per = F.interpolate(per, size=(grid[0] // frames, grid[1]), mode="bicubic", align_corners=False)
            maps = per.reshape(heads * n_tok, 1, *grid)
        elif (h, w) != tuple(grid):
            maps = F.interpolate(maps, size=grid, mode="bicubic", align_corners=False)
        maps = maps.clamp(min=0).view(heads, n_tok, *grid).sum(0)
        total = maps if total is None else total + maps
        count += heads
    assert total is not None
    return total / count

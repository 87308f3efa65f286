"""DAAM's syntactic analysis: word maps of the prompt's parsed words and of its dependency pairs.

The prompt is parsed with spaCy (the ``nlp`` extra: ``pip install 'daami2i[nlp]'``). By default the
``en_core_web_md`` pipeline parses it, as in DAAM; install it with
``python -m spacy download en_core_web_md``, or pass ``nlp=`` (another pipeline, its name or folder,
or any callable that returns a spaCy ``Doc``) or ``doc=`` (the prompt already parsed). Nothing is
downloaded at run time.

A parsed word whose word map cannot be found in the prompt's tokens (punctuation the tokenizer drops,
a word the text encoder never saw) is skipped, as DAAM skips it.

>>> import spacy, torch
>>> from spacy.tokens import Doc
>>> from daami2i.heatmaps import CrossAttentionLayer, GlobalHeatMap
>>> from daami2i.testing import clip_tokenizer
>>> tok = clip_tokenizer()
>>> layer = CrossAttentionLayer("up", (2, 2), torch.rand(1, 4, 5))  # start token, 3 words, end token
>>> ghm = GlobalHeatMap((2, 2), [], [layer], "a red cat", tok.tokenize("a red cat"), tok)
>>> doc = Doc(spacy.blank("en").vocab, words=["a", "red", "cat"], heads=[2, 2, 2], deps=["det", "amod", "ROOT"])
>>> [p.token.text for p in parsed_heat_maps(ghm, doc=doc)]
['a', 'red', 'cat']
>>> [(p.head_text, p.relation, p.dep_text) for p in dependency_relations(ghm, doc=doc)]
[('cat', 'det', 'a'), ('cat', 'amod', 'red')]
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from ..errors import ConfigError, QueryError

if TYPE_CHECKING:
    from spacy.tokens import Doc, Token

    from .maps import GlobalHeatMap, WordHeatMap

__all__ = [
    "DEFAULT_PIPELINE",
    "ParsedHeatMap",
    "SyntacticHeatMapPair",
    "dependency_relations",
    "parse_prompt",
    "parsed_heat_maps",
]

DEFAULT_PIPELINE = "en_core_web_md"  # DAAM's parser

# a spaCy pipeline (any callable from text to a Doc) or the name or folder of an installed one
Parser = Union[str, "Callable[[str], Doc]"]


@dataclass
class ParsedHeatMap:
    """One parsed word of the prompt and its word map (DAAM's ``ParsedHeatMap``)."""

    word_heat_map: WordHeatMap
    token: Token


@dataclass
class SyntacticHeatMapPair:
    """A dependency of the prompt: the head word's and the dependent word's maps and texts, and the
    relation (spaCy's ``dep_`` label of the dependent), as DAAM's ``SyntacticHeatMapPair``."""

    head_heat_map: WordHeatMap
    dep_heat_map: WordHeatMap
    head_text: str
    dep_text: str
    relation: str


_CACHE_SIZE = 64
_parses: OrderedDict[tuple[Any, ...], tuple[Any, Doc]] = OrderedDict()  # (parser key, prompt) -> (parser, doc)
_lock = threading.Lock()


def parse_prompt(prompt: str, nlp: Parser | None = None) -> Doc:
    """``prompt`` parsed by ``nlp`` (default ``en_core_web_md``), cached per parser and prompt.

    A ``QueryError`` says what to install when spaCy or the pipeline is missing.
    """
    if not isinstance(prompt, str):
        raise QueryError(f"the prompt to parse must be a string, got {type(prompt).__name__}")
    parser: Callable[[str], Doc] | None = None
    if nlp is None or isinstance(nlp, str):
        name = DEFAULT_PIPELINE if nlp is None else nlp
        key: tuple[Any, ...] = ("name", name, prompt)
    elif callable(nlp):
        parser = nlp
        key = ("object", id(nlp), prompt)  # the cache keeps the parser alive, so its id stays its own
    else:
        raise QueryError(
            f"nlp must be a spaCy pipeline (or a callable from text to a spaCy Doc) or the name of an installed "
            f"pipeline, got {type(nlp).__name__}"
        )
    with _lock:
        hit = _parses.get(key)
        if hit is not None:
            _parses.move_to_end(key)
            return hit[1]
    if parser is None:
        parser = _load(name)
    doc = parser(prompt)
    _check_doc(doc, "nlp(prompt)")
    with _lock:
        _parses[key] = (parser, doc)
        while len(_parses) > _CACHE_SIZE:
            _parses.popitem(last=False)
    return doc


def parsed_heat_maps(ghm: GlobalHeatMap, doc: Doc | None = None, nlp: Parser | None = None) -> Iterator[ParsedHeatMap]:
    """Each word of the parsed prompt with its word map ``ghm.compute_word_heat_map(token.text)``, in
    order; words not found among the prompt's tokens are skipped (DAAM's ``parsed_heat_maps``).

    ``doc`` is the prompt already parsed; otherwise ``nlp`` (a pipeline or a pipeline's name; default
    ``en_core_web_md``) parses ``ghm.prompt``. The prompt is parsed and checked at the call, the maps
    are computed as the iterator is read.
    """
    parsed = _doc_for(ghm, doc, nlp, need_parse=False)
    return _parsed(parsed, _word_maps(ghm))


def dependency_relations(
    ghm: GlobalHeatMap, doc: Doc | None = None, nlp: Parser | None = None
) -> Iterator[SyntacticHeatMapPair]:
    """A pair for each parsed word that is not the root of its sentence: its head's and its own word
    maps and texts, and its dependency label; pairs where either word is not found among the prompt's
    tokens are skipped (DAAM's ``dependency_relations``). ``doc`` and ``nlp`` as in
    :func:`parsed_heat_maps`; the parse must have dependencies (a pipeline with a parser).
    """
    parsed = _doc_for(ghm, doc, nlp, need_parse=True)
    return _relations(parsed, _word_maps(ghm))


def _parsed(doc: Doc, lookup: Callable[[str], WordHeatMap | None]) -> Iterator[ParsedHeatMap]:
    for token in doc:
        word_map = lookup(token.text)
        if word_map is not None:
            yield ParsedHeatMap(word_map, token)


def _relations(doc: Doc, lookup: Callable[[str], WordHeatMap | None]) -> Iterator[SyntacticHeatMapPair]:
    for token in doc:
        if token.dep_ == "ROOT":
            continue
        dep_map = lookup(token.text)
        head_map = lookup(token.head.text) if dep_map is not None else None
        if dep_map is not None and head_map is not None:
            yield SyntacticHeatMapPair(head_map, dep_map, token.head.text, token.text, token.dep_)


def _doc_for(ghm: GlobalHeatMap, doc: Doc | None, nlp: Parser | None, need_parse: bool) -> Doc:
    """The parse to walk: ``doc`` (checked against the prompt) or ``ghm.prompt`` parsed by ``nlp``."""
    if not ghm.cross_layers:
        raise QueryError("no cross-attention was captured: trace with cross_attention=True to compute word maps")
    ghm.tokens  # raises the explanatory error when the generation had no prompt text  # noqa: B018
    if all(st.tokenizer is None for st in ghm.streams):
        raise QueryError("no tokenizer is attached to this heat map, so words cannot be looked up")
    prompt = ghm.prompt
    if doc is not None:
        if nlp is not None:
            raise QueryError("pass doc= (the prompt already parsed) or nlp= (a parser for it), not both")
        _check_doc(doc, "doc")
        if isinstance(prompt, str) and _letters(doc.text) != _letters(prompt):
            raise QueryError(
                f"doc is a parse of {doc.text!r}, not of this heat map's prompt {prompt!r}: parse the prompt "
                "itself (nlp(ghm.prompt)) or build the Doc from its words"
            )
    elif not isinstance(prompt, str):
        raise QueryError("this heat map has no prompt text to parse: pass doc= (a spaCy Doc of the prompt)")
    else:
        doc = parse_prompt(prompt, nlp)
    if need_parse and not doc.has_annotation("DEP"):
        raise QueryError(
            f"the parse of {doc.text!r} has no dependencies (its pipeline has no parser): dependency_relations "
            f"needs one, such as {DEFAULT_PIPELINE} (python -m spacy download {DEFAULT_PIPELINE}), or a Doc "
            "built with heads= and deps="
        )
    return doc


def _word_maps(ghm: GlobalHeatMap) -> Callable[[str], WordHeatMap | None]:
    """Word -> its word map, or None where the word is not found (DAAM skips those); each word once."""
    memo: dict[str, WordHeatMap | None] = {}

    def lookup(word: str) -> WordHeatMap | None:
        if word not in memo:
            try:
                memo[word] = ghm.compute_word_heat_map(word)
            except QueryError:  # not in the prompt, only a piece of a word, cut off, blank: as DAAM's ValueError
                memo[word] = None
        return memo[word]

    return lookup


def _load(name: str) -> Callable[[str], Doc]:
    """The installed spaCy pipeline ``name``, or a QueryError saying what to install."""
    from ..datasets import _spacy_pipeline

    try:
        return _spacy_pipeline(name)  # type: ignore[no-any-return]
    except ConfigError as exc:
        spacy_hint = "" if importlib.util.find_spec("spacy") else "pip install 'daami2i[nlp]', then "
        raise QueryError(
            f"syntactic analysis parses the prompt with the spaCy pipeline {name!r}, which is not installed: "
            f"install it ({spacy_hint}python -m spacy download {name}), or pass nlp= (a loaded spaCy pipeline "
            "or the name of an installed one) or doc= (the prompt already parsed, a spaCy Doc)"
        ) from exc


def _check_doc(doc: Any, what: str) -> None:
    """A QueryError unless ``doc`` is a spaCy Doc."""
    try:
        from spacy.tokens import Doc
    except ImportError as exc:
        raise QueryError("syntactic analysis needs spaCy: pip install 'daami2i[nlp]'") from exc
    if not isinstance(doc, Doc):
        raise QueryError(f"{what} must be a spaCy Doc, got {type(doc).__name__}")


def _letters(text: str) -> str:
    """``text`` without whitespace, lower-cased: a hand-built Doc spaces its words its own way."""
    return "".join(text.split()).lower()

"""DAAM's syntactic analysis (parsed_heat_maps, dependency_relations) on a hand-parsed prompt.

No English spaCy pipeline is installed offline, so the parse is a Doc whose heads and dependency
labels are set by hand, as en_core_web_md parses this prompt: spaCy splits "gonna" into "gon" + "na",
which CLIP keeps as one token "gonna", so neither piece has a word map and DAAM skips both.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch

import daami2i
from daami2i.heatmaps import ParsedHeatMap, SyntacticHeatMapPair, syntax
from daami2i.heatmaps.syntax import dependency_relations, parsed_heat_maps

spacy = pytest.importorskip("spacy")
from spacy.tokens import Doc  # noqa: E402

PROMPT = "a red cat gonna sleep"
WORDS = ["a", "red", "cat", "gon", "na", "sleep"]
HEADS = [2, 2, 3, 3, 5, 3]  # token index of each word's head; the root is its own head
DEPS = ["det", "amod", "nsubj", "ROOT", "aux", "xcomp"]
FOUND = ["a", "red", "cat", "sleep"]  # the words CLIP's tokens of the prompt contain
# non-ROOT tokens whose word and head word are both found: (head, relation, dependent)
PAIRS = [("cat", "det", "a"), ("cat", "amod", "red")]


@pytest.fixture(scope="module")
def ghm(sd1):
    with daami2i.trace(sd1) as trc:
        sd1(PROMPT, num_inference_steps=2, height=64, width=64)
    return trc.compute_global_heat_map()


@pytest.fixture()
def doc():
    return Doc(spacy.blank("en").vocab, words=WORDS, heads=HEADS, deps=DEPS)


@pytest.fixture()
def fresh_cache(monkeypatch):
    monkeypatch.setattr(syntax, "_parses", OrderedDict())


def _word_map(ghm, word):
    return ghm.compute_word_heat_map(word).value


def test_dataclasses_have_daams_fields():
    assert [f.name for f in dataclasses.fields(ParsedHeatMap)] == ["word_heat_map", "token"]
    assert [f.name for f in dataclasses.fields(SyntacticHeatMapPair)] == [
        "head_heat_map",
        "dep_heat_map",
        "head_text",
        "dep_text",
        "relation",
    ]


def test_the_skipped_words_are_those_not_in_the_prompt(ghm):
    assert ghm.tokens == ["a</w>", "red</w>", "cat</w>", "gonna</w>", "sleep</w>"]
    for word in WORDS:
        if word in FOUND:
            ghm.compute_word_heat_map(word)
        else:
            with pytest.raises(daami2i.QueryError):
                ghm.compute_word_heat_map(word)


def test_parsed_heat_maps_are_the_found_words_maps(ghm, doc):
    parsed = list(parsed_heat_maps(ghm, doc=doc))
    assert [p.token.text for p in parsed] == FOUND
    assert [p.token.i for p in parsed] == [WORDS.index(w) for w in FOUND]
    for p in parsed:
        assert isinstance(p, ParsedHeatMap)
        assert p.token.doc is doc
        assert p.word_heat_map.word == p.token.text
        assert torch.equal(p.word_heat_map.value, _word_map(ghm, p.token.text))


def test_dependency_relations_are_the_non_root_pairs_with_both_words_found(ghm, doc):
    pairs = list(dependency_relations(ghm, doc=doc))
    assert [(p.head_text, p.relation, p.dep_text) for p in pairs] == PAIRS
    for p in pairs:
        assert isinstance(p, SyntacticHeatMapPair)
        assert torch.equal(p.head_heat_map.value, _word_map(ghm, p.head_text))
        assert torch.equal(p.dep_heat_map.value, _word_map(ghm, p.dep_text))
    # the same pairs from the Doc itself: every non-ROOT token, kept where both words are in the prompt
    ref = [(t.head.text, t.dep_, t.text) for t in doc if t.dep_ != "ROOT" and {t.text, t.head.text} <= set(FOUND)]
    assert ref == PAIRS
    # the root's own pair and those through the skipped "gon" / "na" are left out
    assert all("gon" not in (p.head_text, p.dep_text) and p.relation != "ROOT" for p in pairs)


def test_global_heat_map_methods_call_the_functions(ghm, doc):
    assert hasattr(ghm, "parsed_heat_maps") and hasattr(ghm, "dependency_relations")
    by_method = [(p.token.text, p.word_heat_map.value) for p in ghm.parsed_heat_maps(doc=doc)]
    by_function = [(p.token.text, p.word_heat_map.value) for p in parsed_heat_maps(ghm, doc=doc)]
    assert [w for w, _ in by_method] == [w for w, _ in by_function] == FOUND
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(by_method, by_function, strict=True))
    pairs = list(ghm.dependency_relations(doc=doc))
    assert [(p.head_text, p.relation, p.dep_text) for p in pairs] == PAIRS
    assert all(torch.equal(p.dep_heat_map.value, _word_map(ghm, p.dep_text)) for p in pairs)


def test_missing_default_pipeline_says_what_to_install(ghm, monkeypatch, fresh_cache):
    from daami2i import datasets

    def not_installed(name, *args, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", not_installed)  # as when en_core_web_md is not installed
    datasets._spacy_pipeline.cache_clear()
    for call in (parsed_heat_maps, dependency_relations):
        with pytest.raises(daami2i.QueryError) as err:
            call(ghm)  # raised at the call, not when the iterator is first read
        msg = str(err.value)
        assert "python -m spacy download en_core_web_md" in msg
        assert "nlp=" in msg and "doc=" in msg
    with pytest.raises(daami2i.QueryError, match="python -m spacy download en_core_web_lg"):
        parsed_heat_maps(ghm, nlp="en_core_web_lg")
    datasets._spacy_pipeline.cache_clear()


def test_nlp_callable_is_called_once_per_prompt(ghm, doc, fresh_cache):
    calls: list[str] = []

    def parse(text: str) -> Doc:
        calls.append(text)
        return doc

    parsed = [(p.token.text, p.word_heat_map.value) for p in parsed_heat_maps(ghm, nlp=parse)]
    assert [w for w, _ in parsed] == FOUND
    assert all(torch.equal(m, _word_map(ghm, w)) for w, m in parsed)
    pairs = list(dependency_relations(ghm, nlp=parse))
    assert [(p.head_text, p.relation, p.dep_text) for p in pairs] == PAIRS
    assert calls == [PROMPT]  # the parse is cached per parser and prompt


def test_blank_pipeline_tokenizes_but_has_no_dependencies(ghm, tmp_path, fresh_cache):
    nlp = spacy.blank("en")
    assert [p.token.text for p in parsed_heat_maps(ghm, nlp=nlp)] == FOUND
    with pytest.raises(daami2i.QueryError, match="no dependencies"):
        dependency_relations(ghm, nlp=nlp)
    nlp.to_disk(tmp_path / "blank_en")  # a pipeline folder given by name, loaded with spacy.load
    assert [p.token.text for p in parsed_heat_maps(ghm, nlp=str(tmp_path / "blank_en"))] == FOUND


def test_bad_parses_are_refused(ghm, doc):
    other = Doc(spacy.blank("en").vocab, words=["a", "dog"], heads=[1, 1], deps=["det", "ROOT"])
    with pytest.raises(daami2i.QueryError, match="not of this heat map's prompt"):
        parsed_heat_maps(ghm, doc=other)
    with pytest.raises(daami2i.QueryError, match="not both"):
        parsed_heat_maps(ghm, doc=doc, nlp=spacy.blank("en"))
    with pytest.raises(daami2i.QueryError, match="must be a spaCy Doc"):
        parsed_heat_maps(ghm, doc=WORDS)
    with pytest.raises(daami2i.QueryError, match="nlp must be"):
        parsed_heat_maps(ghm, nlp=42)
    with pytest.raises(daami2i.QueryError, match="must be a spaCy Doc"):
        parsed_heat_maps(ghm, nlp=lambda text: text.split())

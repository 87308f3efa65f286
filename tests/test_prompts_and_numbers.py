"""Long and non-ASCII prompts, whole-word lookup, and numbers that are not what they claim."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import daami2i
from daami2i import ConfigError, QueryError


def run(pipe, prompt, **kw):
    with daami2i.trace(pipe, **kw) as trc:
        pipe(prompt, num_inference_steps=2, height=64, width=64)
    return trc


# -- long prompts ---------------------------------------------------------------------------------
LONG = " ".join(["a red cat"] * 30) + " and a blue dog on a green mat"  # 90 + 8 = 98 tokens, over 75


def test_long_prompt_warns_once_and_keeps_what_was_seen(sd1):
    toks = sd1.tokenizer.tokenize(LONG.lower())
    assert len(toks) > 75
    with pytest.warns(UserWarning, match=r"longer than the clip text encoder's window: it saw the first 75 of"):
        trc = run(sd1, LONG)
    ghm = trc.compute_global_heat_map()
    assert ghm.tokens == toks[:75]
    assert ghm.truncation is not None and "75" in ghm.truncation
    # every listed word was seen, and can be queried
    seen = {t.replace("</w>", "") for t in toks[:75]}
    assert set(ghm.words) <= seen and "dog" not in ghm.words and "mat" not in ghm.words
    for w in ghm.words:
        ghm.compute_word_heat_map(w)
    # 'cat' occurs 30 times but only its seen occurrences count: the mean of those rows (+1: start token)
    rows = [i + 1 for i, t in enumerate(toks[:75]) if t == "cat</w>"]
    assert 0 < len(rows) < 30
    ref = ghm.token_maps[rows].mean(0)
    assert torch.allclose(ghm.compute_word_heat_map("cat").value, ref, rtol=0, atol=1e-7)
    with pytest.raises(QueryError, match=r"'dog' occurs only after token 75.*truncated"):
        ghm.compute_word_heat_map("dog")


def test_a_word_on_the_end_token_row_is_not_a_word(sd1):
    # 75 tokens of "a", then "dog": the 76th token would sit on row 76, where the encoder put its end token
    prompt = "a " * 75 + "dog"
    with pytest.warns(UserWarning, match="longer than"):
        trc = run(sd1, prompt)
    ghm = trc.compute_global_heat_map()
    assert ghm.words == ["a"]
    with pytest.raises(QueryError, match="truncated"):
        ghm.compute_word_heat_map("dog")
    with pytest.raises(QueryError, match=r"word_idx must be a token position in \[0, 74\]"):
        ghm.compute_word_heat_map("x", word_idx=75)


def test_a_prompt_that_fits_does_not_warn(sd1):
    prompt = "a " * 74 + "dog"  # 75 tokens: start, 75, end = 77 rows
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*text encoder's window.*")
        trc = run(sd1, prompt)
    ghm = trc.compute_global_heat_map()
    assert ghm.truncation is None and ghm.words == ["a", "dog"]
    assert torch.allclose(ghm.compute_word_heat_map("dog").value, ghm.token_maps[75], rtol=0, atol=1e-7)


# -- non-ASCII and whole words --------------------------------------------------------------------
def test_non_ascii_words_are_decoded_and_queryable(sd1):
    trc = run(sd1, "a café with a cat \U0001f642 and a Straße")
    ghm = trc.compute_global_heat_map()
    assert ghm.words == ["a", "café", "with", "cat", "\U0001f642", "and", "straße"]
    toks = ghm.tokens
    for word in ghm.words:  # each word, as listed, finds its own tokens
        pieces = sd1.tokenizer.tokenize(word)
        n = len(pieces)
        rows = [i + j + 1 for i in range(len(toks) - n + 1) if toks[i : i + n] == pieces for j in range(n)]
        assert rows, word
        ref = ghm.token_maps[rows].mean(0)
        assert torch.allclose(ghm.compute_word_heat_map(word).value, ref, rtol=0, atol=1e-7), word
    # the chip text is what users type back
    assert torch.equal(ghm.compute_word_heat_map("Café").value, ghm.compute_word_heat_map("café").value)


def test_a_word_does_not_match_a_piece_of_a_longer_word(sd1):
    trc = run(sd1, "a catdog and a tomcat")
    ghm = trc.compute_global_heat_map()
    assert ghm.tokens == ["a</w>", "cat", "dog</w>", "and</w>", "a</w>", "tom", "cat</w>"]
    with pytest.raises(QueryError, match=r"'cat' is only a piece of the prompt's word 'catdog'.*word_idx=1"):
        ghm.compute_word_heat_map("cat")
    assert torch.allclose(ghm.compute_word_heat_map("catdog").value, ghm.token_maps[[2, 3]].mean(0), atol=1e-7)
    assert torch.allclose(ghm.compute_word_heat_map("tomcat").value, ghm.token_maps[[6, 7]].mean(0), atol=1e-7)
    # a whole word next to a compound: only the whole word's own row
    ghm2 = run(sd1, "a cat and a catdog").compute_global_heat_map()
    assert torch.allclose(ghm2.compute_word_heat_map("cat").value, ghm2.token_maps[2], rtol=0, atol=1e-7)


# -- numbers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ghm(sd1):
    return run(sd1, "a red cat").compute_global_heat_map()


@pytest.mark.parametrize(
    "ids",
    [[1.5], ["3"], [True], 2.0, np.array([1.0, 2.0]), torch.tensor([1.0]), torch.tensor([True]), "12", [None]],
)
def test_pixel_ids_must_be_integers(ghm, ids):
    with pytest.raises(QueryError, match="integer"):
        ghm.compute_pixel_heat_map(ids)


def test_integer_pixel_ids_of_any_kind(ghm):
    ref = ghm.compute_pixel_heat_map([1, 5]).value
    for ids in (np.array([1, 5]), torch.tensor([1, 5]), [np.int64(1), np.int32(5)], (1, 5)):
        assert torch.equal(ghm.compute_pixel_heat_map(ids).value, ref)


@pytest.mark.parametrize("threshold", [2.0, 1.0, -1, math.nan, math.inf, True, "0.5"])
def test_thresholds_outside_the_unit_interval(ghm, threshold):
    hm = ghm.compute_word_heat_map("cat")
    with pytest.raises(QueryError, match=r"threshold must be a number in \[0, 1\)"):
        hm.expand_as((64, 64), threshold=threshold)
    with pytest.raises(QueryError, match=r"threshold must be a number in \[0, 1\)"):
        ghm.compute_grown_heat_map(hm, iterations=2, threshold=threshold)


@pytest.mark.parametrize("iterations", [0, -2, 2.5, True, "3"])
def test_iterations_must_be_positive_integers(ghm, iterations):
    with pytest.raises(QueryError, match="iterations must be a positive integer"):
        ghm.compute_pixel_grown_heat_map([0], iterations=iterations)


@pytest.mark.parametrize("steps", [range(-3, 2), [1.5], "abc", [True], [], 3, [None]])
def test_trace_steps_are_checked(sd1, steps):
    with pytest.raises(ConfigError, match="steps"):
        daami2i.trace(sd1, steps=steps)


def test_numpy_steps_are_fine(sd1):
    trc = run(sd1, "a red cat", steps=np.array([1]))
    assert trc.last_generation.steps_captured == [1]


def test_steps_outside_the_run_say_so(sd1):
    trc = run(sd1, "a red cat", steps=range(100, 200))
    with pytest.raises(QueryError, match=r"selected none of the 2 denoising steps this generation ran \(0-1\)"):
        trc.compute_global_heat_map()


def test_a_bare_unet_call_with_an_even_batch_warns(sd1):
    sd1("a red cat", num_inference_steps=1, height=64, width=64)  # leaves the pipeline's guidance scale set
    unet = sd1.unet
    sample = torch.randn(2, unet.config.in_channels, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with daami2i.trace(sd1) as trc:
        with pytest.warns(UserWarning, match=r"called directly.*image_idx=1.*trace_image"):
            with torch.no_grad():
                unet(sample, 10, encoder_hidden_states=context)
    gen = trc.last_generation
    assert gen.n_images == 2 and not gen.cfg  # each batch row is an image, whatever the pipeline did before
    trc.compute_global_heat_map(image_idx=1)


@pytest.mark.parametrize(
    "seed, steps, guidance, match",
    [
        (0, 0, 4.0, "steps"),
        (0, -3, 4.0, "steps"),
        (0, 2.5, 4.0, "steps"),
        (0, 99999999999, 4.0, "steps"),
        (0, None, 4.0, "steps"),
        (-1, 2, 4.0, "seed"),
        (1.5, 2, 4.0, "seed"),
        (0, 2, math.nan, "guidance"),
        (0, 2, -1.0, "guidance"),
        (0, 2, math.inf, "guidance"),
    ],
)
def test_explorer_checks_its_numbers_before_generating(sd1, seed, steps, guidance, match):
    from daami2i.explore import Session, generate

    with pytest.raises(QueryError, match=f"{match} must be"):
        generate(sd1, Session(), "a red cat", seed, steps, guidance)


def test_loading_the_embedded_model_prints_nothing():
    """No torchvision notice, no loading bars: nothing a user could act on."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    code = "from daami2i.shapes.model import load_pipeline; load_pipeline()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == ""


def test_tokenizing_a_long_prompt_tells_nothing_itself(sd1, capfd):
    from daami2i.heatmaps.words import tokenize_prompt
    from daami2i.testing import clip_tokenizer

    tok = clip_tokenizer()  # a fresh tokenizer: transformers warns once per tokenizer
    assert len(tokenize_prompt(tok, "a " * 100)) == 100
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_huge_step_lists_are_refused_without_building_them(sd1):
    with pytest.raises(ConfigError, match=r"lists 1000000000 step indices.*callable"):
        daami2i.trace(sd1, steps=range(0, 10**9))

    def forever():
        t = 0
        while True:
            yield t
            t += 1

    with pytest.raises(ConfigError, match="more than 100000"):
        daami2i.trace(sd1, steps=forever())


def test_a_long_prompt_is_told_once_while_traced(sd1, caplog):
    """The libraries' own truncation notices are left out while a trace says it (with the lost words)."""
    import logging

    notice = "The following part of your input was truncated"
    with caplog.at_level(logging.WARNING):
        with pytest.warns(UserWarning, match="longer than"):
            run(sd1, "a " * 80 + "dog")
        assert not [r for r in caplog.records if r.getMessage().startswith(notice)]
        # untraced, the pipeline's notice is as it was; the trace left no filter behind
        sd1("a " * 80 + "cat", num_inference_steps=1, height=64, width=64)
        assert [r for r in caplog.records if r.getMessage().startswith(notice)]
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("diffusers", "transformers"))]
    left = [f for n in names for f in logging.getLogger(n).filters if type(f).__name__ == "_TruncationNotices"]
    assert names and not left


def test_overflowing_attention_is_an_error_not_nan_maps(sd1, tmp_path):
    trc = run(sd1, "a red cat")
    gen = trc.last_generation
    next(iter(gen.self_attention.values())).sums[0, 0, 0] = float("nan")
    with pytest.raises(daami2i.TraceError, match="NaN or infinite"):
        trc.compute_global_heat_map()
    with pytest.raises(daami2i.TraceError, match="NaN or infinite"):
        trc.to_experiment(tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_zero_dim_integer_tensors_are_integers(ghm):
    ref = ghm.compute_pixel_heat_map([3]).value
    assert torch.equal(ghm.compute_pixel_heat_map([torch.tensor(3)]).value, ref)
    assert torch.equal(ghm.compute_pixel_heat_map(torch.tensor(3)).value, ref)
    box = ghm.compute_bbox_heat_map(*torch.tensor([0, 1, 2, 3]))
    assert torch.equal(box.weights, ghm.compute_bbox_heat_map(0, 1, 2, 3).weights)
    with pytest.raises(QueryError, match="integer"):
        ghm.compute_bbox_heat_map(*torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_explorer_chips_for_long_and_non_ascii_prompts(sd1):
    """Chips are the words the encoder saw, as typed; a note says where a long prompt was cut."""
    from daami2i.explore import Session, generate, generated_note, word_chips

    with pytest.warns(UserWarning, match="longer than"):
        state = generate(sd1, Session(), "a café " * 40 + "and a zebra", 0, 1, 4.0)
    chips = word_chips(state)
    assert chips == ["a", "café"]
    for w in chips:  # every chip can be queried
        state.ghm.compute_word_heat_map(w)
    assert "Note: the prompt is longer than the clip text encoder's window" in generated_note(state)
    short = generate(sd1, Session(), "a café with a \U0001f642", 0, 1, 4.0)
    assert word_chips(short) == ["a", "café", "with", "\U0001f642"]
    assert generated_note(short) == "generated; click the image or a word"

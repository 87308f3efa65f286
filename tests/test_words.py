"""DAAM word maps: token lookup, multi-token and repeated words, expand_as and IoA."""

from __future__ import annotations

import pytest
import torch

import daami2i
from daami2i.heatmaps import WordHeatMap
from daami2i.testing import clip_tokenizer


def test_real_clip_tokenizer_offline():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


@pytest.fixture(scope="module")
def ghm(sd1):
    with daami2i.trace(sd1) as trc:
        sd1("A cat with a flowerpot and a cat", num_inference_steps=2, height=64, width=64)
    return trc.compute_global_heat_map()


def test_tokens(ghm):
    assert ghm.tokens == ["a</w>", "cat</w>", "with</w>", "a</w>", "flower", "pot</w>", "and</w>", "a</w>", "cat</w>"]


def test_multi_token_word_is_the_mean_of_its_tokens(ghm):
    m = ghm.token_maps
    # rows: start token is row 0, so prompt token i is row i + 1
    assert torch.allclose(ghm.compute_word_heat_map("flowerpot").value, m[[5, 6]].mean(0))


def test_repeated_word_merges_every_occurrence(ghm):
    assert torch.allclose(ghm.compute_word_heat_map("cat").value, m := ghm.token_maps[[2, 9]].mean(0))
    assert torch.allclose(ghm.compute_word_heat_map("Cat").value, m)  # case-insensitive like the tokenizer


def test_word_idx_and_offset(ghm):
    assert torch.equal(ghm.compute_word_heat_map("cat", word_idx=8).value, ghm.token_maps[9])
    # offset shifts every match: "a" is at tokens 0, 3, 7 -> tokens 1, 4, 8 -> rows 2, 5, 9
    assert torch.allclose(ghm.compute_word_heat_map("a", offset_idx=1).value, ghm.token_maps[[2, 5, 9]].mean(0))


def test_expand_as_modes(ghm):
    wm = ghm.compute_word_heat_map("cat")
    img = torch.zeros(3, 40, 24)
    norm = wm.expand_as(img)
    assert norm.shape == (40, 24) and float(norm.min()) == 0.0 and abs(float(norm.max()) - 1.0) < 1e-6
    raw = wm.expand_as(img, absolute=True)
    ref = torch.nn.functional.interpolate(wm.value[None, None], size=(40, 24), mode="bicubic")[0, 0]
    assert torch.equal(raw, ref)
    mask = wm.expand_as(img, threshold=0.5)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, (norm > 0.5).float())


def test_compute_ioa(ghm):
    a = ghm.compute_word_heat_map("cat")
    b = ghm.compute_word_heat_map("flowerpot")
    assert a.compute_ioa(b) == pytest.approx(float((a.value * b.value).sum() / a.value.sum()), rel=1e-6)
    assert a.compute_ioa(a) == pytest.approx(float((a.value**2).sum() / a.value.sum()), rel=1e-6)
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    # against a mask, the map is resized and binarised at 1 (DAAM): scale it so that part of it is >= 1
    scaled = WordHeatMap((a.value - a.value.min()) / (a.value.max() - a.value.min()) * 1.5, "cat")
    up = torch.nn.functional.interpolate(scaled.value[None, None], size=(16, 16), mode="bicubic")[0, 0]
    binar = (up >= 1).float()
    assert 0 < binar.sum() < binar.numel()  # the check below is not vacuous
    ref = float((binar * mask).sum() / (binar.sum() + 1e-8))
    assert 0 < ref < 1
    assert scaled.compute_ioa(mask) == pytest.approx(ref, abs=1e-6)


def test_prompt_override_and_prompt_embeds(sd1):
    with daami2i.trace(sd1) as trc:
        emb = sd1.encode_prompt("a red cat", "cpu", 1, True)
        sd1(prompt_embeds=emb[0], negative_prompt_embeds=emb[1], num_inference_steps=1, height=64, width=64)
    ghm = trc.compute_global_heat_map()
    with pytest.raises(daami2i.QueryError, match="prompt_embeds"):
        ghm.compute_word_heat_map("cat")
    ghm = trc.compute_global_heat_map(prompt="a red cat")
    assert torch.equal(ghm.compute_word_heat_map("cat").value, ghm.token_maps[3])


def test_plot_overlay_uses_callers_axes(ghm):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    out_fig, out_ax = ghm.compute_word_heat_map("cat").plot_overlay(torch.zeros(64, 64, 3).numpy(), ax=ax)
    assert out_fig is fig and out_ax is ax and ax.get_title() == "cat"
    assert len(ax.images) == 2

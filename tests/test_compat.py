"""Code written for daam-i2i 0.2 and DAAM 0.2.0 runs here with their meaning (issue 15).

Each reference below applies the predecessor's documented method literally to the probabilities
recorded by :mod:`reference` (never to daami2i's stores): daam-i2i locates ``attn1`` of the up, then
the down blocks, keeps one time-summed (N x N) map per (layer, batch x head) entry of both guidance
halves at the highest resolution, and averages the selected entries; DAAM does the same on ``attn2``
with the conditional half only, each map upsampled bicubically to the grid and clamped at 0.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import daami2i
from daami2i import GlobalHeatMap, PixelHeatMap, QueryError, WordHeatMap
from daami2i.errors import ConfigError
from reference import recording

PROMPT = "a red cat on a blue chair"
H_IMG, W_IMG = 64, 96  # a non-square image: daam-i2i's row-major ids on an 8 x 12 grid


def located(unet, attn: str) -> list[tuple[str, str]]:
    """The predecessors' locator: (label, module name) of ``attn`` in every transformer block of the
    CrossAttn up blocks, then down blocks; labels restart per block, as daam-i2i writes them."""
    names = {id(m): n for n, m in unet.named_modules()}
    out = []
    for kind, blocks in (("up", unet.up_blocks), ("down", unet.down_blocks)):
        for block in blocks:
            if "CrossAttn" not in type(block).__name__:
                continue
            mods = [getattr(tb, attn) for st in block.attentions for tb in st.transformer_blocks]
            out += [(f"{kind}-attn-{i}", names[id(m)]) for i, m in enumerate(mods)]
    return out


@pytest.fixture(scope="module")
def both(sd2):
    """One generation traced daam-i2i's way (both halves, every head kept) and recorded densely."""
    with recording(sd2.unet) as book:
        with daami2i.trace(sd2, halves="both", keep_heads=True) as trc:
            out = sd2(PROMPT, num_inference_steps=3, height=H_IMG, width=W_IMG)
    return trc, book, out.images[0]


@pytest.fixture(scope="module")
def cond(sd2):
    """The same prompt traced with the defaults (conditional half), recorded densely."""
    with recording(sd2.unet) as book:
        with daami2i.trace(sd2) as trc:
            out = sd2(PROMPT, num_inference_steps=3, height=H_IMG, width=W_IMG)
    return trc, book, out.images[0]


def daam_i2i_entries(trc, book):
    """daam-i2i's raw collection: layer_idx -> (2 * heads, N, N) time sums [entry, query, key], for the
    located attn1 layers whose keys are the highest-resolution grid."""
    gh, gw = trc.last_generation.grid_size
    out = {}
    for idx, (_, name) in enumerate(located(trc.unet, "attn1")):
        calls = book[name]
        if calls[0].shape[-1] != gh * gw:
            continue
        out[idx] = sum(p.reshape(-1, gh * gw, gh * gw) for p in calls)  # batch-major: b * heads + h
    return out


def daam_i2i_heat_maps(entries, grid, head_idx=None, layer_idx=None, normalize=False):
    """daam-i2i's compute_global_heat_map(...).heat_maps: (K, h, w), map k = column k of the mean."""
    sel = [
        e[bh]
        for idx, e in entries.items()
        if layer_idx is None or idx == layer_idx
        for bh in range(e.shape[0])
        if head_idx is None or bh == head_idx
    ]
    g = torch.stack(sel).mean(0)  # [query, key]
    maps = g.T.reshape(-1, *grid)  # maps[k][query] = g[query, k]
    if normalize:
        maps = maps / (maps.sum(0, keepdim=True) + 1e-6)
    return maps


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal to float32 summation error: a few ulps of the largest value, times the terms summed."""
    return bool((ours - ref).abs().max() <= rel * ref.abs().max())


# -- signatures ------------------------------------------------------------------------------------
def test_signatures_take_the_predecessors_parameters():
    """Every parameter name and default of the predecessors' public calls is accepted as they spell it."""
    wanted = {
        daami2i.Trace.__init__: ["pipe", "low_memory", "load_heads", "save_heads", "data_dir", "track_all"],
        daami2i.Trace.to_experiment: ["path", "seed", "id", "subtype"],
        GlobalHeatMap.compute_pixel_diffused_heat_map: [
            "latent_pixel_id",
            "method",
            "n_iter",
            "thresh",
            "plot_intermediate",
        ],
        GlobalHeatMap.compute_diffused_heat_map: ["method", "n_iter", "thresh"],
        GlobalHeatMap.compute_contour_heat_map: ["pts", "image_h", "image_w", "guide_heatmap"],
        GlobalHeatMap.compute_segmentation_heat_map: ["segments", "image_h", "image_w", "guide_heatmap"],
        GlobalHeatMap.compute_pixel_heat_map: ["latent_pixels"],
        GlobalHeatMap.compute_bbox_heat_map: ["x1", "y1", "x2", "y2"],
        GlobalHeatMap.compute_guided_heat_map: ["guide_heatmap"],
        PixelHeatMap.compute_ioa: ["other"],
        PixelHeatMap.plot_overlay: ["image"],
        GlobalHeatMap.compute_word_heat_map: ["word", "word_idx", "offset_idx"],
        WordHeatMap.expand_as: ["image", "absolute", "threshold", "plot"],
        WordHeatMap.plot_overlay: ["image", "out_file", "color_normalize", "ax"],
        GlobalHeatMap.inner_pixel_ids: ["pts", "image_h", "image_w"],
    }
    for fn, names in wanted.items():
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert params[: len(names)] == names, (fn.__qualname__, params)
    sig = inspect.signature(GlobalHeatMap.compute_pixel_diffused_heat_map).parameters
    assert (sig["method"].default, sig["n_iter"].default, sig["thresh"].default) == ("thresholding", 20, 0.02)
    kw = inspect.signature(daami2i.Trace.compute_global_heat_map).parameters
    assert {"prompt", "factors", "head_idx", "layer_idx", "normalize"} <= set(kw)
    assert daami2i.DiffusionHeatMapHooker is daami2i.trace is daami2i.Trace


# -- compute_global_heat_map: both positional forms, heads, layers, normalize -----------------------
def test_positional_forms(both):
    trc, book, _ = both
    plain = trc.compute_global_heat_map().heat_maps
    assert torch.equal(trc.compute_global_heat_map([1], None, None).heat_maps, plain)  # daam-i2i's notebook
    assert torch.equal(trc.compute_global_heat_map(factors=[1], head_idx=None, layer_idx=None).heat_maps, plain)
    daam = trc.compute_global_heat_map(PROMPT, [1])  # DAAM: (prompt, factors)
    assert daam.prompt == PROMPT and torch.equal(daam.heat_maps, plain)
    with pytest.raises(TypeError, match="multiple values for argument 'factors'"):
        trc.compute_global_heat_map([1], factors=[1])
    with pytest.raises(TypeError, match="at most 4 positional"):
        trc.compute_global_heat_map([1], None, None, False, 3)
    with pytest.raises(QueryError, match="head_idx must be None or a non-negative integer"):
        trc.compute_global_heat_map([1], -1)


def test_head_and_layer_select_what_daam_i2i_selects(both):
    trc, book, _ = both
    grid = trc.last_generation.grid_size
    entries = daam_i2i_entries(trc, book)
    assert len(entries) >= 2  # several layers at the highest resolution: layer_idx has a choice
    heads2 = next(iter(entries.values())).shape[0]
    layer = max(entries)
    cases = [(None, None), (0, None), (heads2 - 1, None), (None, layer), (1, layer), (None, min(entries))]
    for head_idx, layer_idx in cases:
        ref = daam_i2i_heat_maps(entries, grid, head_idx, layer_idx)
        ghm = trc.compute_global_heat_map([1], head_idx, layer_idx)
        assert close(ghm.heat_maps, ref), (head_idx, layer_idx)
        ids = [3, 4, 17]
        assert close(ghm.compute_pixel_heat_map(ids).value, ref[ids].mean(0)), (head_idx, layer_idx)
    # a head index beyond the uncond + cond heads, or a located layer not at the highest resolution
    with pytest.raises(QueryError, match="no heat maps found"):
        trc.compute_global_heat_map([1], heads2, None).compute_pixel_heat_map(0)
    coarse = next(i for i, (_, n) in enumerate(located(trc.unet, "attn1")) if i not in entries)
    with pytest.raises(QueryError, match="no heat maps found .* factor 2"):  # daam-i2i raises too
        trc.compute_global_heat_map([1], None, coarse)
    words_only = trc.compute_global_heat_map(layer_idx=coarse)  # that block's word maps, at every factor
    words_only.compute_word_heat_map("cat")
    with pytest.raises(QueryError, match="no self-attention was captured for"):
        words_only.compute_pixel_heat_map(0)
    with pytest.raises(QueryError, match=r"layer_idx must be in \[0, "):
        trc.compute_global_heat_map([1], None, 99)


def test_normalize_divides_by_the_row_sums(both):
    trc, book, _ = both
    grid = trc.last_generation.grid_size
    entries = daam_i2i_entries(trc, book)
    ref = daam_i2i_heat_maps(entries, grid, normalize=True)
    ours = trc.compute_global_heat_map([1], None, None, True).heat_maps
    assert close(ours, ref)
    raw = daam_i2i_heat_maps(entries, grid)
    assert not close(ours, raw)  # it did divide (rows of summed attention sum to the step count)


def test_heads_need_keep_heads(cond):
    trc, _, _ = cond
    ghm = trc.compute_global_heat_map(PROMPT, head_idx=0)  # DAAM's use: word maps of one head
    ghm.compute_word_heat_map("cat")
    with pytest.raises(QueryError, match="keep_heads=True"):
        ghm.compute_pixel_heat_map(0)


def daam_words(trc, book, head_idx=None, layer_idx=None, normalize=False):
    """DAAM's compute_global_heat_map(prompt, head_idx=..., layer_idx=..., normalize=...).heat_maps."""
    gen = trc.last_generation
    grid, (lh, lw) = gen.grid_size, gen.latent_size
    merges = []
    for idx, (_, name) in enumerate(located(trc.unet, "attn2")):
        probs = sum(p[gen.n_images :] for p in book[name])[0]  # conditional half: (heads, N, 77)
        factor = int((lh * lw // probs.shape[1]) ** 0.5)
        if factor == 8 or (layer_idx is not None and idx != layer_idx):
            continue
        h, w = lh // factor, lw // factor
        for head, m in enumerate(probs):
            if head_idx is None or head == head_idx:
                up = F.interpolate(m.T.reshape(77, 1, h, w), size=grid, mode="bicubic", align_corners=False)
                merges.append(up.clamp_(min=0))
    maps = torch.stack(merges).mean(0)[:, 0]
    n_tok = len(trc.pipe.tokenizer.tokenize(PROMPT))
    maps = maps[: n_tok + 2]
    if normalize:
        maps = maps / (maps[1:-1].sum(0, keepdim=True) + 1e-6)
    return maps


def test_daam_head_layer_and_normalize_for_words(cond):
    trc, book, _ = cond
    words = located(trc.unet, "attn2")
    rows = {"cat": [3], "chair": [7]}
    for head_idx, layer_idx, normalize in [(None, None, True), (1, None, False), (None, 1, False), (0, 0, True)]:
        ref = daam_words(trc, book, head_idx, layer_idx, normalize)
        ghm = trc.compute_global_heat_map(PROMPT, None, head_idx, layer_idx, normalize)
        for word, r in rows.items():
            ours = ghm.compute_word_heat_map(word).value
            assert close(ours, ref[r].mean(0), 1e-5), (word, head_idx, layer_idx, normalize)
    assert len(words) > 1


# -- daam-i2i's diffusion: absolute thresh, every pixel -------------------------------------------
def diffused_reference(heat_maps: torch.Tensor, start: torch.Tensor, n_iter: int, thresh: float, ours_at=None):
    """daam-i2i, literally: ``m = cut(start)``; ``n_iter`` times ``m = cut(sum_k (m_k / sum m) heat_maps[k])``,
    ``cut`` zeroing values below ``min(map) + thresh``. ``start`` is (h, w) or a batch (B, h, w).

    A cut is where float rounding matters: a value within rounding of ``min + thresh`` falls on either
    side depending on the summation order. With ``ours_at(k)`` (our maps after round k), each round
    measures our error ``d`` on the values both keep; a value moves by at most ``d`` and the minimum
    too, so values farther than ``2 d`` (+ a few ulps) from the cut are cut by the reference alone and
    ours must agree; for the ``near`` ones the reference takes our decision. Returns the rounds and
    ``near / values``."""
    k, h, w = heat_maps.shape
    flat = heat_maps.reshape(k, h * w).double()
    m = start.double()
    rounds, near, total = [], 0, 0
    for r in range(n_iter + 1):
        if r:
            g = rounds[-1].reshape(-1, h * w)
            m = ((g / g.sum(1, keepdim=True)) @ flat).reshape(start.shape)
        edge = m.amin(dim=(-2, -1), keepdim=True) + thresh
        keep = m >= edge
        if ours_at is not None:
            ours = ours_at(r).double()
            both = keep & (ours != 0)
            d = float((ours - m).abs()[both].max()) if bool(both.any()) else 0.0
            band = 2 * d + 1e-6 * float(m.abs().max())
            close = (m - edge).abs() <= band
            assert torch.equal((ours != 0)[~close], keep[~close]), f"round {r}: a cut beyond the rounding band differs"
            keep = torch.where(close, ours != 0, keep)
            near += int(close.sum())
        total += m.numel()
        assert bool(keep.flatten(-2).any(-1).all()), f"round {r}: thresh {thresh:g} empties a map"
        rounds.append(torch.where(keep, m, torch.zeros_like(m)))
    return rounds, near / total


def test_pixel_and_every_pixel_diffusion_equal_daam_i2i(both):
    trc, book, _ = both
    grid = trc.last_generation.grid_size
    ref_maps = daam_i2i_heat_maps(daam_i2i_entries(trc, book), grid)
    ghm = trc.compute_global_heat_map([1], None, None)
    n_iter = 3
    # guided rounds are much flatter than pixel maps: cut at a share of the flattest round's spread
    flat_rounds, _ = diffused_reference(ref_maps, ref_maps, n_iter, 0.0)
    thresh = 0.3 * min(float((r.amax(dim=(-2, -1)) - r.amin(dim=(-2, -1))).min()) for r in flat_rounds)
    # one region, every round (daam-i2i's plot_intermediate pictures)
    ours = ghm.compute_pixel_diffused_heat_map([5, 6], "thresholding", n_iter, thresh)
    assert len(ours.intermediates) == n_iter + 1
    rounds, near = diffused_reference(
        ref_maps, ref_maps[[5, 6]].mean(0), n_iter, thresh, ours.intermediates.__getitem__
    )
    assert near < 0.02
    for r_ours, r_ref in zip(ours.intermediates, rounds, strict=True):
        assert close(r_ours, r_ref.float(), 1e-5)
    cut_share = float(torch.stack([(r == 0).float().mean() for r in rounds]).mean())
    assert 0.01 < cut_share < 0.99  # the cuts did something, and left something
    # every pixel: a GlobalHeatMap whose pixel p map is pixel p's diffused map (the TITAN notebook's call)
    runs = [ghm.compute_diffused_heat_map("thresholding", r, thresh) for r in range(n_iter + 1)]
    every, near = diffused_reference(ref_maps, ref_maps, n_iter, thresh, lambda r: runs[r].heat_maps)
    assert near < 0.02
    diffused = runs[-1]
    assert isinstance(diffused, GlobalHeatMap)
    assert close(diffused.heat_maps, every[-1].float(), 1e-5)
    # its queries combine diffused maps; its word maps are the original ones
    assert close(diffused.compute_pixel_heat_map([2, 9]).value, every[-1][[2, 9]].mean(0).float(), 1e-5)
    assert torch.equal(diffused.compute_word_heat_map("cat").value, ghm.compute_word_heat_map("cat").value)
    # the per-pixel call is daam-i2i's too (each path checked against the reference with its own cuts)
    one = ghm.compute_pixel_diffused_heat_map(9, n_iter=n_iter, thresh=thresh)
    alone, _ = diffused_reference(ref_maps, ref_maps[9], n_iter, thresh, one.intermediates.__getitem__)
    assert close(one.value, alone[-1].float(), 1e-5)


def test_diffusion_refuses_a_thresh_that_empties_a_map(both):
    trc, _, _ = both
    ghm = trc.compute_global_heat_map()
    with pytest.raises(QueryError, match="thresh=5 cuts every value"):
        ghm.compute_pixel_diffused_heat_map(0, thresh=5.0)
    with pytest.raises(QueryError, match="cuts every value of the map of pixel"):
        ghm.compute_diffused_heat_map("thresholding", 2, 5.0)
    with pytest.raises(QueryError, match="method must be 'thresholding'"):
        ghm.compute_diffused_heat_map("gaussian")
    with pytest.raises(QueryError, match="n_iter must be a non-negative integer"):
        ghm.compute_pixel_diffused_heat_map(0, n_iter=2.5)
    with pytest.raises(QueryError, match="thresh must be a finite number >= 0"):
        ghm.compute_pixel_diffused_heat_map(0, thresh=float("nan"))


def test_earlier_spelling_still_works_with_a_warning(both):
    trc, _, _ = both
    ghm = trc.compute_global_heat_map()
    guide = ghm.compute_word_heat_map("cat")
    grown = ghm.compute_grown_heat_map(guide, 3, 0.3).value
    pixel = ghm.compute_pixel_grown_heat_map([4], 3, 0.3).value
    calls = [
        (lambda: ghm.compute_diffused_heat_map(guide, iterations=3, threshold=0.3), grown, "compute_grown_heat_map"),
        (lambda: ghm.compute_diffused_heat_map(guide, 3, 0.3), grown, "compute_grown_heat_map"),
        (lambda: ghm.compute_pixel_diffused_heat_map([4], 3, 0.3), pixel, "compute_pixel_grown_heat_map"),
        (
            lambda: ghm.compute_pixel_diffused_heat_map([4], iterations=3, threshold=0.3),
            pixel,
            "compute_pixel_grown_heat_map",
        ),
    ]
    for call, expected, new_name in calls:
        with pytest.warns(DeprecationWarning, match=new_name):
            assert torch.equal(call().value, expected)
    default = ghm.compute_grown_heat_map(guide).value  # the earlier defaults (20 iterations, 0.4) are kept
    with pytest.warns(DeprecationWarning):
        assert torch.equal(ghm.compute_diffused_heat_map(guide).value, default)
    with pytest.warns(DeprecationWarning, match="compute_all_grown_heat_maps"):
        assert torch.equal(ghm.compute_all_diffused_heat_maps(2, 0.4), ghm.compute_all_grown_heat_maps(2, 0.4))


# -- the tracer's attributes and options ---------------------------------------------------------
def test_tracer_attributes(sd2):
    trc = daami2i.trace(sd2)
    assert trc.last_prompt == "" and trc.last_image is None
    assert trc.latent_hw == 64 * 64  # the tiny SD-2-base layout: 512 px, a 64 x 64 latent
    assert list(trc.layer_names) == [label for label, _ in located(sd2.unet, "attn1")]
    with pytest.warns(DeprecationWarning, match="attention_layers"):
        assert dict(trc.layer_names.items()) == trc.attention_layers
    originals = dict(sd2.unet.attn_processors)
    trc.hook()
    try:
        out = sd2(PROMPT, num_inference_steps=2, height=H_IMG, width=W_IMG, callback_on_step_end=None)
        trc.time_callback(0, 1, None)
    finally:
        trc.unhook()
    assert {k: type(v) for k, v in sd2.unet.attn_processors.items()} == {k: type(v) for k, v in originals.items()}
    assert trc.last_prompt == PROMPT
    assert trc.last_image is out.images[-1]
    assert trc.latent_hw == (H_IMG // 8) * (W_IMG // 8)
    assert trc.time_idx == 1
    trc.compute_global_heat_map().compute_word_heat_map("cat")  # maps stay after unhook


def test_tracer_options(sd2):
    full = {s.name for s in daami2i.trace(sd2, self_factors="all").selected if s.kind == "self"}
    low = daami2i.trace(sd2, True, self_factors="all")  # daam-i2i: low_memory, first transformer per block
    first = {n for _, n in located(sd2.unet, "attn1") if ".attentions.0.transformer_blocks.0." in n}
    assert {s.name for s in low.selected if s.kind == "self"} == first < full
    every = daami2i.trace(sd2, track_all=True)
    assert {s.name for s in every.selected if s.kind == "self"} == full
    with pytest.raises(ConfigError, match="to_experiment"):
        daami2i.trace(sd2, False, True)
    with pytest.raises(ConfigError, match="to_experiment"):
        daami2i.trace(sd2, save_heads=True)
    with pytest.warns(UserWarning, match="data_dir='heads' is ignored"):
        daami2i.trace(sd2, data_dir="heads")
    with pytest.raises(ConfigError, match="contradicts"):
        daami2i.trace(sd2, track_all=True, self_factors=(1,))


def test_to_experiment_takes_daams_arguments(cond, tmp_path):
    trc, _, _ = cond
    folder = trc.to_experiment(tmp_path, 7, "gen-1", "a")  # DAAM: (path, seed, id, subtype)
    assert folder == tmp_path / "gen-1" / "a"
    exp = daami2i.load_experiment(folder)
    assert exp.manifest["info"]["seed"] == 7
    with pytest.raises(ConfigError, match="relative folder name"):
        trc.to_experiment(tmp_path, 7, "../outside")
    # the saved experiment answers the predecessors' positional forms as the live trace does
    live, saved = trc.compute_global_heat_map([1], None, None), exp.compute_global_heat_map([1], None, None)
    assert torch.equal(live.compute_pixel_heat_map([3]).value, saved.compute_pixel_heat_map([3]).value)
    live = trc.compute_global_heat_map(PROMPT, None, None, None, True).compute_word_heat_map("cat").value
    assert torch.equal(
        live, exp.compute_global_heat_map(PROMPT, None, None, None, True).compute_word_heat_map("cat").value
    )
    with pytest.raises(QueryError, match="need the live trace"):
        exp.compute_global_heat_map(PROMPT, head_idx=0)


# -- heat-map objects ------------------------------------------------------------------------------
def test_global_heat_map_from_the_predecessors_tensors(sd2):
    maps = torch.rand(12, 3, 4)  # daam-i2i: one map per pixel of a 3 x 4 grid
    ghm = GlobalHeatMap(maps, 12)
    assert (ghm.latent_h, ghm.latent_w, ghm.scale_factor) == (3, 4, 1)
    assert ghm.scale_correction([0, 5, 11]) == [0, 5, 11]
    assert torch.equal(ghm.heat_maps, maps)
    assert torch.allclose(ghm.compute_pixel_heat_map([1, 7]).value, maps[[1, 7]].mean(0))
    assert torch.allclose(ghm.compute_bbox_heat_map(1, 0, 2, 1).value, maps[[1, 2, 5, 6]].mean(0))
    guide = torch.rand(3, 4)
    w = guide.flatten() / guide.sum()
    assert torch.allclose(ghm.compute_guided_heat_map(guide).value, (maps * w[:, None, None]).sum(0), atol=1e-6)
    with pytest.raises(QueryError, match="need latent_hw = 12"):
        GlobalHeatMap(maps, 16)
    tok = sd2.tokenizer  # DAAM: GlobalHeatMap(tokenizer, prompt, heat_maps (tokens, h, w))
    words = torch.rand(9, 4, 4)
    daam = GlobalHeatMap(tok, "a red cat", words)
    assert torch.allclose(daam.compute_word_heat_map("cat").value, words[3])


def test_contours_as_flat_lists_and_inner_pixel_ids(both):
    cv2 = pytest.importorskip("cv2")
    trc, _, _ = both
    ghm = trc.compute_global_heat_map()
    nested = [[0, 10], [60, 4], [90, 40], [20, 60]]
    flat = [v for p in nested for v in p]
    assert torch.equal(
        ghm.compute_contour_heat_map(flat, H_IMG, W_IMG).value, ghm.compute_contour_heat_map(nested, H_IMG, W_IMG).value
    )
    seg = ghm.compute_segmentation_heat_map([flat, [70, 0, 95, 0, 95, 20]], H_IMG, W_IMG)
    assert seg.region["contours"][0] == [[float(x), float(y)] for x, y in nested]
    # daam-i2i's rule, literally: points scaled and truncated, latent (column, row) strictly inside
    h, w = ghm.grid_size
    pts = np.array([[x * w / W_IMG, y * h / H_IMG] for x, y in nested], np.int32).reshape(-1, 1, 2)
    ref = sorted(j * w + i for i in range(w) for j in range(h) if cv2.pointPolygonTest(pts, (i, j), False) == 1)
    assert sorted(ghm.inner_pixel_ids(flat, H_IMG, W_IMG)) == ref and ref


def test_plots_and_ioa(both, tmp_path):
    import matplotlib.pyplot as plt

    trc, _, image = both
    ghm = trc.compute_global_heat_map()
    pix = ghm.compute_pixel_heat_map([3])
    assert isinstance(pix, PixelHeatMap)
    try:
        fig, _ = pix.plot_overlay(image, (10, 10))  # daam-i2i: plot_overlay(image, figsize)
        assert tuple(fig.get_size_inches()) == (10, 10)
        word = ghm.compute_word_heat_map("cat")
        out = tmp_path / "cat.png"
        fig, ax = word.plot_overlay(image, out_file=out, color_normalize=False, ax=None)  # DAAM
        assert out.stat().st_size > 0 and ax.images[-1].get_clim() == (0.0, 1.0)
        _, ax = word.plot_overlay(image, None, True, None)
        im = ax.images[-1]
        assert im.get_clim() == (float(im.get_array().min()), float(im.get_array().max()))
        before = len(plt.get_fignums())
        assert torch.equal(word.expand_as(image, plot=True), word.expand_as(image))  # DAAM: also draws it
        assert len(plt.get_fignums()) == before + 1
        masked = daami2i.plot_mask_heat_map(image, word.expand_as(image), threshold=0.4)
        keep = (word.expand_as(image) > 0.4).numpy()
        assert np.allclose(masked[keep], np.asarray(image, np.float32)[keep] / 255) and (masked[~keep] == 0).all()
    finally:
        plt.close("all")
    # IoA on PixelHeatMap (daam-i2i) equals DAAM's formula
    other = ghm.compute_pixel_heat_map([40])
    ref = float((pix.value * other.value).sum() / (pix.value.sum() + 1e-8))
    assert pix.compute_ioa(other) == pytest.approx(ref, rel=1e-6)


def test_set_seed_returns_a_seeded_generator():
    a = daami2i.set_seed(123)
    x = torch.rand(3, generator=a)
    b = daami2i.set_seed(123)
    assert torch.equal(torch.rand(3, generator=b), x)
    assert torch.equal(torch.rand(2), (daami2i.set_seed(123), torch.rand(2))[1])  # the global one too
    for bad in (-1, 2**64, 1.5, "0", True):
        with pytest.raises(QueryError, match="seed must be an integer"):
            daami2i.set_seed(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert daami2i.auto_device(torch.device("cpu")).type in ("cpu", "cuda")
        with daami2i.auto_autocast(dtype=torch.float16):
            pass
    assert daami2i.cache_dir().name == "daam"

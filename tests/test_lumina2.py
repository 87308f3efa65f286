"""Lumina 2: a single-stream transformer whose joint layers see [valid caption tokens, image] per item
(zero-padded at the end when the items differ), an image-only noise refiner and a text-only context
refiner. Every query equals a dense reference built from probabilities recorded by explicit attention
(the layer's own projections and norms, the rotary formula written out, grouped key heads repeated)
in a separate, identical run; guidance is two calls per step (prompt, then negative prompt) that are
never averaged; the labels are the ids the Gemma encoder received after the system prompt."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_lumina2_pipeline
from reference import check_region_queries, column_query, diffused_reference

SIZE = dict(height=128, width=192)  # latent 16x24, an 8x12 grid of 2x2 patches
GRID = (8, 12)
N = 96


@pytest.fixture(scope="module")
def pipe():
    return tiny_lumina2_pipeline()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-5 and err <= 1e-4 * max(scale, 1e-12) + 1e-9, f"max error {err:.3g} (map max {scale:.3g})"


# -- the reference: explicit attention of every Lumina 2 layer call ------------------------------------
class LuminaRecorder:
    """Records the full probabilities (B, heads, S, S) and the key mask of every call, computed in
    float64 from the layer's projections and QK norms, the rotary formula (each pair of channels
    rotated by the angle of its complex frequency) and the key heads repeated for the query heads
    that share them; the original processor then computes the layer's output."""

    def __init__(self, name: str, book: dict, original):
        self.name, self.book, self.original = name, book, original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
        base_sequence_length=None,
    ):  # fmt: skip
        with torch.no_grad():
            b, s, _ = hidden_states.shape
            q, k = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
            d = q.shape[-1] // attn.heads
            q = attn.norm_q(q.view(b, s, attn.heads, d)).double()
            k = attn.norm_k(k.view(b, s, -1, d)).double()
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb.real.double()[:, :, None], image_rotary_emb.imag.double()[:, :, None]
                for x in (q, k):
                    x0, x1 = x[..., 0::2].clone(), x[..., 1::2].clone()
                    x[..., 0::2], x[..., 1::2] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
            k = k.repeat_interleave(attn.heads // k.shape[2], dim=2)  # query head h reads key head h // rep
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], -math.inf)
            self.book[self.name].append((torch.softmax(scores, dim=-1), attention_mask))
        return self.original(
            attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb, base_sequence_length=base_sequence_length,
        )  # fmt: skip


def attention_modules(transformer):
    return {n: m for n, m in transformer.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_q")}


@contextmanager
def recording(transformer):
    """{layer: [(probs, mask) per call]} for every noise-refiner and joint layer, in call order."""
    book: dict = defaultdict(list)
    mods = attention_modules(transformer)
    originals = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        if not n.startswith("context_refiner."):
            m.set_processor(LuminaRecorder(n, book, originals[n]))
    try:
        yield book
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


@contextmanager
def encoder_ids(pipe):
    """The input ids the text encoder receives, one (B, L) tensor per call."""
    seen: list[torch.Tensor] = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def call(pipe, prompt, **kw):
    kw = {**SIZE, "num_inference_steps": 2, **kw}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    """(trace, recorded calls, ids the encoder received in the traced run)."""
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer) as book:
        recorded = call(pipe, prompt, **kw)
    with encoder_ids(pipe) as ids, daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book), ids


def dense(trc, book, item, calls):
    """(self N x N, token maps (T, h, w) over the caption's positions) of batch ``item`` from the
    recorded ``calls`` (indices per layer), for the layers the trace selected; T is the caption
    length of the first call used (the prompt's pass)."""
    self_names = [s.name for s in trc.sites if s.name in trc._self_names]
    cross_names = [s.name for s in trc.sites if s.name in trc._cross_names]
    total_self = torch.zeros(N, N, dtype=torch.float64)
    token_maps = []
    for name in dict.fromkeys(self_names + cross_names):
        acc_self, acc_text, width = 0, 0, None
        for i, (p, mask) in enumerate(book[name]):
            if i not in calls:
                continue
            s = p.shape[-1]
            length = (s - N) if mask is None else int(mask[item].sum()) - N  # valid caption tokens
            img = slice(length, length + N)
            p = p[item].mean(0)  # (S, S), head mean
            acc_self = acc_self + p[img, img]
            if s > N:
                width = length if width is None else width
                text = torch.zeros(N, width, dtype=torch.float64)
                text[:, : min(width, length)] = p[img, : min(width, length)]  # a shorter caption: no such key
                acc_text = acc_text + text
        if name in self_names:
            total_self += acc_self
        if name in cross_names:
            token_maps.append(acc_text.T.reshape(-1, *GRID))
    maps = torch.stack(token_maps).mean(0).float() if token_maps else None
    return (total_self / len(self_names)).float(), maps


def prompt_start(pipe) -> int:
    """The encoder position of the prompt's first token: after <bos>, the system prompt and the marker."""
    return len(pipe.tokenizer(pipe.system_prompt + " <Prompt Start>").input_ids)


def word_rows(pipe, ids_row: list[int], word: str) -> list[int]:
    """Encoder positions of ``word``'s pieces among the prompt's tokens (after the system prompt)."""
    toks = pipe.tokenizer.convert_ids_to_tokens(ids_row)
    pieces = pipe.tokenizer.tokenize(" " + word)
    start, n = prompt_start(pipe), len(pieces)
    return [i + j for i in range(start, len(toks) - n + 1) if toks[i : i + n] == pieces for j in range(n)]


def check_queries(pipe, trc, self_ref, maps_ref, image_idx, ids_row, word):
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    check_region_queries(ghm, self_ref, GRID, trc.last_generation.image_size, assert_close)
    if maps_ref is None:
        return ghm
    rows = word_rows(pipe, ids_row, word)
    assert rows
    word_ref = maps_ref[rows].mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, GRID))
    ours_at = lambda k: ghm.compute_grown_heat_map(wm, iterations=k, threshold=0.4).value  # noqa: E731
    query = lambda g: column_query(self_ref, g, GRID)  # noqa: E731
    m, near, cut = diffused_reference(query, word_ref, 3, 0.4, assert_close, ours_at)
    assert_close(ours_at(3), m)
    assert near <= 0.02 * cut, (near, cut)
    return ghm


# -- tests -------------------------------------------------------------------------------------------
def test_sites_and_geometry(pipe):
    trc = daami2i.trace(pipe)
    layers = trc.attention_layers
    assert layers == {
        "noise_refiner.0.attn": ("self", 1),
        "layers.0.attn": ("joint", 1),
        "layers.1.attn": ("joint", 1),
    }  # the text-only context refiner has no image token: not a site
    assert trc.adapter.name == "lumina2" and trc.layer_names == ["layers.0.attn", "layers.1.attn"]
    assert trc.latent_hw == 64  # the default 128 px image: a 16x16 latent, 8x8 patches


def test_every_query_matches_the_recorded_attention(pipe):
    """Guidance on (two calls per step): the prompt's calls, 0 and 2 of each layer, are the maps."""
    prompt = "superior images of a red cat"  # "superior" and "images" are in the system prompt too
    trc, book, ids = run(pipe, prompt)
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.latent_size == (16, 24) and gen.image_size == (128, 192)
    assert gen.n_images == 1 and not gen.cfg and gen.steps_captured == [0, 1] and gen.steps_run == 2
    assert len(book["layers.0.attn"]) == 4 and len(book["noise_refiner.0.attn"]) == 4  # 2 steps x 2 passes
    self_ref, maps_ref = dense(trc, book, 0, {0, 2})
    ghm = check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0].tolist(), "cat")
    assert ghm.words == ["superior", "images", "of", "a", "red", "cat"]
    for word in ("superior", "images", "a"):  # the prompt's occurrence, not the system prompt's
        rows = word_rows(pipe, ids[0][0].tolist(), word)
        assert min(rows) >= prompt_start(pipe)
        assert_close(ghm.compute_word_heat_map(word).value, maps_ref[rows].mean(0))
    system = [i for i, t in enumerate(pipe.tokenizer.convert_ids_to_tokens(ids[0][0])) if t == "▁images"][0]
    assert not torch.allclose(ghm.compute_word_heat_map("images").value, maps_ref[system], atol=1e-4)
    # word maps are text columns of the joint softmax over [caption, image]: a query's text mass is partial
    p, _ = book["layers.0.attn"][0]
    length = p.shape[-1] - N
    mass = p[0][:, length:, :length].sum(-1)
    assert 0.01 < mass.mean().item() < 0.99


def test_labels_are_the_ids_the_encoder_received(pipe):
    prompt = "a red cat"
    trc, book, ids = run(pipe, prompt)
    gen = trc.last_generation
    (stream,) = gen.streams
    received = ids[0][0].tolist()  # the prompt's call: system prompt, marker, prompt, padding
    cols = trc._text_columns.tolist()
    toks = stream["tokens"][0]
    assert toks == pipe.tokenizer.convert_ids_to_tokens([received[c] for c in cols[: len(toks)]])
    assert cols[0] == prompt_start(pipe) and toks == ["▁a", "▁red", "▁cat"]
    # the one column after the prompt is the first padding position: a cut key, exactly zero, no label
    assert received[cols[len(toks)]] == pipe.tokenizer.pad_token_id
    sums = gen.cross_attention["layers.0.attn"].sums
    assert sums.shape == (1, 1, N, len(toks) + 1) and bool((sums[..., len(toks)] == 0).all())
    assert bool((sums[..., : len(toks)] > 0).all())
    assert trc.compute_global_heat_map().words == ["a", "red", "cat"]


def test_batch_of_different_lengths_is_masked_per_item(pipe):
    """Two prompts of different lengths: the joint sequences are padded to the longer one with a key
    mask, and each item's image starts after its own caption."""
    prompts = ["a red cat", "a blue dog sitting on a green chair"]
    trc, book, ids = run(pipe, prompts, guidance_scale=1.0)
    gen = trc.last_generation
    assert gen.n_images == 2 and gen.steps_captured == [0, 1]
    p, mask = book["layers.0.attn"][0]
    assert mask is not None and int(mask[0].sum()) < int(mask[1].sum())  # the items really differ
    for i, word in enumerate(["cat", "dog"]):
        self_ref, maps_ref = dense(trc, book, i, {0, 1})
        check_queries(pipe, trc, self_ref, maps_ref, i, ids[0][i].tolist(), word)


def test_images_per_prompt(pipe):
    trc, book, ids = run(pipe, "a red cat", num_images_per_prompt=2, guidance_scale=1.0)
    assert trc.last_generation.n_images == 2
    for i in range(2):
        self_ref, maps_ref = dense(trc, book, i, {0, 1})
        check_queries(pipe, trc, self_ref, maps_ref, i, ids[0][0].tolist(), "red")  # encoded once, repeated


@pytest.mark.parametrize("halves", ["uncond", "both"])
def test_guidance_passes(pipe, halves):
    """The negative prompt's calls (1 and 3) are the uncond half; "both" averages them with the prompt's.
    The negative caption ("" after <bos>) is shorter than the prompt's columns: no such key, zero."""
    trc, book, ids = run(pipe, "a red cat", dict(halves=halves), negative_prompt="")
    gen = trc.last_generation
    assert gen.steps_captured == [0, 1] and not gen.cfg
    calls = {1, 3} if halves == "uncond" else {0, 1, 2, 3}
    self_ref, maps_ref = dense(trc, book, 0, calls)
    weight = 0.5 if halves == "both" else 1.0  # "both": the two passes' mean, as a batch's halves
    ghm = check_queries(pipe, trc, self_ref * weight, None, 0, ids[0][0].tolist(), "cat")
    neg = book["layers.0.attn"][1][0].shape[-1] - N
    assert neg < prompt_start(pipe)  # the negative pass has no key at the prompt's columns
    rows = word_rows(pipe, ids[0][0].tolist(), "cat")
    cond_maps = dense(trc, book, 0, {0, 2})[1]
    expected = torch.zeros(GRID) if halves == "uncond" else cond_maps[rows].mean(0) * weight
    assert_close(ghm.compute_word_heat_map("cat").value, expected)


def test_cond_is_the_prompt_not_the_negative_prompt(pipe):
    kw = dict(negative_prompt="a blurry photo")
    trc, book, _ = run(pipe, "a red cat", **kw)
    cond_self, _ = dense(trc, book, 0, {0, 2})
    uncond_self, _ = dense(trc, book, 0, {1, 3})
    both_self, _ = dense(trc, book, 0, {0, 1, 2, 3})
    wp = torch.zeros(N)
    wp[[3, 40]] = 1
    ours = trc.compute_global_heat_map().compute_pixel_heat_map([3, 40]).value
    assert_close(ours, column_query(cond_self, wp, GRID))
    for other in (uncond_self, both_self / 2):  # neither the negative pass nor the passes' mean
        assert not torch.allclose(ours, column_query(other, wp, GRID), atol=1e-4)


def test_cfg_truncation_and_no_guidance(pipe):
    """cfg_trunc_ratio=0.5: step 1 runs the prompt alone, a new step, not a second pass."""
    trc, book, ids = run(pipe, "a red cat", cfg_trunc_ratio=0.5)
    gen = trc.last_generation
    assert gen.steps_run == 2 and gen.steps_captured == [0, 1] and len(book["layers.0.attn"]) == 3
    self_ref, maps_ref = dense(trc, book, 0, {0, 2})
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0].tolist(), "cat")
    trc, book, ids = run(pipe, "a red cat", guidance_scale=1.0)
    assert trc.last_generation.steps_captured == [0, 1] and len(book["layers.0.attn"]) == 2
    self_ref, maps_ref = dense(trc, book, 0, {0, 1})
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0].tolist(), "cat")
    with pytest.raises(daami2i.TraceError, match="lumina2 ran step 0 without a second"):
        with daami2i.trace(pipe, halves="uncond"):
            call(pipe, "a red cat", guidance_scale=1.0)


def test_layer_and_step_selection(pipe):
    opts = dict(steps=[1, 2], self_layers=["noise_refiner.0.attn"], cross_layers=["layers.1.attn"])
    trc, book, ids = run(pipe, "a red cat", opts, num_inference_steps=3, guidance_scale=1.0)
    gen = trc.last_generation
    assert gen.steps_captured == [1, 2] and list(gen.cross_attention) == ["layers.1.attn"]
    assert gen.self_attention[1].layers == ["noise_refiner.0.attn"]
    self_ref, maps_ref = dense(trc, book, 0, {1, 2})
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0].tolist(), "cat")


def test_store_size_is_estimated(pipe):
    with daami2i.trace(pipe, max_store_mb=100) as trc:
        call(pipe, "a red cat and a blue dog")
    gen = trc.last_generation
    n_text = gen.cross_attention["layers.0.attn"].sums.shape[-1]
    assert n_text == 8  # the prompt's 7 pieces and the column after them
    est = trc.estimate_nbytes(gen.latent_size, 1, n_text)
    assert est["total"] == gen.nbytes() == N * N * 4 + 2 * N * n_text * 4
    with pytest.raises(daami2i.TraceError, match="over max_store_mb"):
        with daami2i.trace(pipe, max_store_mb=0.01):
            call(pipe, "a red cat")


def test_hooks_are_removed_also_after_an_error(pipe):
    mods = attention_modules(pipe.transformer)
    before = {n: m.processor for n, m in mods.items()}
    module = sys.modules["diffusers.models.transformers.transformer_lumina2"]
    hooks = (len(pipe.transformer._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(pipe):
            call(pipe, "a cat")
            assert type(mods["layers.0.attn"].processor).__name__ == "JointCapturingProcessor"
            assert module.F is not torch.nn.functional
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in mods.items()} == before
    assert module.F is torch.nn.functional
    assert (len(pipe.transformer._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks)) == hooks
    assert "check_inputs" not in vars(pipe) and "postprocess" not in vars(pipe.image_processor)


def test_bad_denoiser_call_is_a_trace_error(pipe):
    x = torch.zeros(1, 4, 16, 16)
    emb = torch.zeros(1, 5, 32)
    with daami2i.trace(pipe):
        with pytest.raises(daami2i.TraceError, match="encoder_attention_mask"):
            pipe.transformer(x, torch.tensor([0.5]), emb, None)
        with pytest.raises(daami2i.TraceError, match="do not match"):
            pipe.transformer(x, torch.tensor([0.5]), emb, torch.ones(1, 7, dtype=torch.bool))


def test_real_image_attribution(pipe):
    """trace_image equals the recorded attention of the same calls: the caption encoded with the
    system prompt, latents noised as (1 - s) x + s e, the transformer told 1 - s."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    trc = daami2i.trace_image(pipe, image, "a red cat", timesteps=(300, 700), draws=2, generator=g)
    gen = trc.last_generation
    assert gen.image_size == (128, 192) and gen.grid_size == GRID and gen.steps_captured == [0, 1, 2, 3]
    vae = pipe.vae
    with torch.no_grad(), recording(pipe.transformer) as book, encoder_ids(pipe) as ids:
        lat = (vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mean - vae.config.shift_factor) * (
            vae.config.scaling_factor
        )
        emb, mask, _, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
        g = torch.Generator().manual_seed(0)
        for t in (300, 700):
            for _ in range(2):
                s = t / 1000
                noisy = (1 - s) * lat + s * torch.randn(lat.shape, generator=g)
                pipe.transformer(
                    hidden_states=noisy, timestep=torch.tensor([1 - s]), encoder_hidden_states=emb,
                    encoder_attention_mask=mask,
                )  # fmt: skip
    self_ref, maps_ref = dense(trc, dict(book), 0, {0, 1, 2, 3})
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0].tolist(), "cat")


def test_experiment_round_trip(pipe, tmp_path):
    with daami2i.trace(pipe) as trc:
        call(pipe, "superior images of a red cat")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    back = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    assert back.words == ghm.words == ["superior", "images", "of", "a", "red", "cat"]
    for word in ("superior", "cat"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)


def test_cli_generate_and_show(pipe, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "96"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    ghm = exp.compute_global_heat_map()
    assert ghm.words == ["a", "red", "cat"] and ghm.grid_size == (4, 6)
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output

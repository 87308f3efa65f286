"""PixArt-Σ: a transformer with separate self- and cross-attention layers. Every query equals a dense
reference built from the probabilities recorded by explicit attention (padding mask included) in a
separate, identical run; guidance is the batch's conditional half; the prompt is looked up as the
pipeline lowercases it for T5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_pixart_pipeline
from reference import batch_rows, column_query, dense_cross, dense_self, recording, row_query

KW = dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False, height=64, width=96)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline()


def call(pipe, prompt, **kw):
    kw = {**KW, "num_inference_steps": 2, **kw}
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer, passthrough=True) as book:
        recorded = call(pipe, prompt, **kw)
    with daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()) + 1e-9, f"max error {err:.3g} (map max {float(ref.abs().max()):.3g})"


def positions(tokens, pieces):
    n = len(pieces)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n)]


def check(pipe, trc, book, image_idx, prompt, word, halves="cond"):
    gen = trc.last_generation
    grid = gen.grid_size
    rows = batch_rows(gen.n_images, gen.cfg, halves, image_idx)
    selfs = [(s.name, 1) for s in trc.sites if s.name in trc._self_names]
    cross = [(s.name, 1) for s in trc.sites if s.name in trc._cross_names]
    self_ref = dense_self(book, selfs, grid, grid, rows)
    maps = dense_cross(book, cross, grid, grid, rows)  # (all 32 T5 positions, h, w); T5 has no start token
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    n = grid[0] * grid[1]
    w = torch.zeros(n)
    w[[0, 7, n - 1]] = 1
    assert_close(ghm.compute_pixel_heat_map([0, 7, n - 1]).value, column_query(self_ref, w, grid))
    assert_close(ghm.compute_pixel_heat_map([0, 7, n - 1], direction="attends_to").value, row_query(self_ref, w, grid))
    box = torch.zeros(grid)
    box[1:4, 2:6] = 1
    assert_close(ghm.compute_bbox_heat_map(2, 1, 5, 3).value, column_query(self_ref, box, grid))
    tok = pipe.tokenizer
    rows_w = positions(tok.tokenize(prompt.lower()), tok.tokenize(word.lower()))
    assert rows_w
    word_ref = maps[rows_w].mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, grid))
    return ghm


def test_every_query_matches_the_recorded_attention(pixart):
    prompts = ["A Red cat on a chair", "a blue dog"]  # the pipeline lowercases them for T5
    trc, book = run(pixart, prompts)
    gen = trc.last_generation
    assert gen.cfg and gen.n_images == 2 and gen.grid_size == (8, 12) and gen.image_size == (64, 96)
    for i, (prompt, word) in enumerate(zip(prompts, ["Cat", "dog"], strict=True)):
        check(pixart, trc, book, i, prompt, word)
    ghm = trc.compute_global_heat_map(image_idx=0)
    assert ghm.words == ["a", "red", "cat", "on", "chair"]
    # only the prompt's T5 columns are kept (8 pieces and the end token), per layer and head
    assert next(iter(gen.cross_attention.values())).sums.shape == (2, 2, 96, 9)
    assert trc.estimate_nbytes(gen.latent_size, 2, 9)["total"] == gen.nbytes()


@pytest.mark.parametrize("halves", ["uncond", "both"])
def test_guidance_halves(pixart, halves):
    trc, book = run(pixart, "a red cat", dict(halves=halves))
    gen = trc.last_generation
    rows = batch_rows(1, True, halves, 0)
    self_ref = dense_self(book, [(s.name, 1) for s in trc.sites if s.name in trc._self_names], (8, 12), (8, 12), rows)
    w = torch.zeros(96)
    w[[5, 50]] = 1
    assert_close(
        trc.compute_global_heat_map().compute_pixel_heat_map([5, 50]).value, column_query(self_ref, w, (8, 12))
    )
    assert gen.cfg


def test_without_guidance_the_batch_is_the_images(pixart):
    trc, book = run(pixart, "a red cat", guidance_scale=1.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1
    check(pixart, trc, book, 0, "a red cat", "cat")


def test_real_image_attribution(pixart):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    trc = daami2i.trace_image(pixart, image, "a red cat", timesteps=(300, 600), generator=g, max_sequence_length=32)
    gen = trc.last_generation
    assert gen.image_size == (64, 96) and gen.steps_captured == [0, 1] and gen.n_images == 1
    vae = pixart.vae
    with torch.no_grad(), recording(pixart.transformer, passthrough=True) as book:
        lat = vae.encode(pixart.image_processor.preprocess(image)).latent_dist.mean * vae.config.scaling_factor
        emb, mask, _, _ = pixart.encode_prompt("a red cat", do_classifier_free_guidance=False, max_sequence_length=32)
        g = torch.Generator().manual_seed(0)
        for t in (300, 600):
            noisy = pixart.scheduler.add_noise(lat, torch.randn(lat.shape, generator=g), torch.tensor([t]))
            pixart.transformer(
                noisy, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([t]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )  # fmt: skip
    check(pixart, trc, dict(book), 0, "a red cat", "cat")


def test_cli_generate_and_show(pixart, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    pixart.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "96"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output

"""Wan 2.1 text-to-video, the first video family: its video tokens are traced as the latent frames
stacked top to bottom. Every query equals a dense reference from probabilities recorded by explicit
attention (RMS-normed, rotary-embedded q and k, written out here) in a separate identical run; the
conditional pass is the prompt's call, never the negative prompt's, nor averaged with it."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_wan_pipeline
from reference import (
    block_mean,
    column_query,
    dense_cross,
    dense_self,
    inside_polygon,
    recorders,
    row_query,
    traced_and_recorded,
    triangle,
)

KW = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16)
GRID = (3 * 2, 3)  # 3 latent frames of 2 x 3 tokens, stacked


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) rotated pairwise by the model's (1, S, 1, D) cos / sin tables, from the formula."""
    c, s = cos[..., 0::2].double(), sin[..., 1::2].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


class WanRecorder:
    """Records a layer's softmax probabilities (B, H, N, keys) in float64, then lets the original
    processor compute the output (the recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        with torch.no_grad():
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.add_k_proj is not None:
                context = context[:, -512:]  # image-to-video: [image context, 512 text positions]; the text
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1)).double()
            k = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1)).double()
            if rotary_emb is not None:
                q, k = rotary(q, *rotary_emb), rotary(k, *rotary_emb)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@contextmanager
def recording(transformer, second=None):
    mods = {n: m for n, m in transformer.named_modules() if n.startswith("blocks.") and n[-5:] in ("attn1", "attn2")}
    if second is not None:  # Wan 2.2's low-noise expert, its layers named as daami2i names them
        mods |= {f"transformer_2.{n}": m for n, m in second.named_modules() if n[-5:] in ("attn1", "attn2")}
    with recorders(mods, WanRecorder) as book:
        yield book


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


def call(pipe, prompt, **kw):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **{**KW, **kw}).frames


def run(pipe, prompt, trace_kwargs=None, **kw):
    return traced_and_recorded(
        lambda: call(pipe, prompt, **kw),
        recording(pipe.transformer, getattr(pipe, "transformer_2", None)),
        daami2i.trace(pipe, **(trace_kwargs or {})),
    )


def assert_close(ours, ref):
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-4)


def references(trc, book, calls):
    """Dense self-attention (N x N) and token maps (T, rows, cols) of the chosen calls of each layer."""
    picked = {n: [p for i, p in enumerate(ps) if i in calls] for n, ps in book.items()}
    selfs = [(s.name, 1) for s in trc.sites if s.kind == "self"]
    crosses = [(s.name, 1) for s in trc.sites if s.kind == "cross"]
    # the reference helpers take the token grid as the "latent" of factor-1 layers (patches already cut)
    return dense_self(picked, selfs, GRID, GRID, [0]), dense_cross(picked, crosses, GRID, GRID, [0])


def positions(tokens, pieces):
    n = len(pieces)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n)]


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_every_query_matches_the_recorded_attention(wan, halves):
    prompt = "a red fox runs on snow"
    trc, book = run(wan, prompt, dict(halves=halves), negative_prompt="a blurry dog")
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.image_size == (3 * 32, 48) and gen.steps_captured == [0, 1]
    assert len(book["blocks.0.attn1"]) == 4  # two steps, each the prompt's call then the negative prompt's
    calls = {"cond": {0, 2}, "uncond": {1, 3}, "both": {0, 1, 2, 3}}[halves]
    self_ref, maps = references(trc, book, calls)
    if halves == "both":  # the passes' mean, as the halves of a batch
        self_ref = self_ref / 2
        maps = maps / 2
    ghm = trc.compute_global_heat_map()
    assert ghm.frame_size == (2, 3) and ghm.frames.source == (0, 1, 1, 1, 1, 2, 2, 2, 2)
    n, per = GRID[0] * GRID[1], 6  # stacked tokens, tokens of one frame
    # pixel ids of one frame's grid, in the token frame of video frame 5 (latent frame 2)
    w = torch.zeros(n)
    w[[2 * per + 0, 2 * per + 4]] = 1
    assert_close(ghm.compute_pixel_heat_map([0, 4], frame=5).value, column_query(self_ref, w, GRID))
    assert_close(ghm.compute_pixel_heat_map([0, 4], "attends_to", frame=-1).value, row_query(self_ref, w, GRID))
    w = torch.zeros(n)
    w[[1, per + 1, 2 * per + 1]] = 1  # frame=None: the same pixel in every frame
    assert_close(ghm.compute_pixel_heat_map(1).value, column_query(self_ref, w, GRID))
    box = torch.zeros(GRID)
    box[2:4, 0:2] = 1  # video frames 1-4 come from latent frame 1: its left 2 x 2 tokens
    for frame in (1, 4, range(2, 4)):
        assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=frame).value, column_query(self_ref, box, GRID))
    box[4:6, 0:2] = 1  # a frame range spanning latent frames 1 and 2
    assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=range(3, 9)).value, column_query(self_ref, box, GRID))
    tri = triangle((32, 48))  # a polygon in the pixels of video frame 0
    cover = torch.zeros(GRID)
    cover[0:2] = block_mean(inside_polygon(tri, (32, 48)), (2, 3))
    assert_close(ghm.compute_contour_heat_map(tri, 32, 48, frame=0).value, column_query(self_ref, cover, GRID))
    pm = ghm.compute_pixel_heat_map(0, frame=0)
    assert pm.heatmap.shape == (3, 2, 3) and torch.equal(pm.heatmap[2], pm.value[4:6])
    assert torch.equal(pm.frame(6).value, pm.value[4:6])  # video frame 6 shows latent frame 2
    with pytest.raises(daami2i.QueryError, match="outside this video's 9 frames"):
        ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=9)
    with pytest.raises(daami2i.QueryError, match="pixel ids must lie in"):
        ghm.compute_pixel_heat_map(7, frame=0)  # a stacked id is not an id of one frame
    if halves == "uncond":
        return  # the prompt's words are not the negative prompt's keys
    tok = wan.tokenizer
    rows = positions(tok.tokenize(prompt), tok.tokenize("fox"))
    assert rows
    wm = ghm.compute_word_heat_map("fox")
    ref = maps[rows].mean(0)  # (stacked rows, cols)
    assert_close(wm.value, ref)
    assert wm.heatmap.shape == (3, 2, 3)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, ref, GRID))
    assert_close(ghm.compute_guided_heat_map(wm.heatmap).value, column_query(self_ref, ref, GRID))
    only = ref.clone()
    only[:2] = 0
    only[4:] = 0  # frame=2: the guide's weight in latent frame 1 only
    assert_close(ghm.compute_guided_heat_map(wm, frame=2).value, column_query(self_ref, only, GRID))
    # the video frames' maps: each latent frame resized on its own, repeated for its video frames,
    # normalised over the whole video
    video = call(wan, prompt, negative_prompt="a blurry dog")[0]
    up = torch.nn.functional.interpolate(ref.view(3, 1, 2, 3), size=(32, 48), mode="bicubic", align_corners=False)
    up = up[[0, 1, 1, 1, 1, 2, 2, 2, 2], 0]
    up = (up - up.min()) / (up.max() - up.min())
    assert_close(wm.expand_as(video), up)
    assert wm.expand_as(video, threshold=0.5).sum() == (up > 0.5).sum()
    with pytest.raises(daami2i.QueryError, match="video of 9 frames, but 4 frames"):
        wm.expand_as(video[:4])
    if halves == "cond":  # never the negative prompt's call
        other, _ = references(trc, book, {1, 3})
        w = torch.zeros(n)
        w[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w, GRID))


def test_store_estimate_and_experiment(wan, tmp_path):
    trc, _ = run(wan, "a red fox")
    gen = trc.last_generation
    tokens = next(iter(gen.cross_attention.values())).sums.shape[-1]
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=tokens)
    assert need["self"] == gen.nbytes("self") and need["cross"] == gen.nbytes("cross")
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    ghm = trc.compute_global_heat_map()
    assert again.frames == gen.frames and again.frame_size == (2, 3)
    assert_close(again.compute_word_heat_map("fox").value, ghm.compute_word_heat_map("fox").value)
    assert_close(
        again.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value, ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value
    )
    # a manifest whose frame layout does not fit its grid, or is not a layout, is refused by name
    manifest = tmp_path / "exp" / "manifest.json"
    text = manifest.read_text()
    for bad in ('"rows": 3', '"source": "0,1"'):
        manifest.write_text(
            text.replace('"rows": 2', bad, 1) if "rows" in bad else text.replace('"source": [', f'{bad}, "x": [', 1)
        )
        with pytest.raises(daami2i.ExperimentError, match="generation.frames"):
            daami2i.load_experiment(tmp_path / "exp")


def test_mismatched_experts_and_real_video_are_refused_clearly(wan):
    two = tiny_wan_pipeline(boundary_ratio=0.9)
    two.transformer_2.register_to_config(patch_size=(1, 1, 1))
    with pytest.raises(daami2i.TraceError, match="transformer_2 patches the latents by"):
        daami2i.trace(two)
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(wan, np.zeros((32, 48, 3), dtype=np.uint8), "a fox")


def test_cli_generate_writes_a_video(wan, tmp_path):
    """`daami2i generate` on Wan: the video, one overlay video per word and the experiment (with its
    frames); `show` draws a word over the saved frames (tests/test_video_trace.py checks the pixels)."""
    import imageio.v3 as iio
    from typer.testing import CliRunner

    from daami2i.cli import app
    from daami2i.video import experiment_frames

    wan.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red fox", "-m", str(tmp_path / "model"), "--steps", "1", "--height", "32", "--width", "48"]
    res = CliRunner().invoke(app, [*args, "--num-frames", "9", "--video-format", "gif", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert iio.imread(out / "video.gif", plugin="pillow", index=None).shape[1:3] == (32, 48)
    assert iio.imread(out / "words" / "fox.gif", plugin="pillow", index=None).shape[1:3] == (32, 48)
    exp = daami2i.load_experiment(out / "experiment")
    assert experiment_frames(exp).shape == (9, 32, 48, 3)
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "fox"])
    assert res.exit_code == 0 and (out / "experiment" / "show-word-fox.png").is_file(), res.output


def cells(grid, frames, pool):
    """The (tokens x cells) membership matrix P^T of p x p cells of each frame, written out by loops."""
    rows, cols = grid[0] // frames, grid[1]
    hc, wc = -(-rows // pool), -(-cols // pool)
    m = torch.zeros(grid[0] * cols, frames * hc * wc, dtype=torch.float64)
    for f in range(frames):
        for y in range(rows):
            for x in range(cols):
                m[(f * rows + y) * cols + x, (f * hc + y // pool) * wc + x // pool] = 1
    return m


def test_pooled_store_holds_the_exact_cell_means(wan, tmp_path):
    """trace(self_pool=2): the store is D^-1 P S P^T D^-1 of the dense sum S (2 x 2 cells of each 2 x 3
    frame: a full cell and a narrower one); a query of whole cells returns the cell means of the
    full-resolution query, and any other region follows the same matrices."""
    prompt = "a red fox runs on snow"
    trc, book = run(wan, prompt, dict(self_pool=2), negative_prompt="a blurry dog")
    gen = trc.last_generation
    store = gen.self_attention[1]
    assert store.pool == 2 and store.size == (3, 2) and store.sums.shape == (1, 6, 6)
    self_ref, _ = references(trc, book, {0, 2})
    pt = cells(GRID, 3, 2)  # (18 tokens, 6 cells)
    d_inv = torch.diag(1 / pt.sum(0))
    pooled = d_inv @ pt.T @ self_ref.double() @ pt @ d_inv
    assert_close(store.sums[0] / len(store.layers), pooled)  # the reference is the mean over the 2 layers
    need = trc.estimate_nbytes(gen.latent_size, 1, n_tokens=store_tokens(gen), frames=3)
    assert need["self"] == gen.nbytes("self") == 6 * 6 * 4
    ghm = trc.compute_global_heat_map()
    box = torch.zeros(GRID)
    box[2:4, 0:2] = 1  # the whole first cell of latent frame 1
    full = column_query(self_ref, box, GRID).double().flatten()
    cell_means = pt @ d_inv @ pt.T @ full
    assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=1).value.flatten(), cell_means)
    # a pixel cuts its cell: its weight counts as spread over the cell, U A U^T g / sum(g)
    g = torch.zeros(18, dtype=torch.float64)
    g[2 * 6 + 4] = 1  # row 1, column 1 of latent frame 2
    want = pt @ pooled @ pt.T @ g  # attended_by: m = A x, as column_query's dense @ g
    assert_close(ghm.compute_pixel_heat_map(4, frame=8).value.flatten(), want)
    want = pt @ pooled.T @ pt.T @ g
    assert_close(ghm.compute_pixel_heat_map(4, "attends_to", frame=8).value.flatten(), want)
    with pytest.raises(daami2i.ConfigError, match="self_pool must be"):
        daami2i.trace(wan, self_pool=0)
    # a word map (full resolution) guides the pooled store; an experiment keeps the cells
    fox = ghm.compute_word_heat_map("fox")
    want = pt @ pooled @ pt.T @ (fox.value.flatten().double() / fox.value.sum())
    assert_close(ghm.compute_guided_heat_map(fox).value.flatten(), want)
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp")
    assert again.generation.self_attention[1].pool == 2
    assert_close(again.compute_global_heat_map().compute_guided_heat_map(fox).value.flatten(), want)


def store_tokens(gen):
    return next(iter(gen.cross_attention.values())).sums.shape[-1]


def test_auto_pool_fits_wan_default_video_in_a_gigabyte(wan):
    """The bar: Wan 2.1 1.3B at 480 x 832, 81 frames (21 latent frames of 30 x 52 tokens): the
    default store, with word maps of every frame, is at most 1 GiB; auto pooling chooses 2 x 2 cells."""
    from daami2i.tracing.families import adapter_for
    from daami2i.tracing.trace import cells_of

    trc = daami2i.trace(wan)
    need = trc.estimate_nbytes((21 * 60, 104), 1, n_tokens=20, frames=21)
    assert trc._pool_for((21 * 30, 52), 21, 1) == 2 and cells_of((21 * 30, 52), 21, 2) == (21 * 15, 26)
    assert need["self"] == (21 * 15 * 26) ** 2 * 4  # 256 MiB
    assert adapter_for(wan)[1].name == "wan"
    assert need["total"] <= 2**30
    assert daami2i.trace(wan, self_pool=1).estimate_nbytes((21 * 60, 104), 1, 20, frames=21)["self"] == 32760**2 * 4


def test_wan22_second_transformer_takes_its_steps():
    """Wan 2.2 A14B's two experts: transformer runs the high-noise steps, transformer_2 the rest; both
    are traced (their layers named transformer_2.*), and every map is the sum over the steps each ran,
    against the dense reference of both; the hooks of both are removed afterwards."""
    pipe = tiny_wan_pipeline(boundary_ratio=0.9)
    prompt = "a red fox runs on snow"
    trc, book = run(pipe, prompt, negative_prompt="a blurry dog")
    first = [n for n in book if not n.startswith("transformer_2.")]
    second = [n for n in book if n.startswith("transformer_2.")]
    assert first and second and all(len(book[n]) == 2 for n in book)  # one step each, two passes
    gen = trc.last_generation
    assert sorted(gen.self_attention[1].layers) == sorted(n for n in book if n.endswith("attn1"))
    picked = {n: [ps[0]] for n, ps in book.items()}  # the prompt's pass of the one step each ran
    selfs = [(n, 1) for n in book if n.endswith("attn1")]
    crosses = [(n, 1) for n in book if n.endswith("attn2")]
    self_ref = dense_self(picked, selfs, GRID, GRID, [0])
    maps = dense_cross(picked, crosses, GRID, GRID, [0])
    ghm = trc.compute_global_heat_map()
    w = torch.zeros(GRID[0] * GRID[1])
    w[[6, 10]] = 1
    assert_close(ghm.compute_pixel_heat_map([0, 4], frame=2).value, column_query(self_ref, w, GRID))
    rows = positions(pipe.tokenizer.tokenize(prompt), pipe.tokenizer.tokenize("fox"))
    assert_close(ghm.compute_word_heat_map("fox").value, maps[rows].mean(0))
    for module in (pipe.transformer, pipe.transformer_2):
        assert not module._forward_pre_hooks
        assert not any("Capturing" in type(m.processor).__name__ for m in module.modules() if hasattr(m, "processor"))


def test_image_to_video_reads_the_text_call_never_the_image_context():
    """Wan I2V: each cross-attention attends to the CLIP image tokens first, then to the 512 text
    positions. The word maps are the text call's probabilities (dense reference: softmax over the
    text keys only, written out here), so the image context never enters them."""
    from PIL import Image

    from daami2i.testing.wan import tiny_wan_i2v_pipeline

    pipe = tiny_wan_i2v_pipeline()
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    kw = dict(image=image, max_sequence_length=512)
    prompt = "a red fox runs on snow"
    trc, book = run(pipe, prompt, negative_prompt="a blurry dog", **kw)
    assert all(len(v) == 4 for v in book.values())  # 2 steps x (prompt, negative prompt)
    assert all(p.shape[-1] == 512 for n, ps in book.items() if n.endswith("attn2") for p in ps)  # the text keys
    self_ref, maps = references(trc, book, {0, 2})
    ghm = trc.compute_global_heat_map()
    rows = positions(pipe.tokenizer.tokenize(prompt), pipe.tokenizer.tokenize("fox"))
    assert_close(ghm.compute_word_heat_map("fox").value, maps[rows].mean(0))
    box = torch.zeros(GRID)
    box[4:6, 1:3] = 1
    assert_close(ghm.compute_bbox_heat_map(1, 0, 2, 1, frame=7).value, column_query(self_ref, box, GRID))


def test_frame_arguments_and_video_shapes_hostile_and_odd(wan):
    """frame= takes arrays of frames; a (T, C, H, W) array is channels-first; the deprecated diffused
    spelling keeps frame=; a frame's pixel map keeps its own frame's region; bad sizes and NaN maps
    are clear errors."""
    trc, _ = run(wan, "a red fox runs on snow", dict(self_pool=1))
    ghm = trc.compute_global_heat_map()
    by_range = ghm.compute_pixel_heat_map([0, 4], frame=range(1, 5)).value
    assert torch.equal(ghm.compute_pixel_heat_map([0, 4], frame=np.array([1, 2, 3, 4])).value, by_range)
    assert torch.equal(ghm.compute_pixel_heat_map([0, 4], frame=torch.tensor([2])).value, by_range)
    with pytest.raises(daami2i.QueryError, match="frame must be an integer"):
        ghm.compute_pixel_heat_map(0, frame=1.5)
    fox = ghm.compute_word_heat_map("fox")
    video = np.zeros((9, 32, 48, 3), np.uint8)
    assert torch.equal(fox.expand_as(video.transpose(0, 3, 1, 2)), fox.expand_as(video))  # (T, C, H, W)
    with pytest.raises(daami2i.QueryError, match="no channel axis"):
        fox.expand_as(np.zeros((9, 5, 32, 48)))
    with pytest.raises(daami2i.QueryError, match="sides of 1 to"):
        fox.expand_as((0, 48))
    bad = daami2i.heatmaps.maps.WordHeatMap(fox.value * float("nan"), "fox", frames=fox.frames)
    with pytest.raises(daami2i.QueryError, match="NaN"):
        bad.expand_as(video)
    with pytest.warns(DeprecationWarning):
        old = ghm.compute_pixel_diffused_heat_map(4, iterations=2, threshold=0.4, frame=8)
    assert torch.equal(old.value, ghm.compute_pixel_grown_heat_map(4, 2, 0.4, frame=8).value)
    assert not torch.equal(old.value, ghm.compute_pixel_grown_heat_map(4, 2, 0.4).value)
    pm = ghm.compute_pixel_heat_map(4, frame=8)
    one = pm.frame(8)
    assert one.weights.shape == (2, 3) and one.weights[1, 1] == 1 and one.weights.sum() == 1

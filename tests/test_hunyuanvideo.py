"""HunyuanVideo 1.0 text to video: joint ``[video, Llama text]`` attention in the dual- and single-stream
blocks (the token refiner's never traced), the token frames stacked top to bottom. Every query equals a
dense reference from probabilities recorded by explicit attention (RMS-normed q and k, RoPE on the video
part written out here, the text padding masked as the transformer masks it) in a separate identical run;
the prompt's pass is never the negative prompt's (true CFG runs them as separate calls), nor averaged
with it; the word labels are the ids the Llama encoder received, past the cropped template prefix."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import daami2i
from daami2i.heatmaps.frames import FrameLayout
from daami2i.testing.hunyuanvideo import PREFIX_TOKENS, prompt_template, tiny_hunyuanvideo_pipeline, video_token_grid
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

TEXT = 16
KW = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=TEXT)
FRAME = (2, 3)  # tokens of one frame: 32 x 48 px are 4 x 6 latents, patch 2
GRID = (3 * 2, 3)  # 9 frames: 3 latent frames, stacked
N = GRID[0] * GRID[1]
SOURCE = (0, 1, 1, 1, 1, 2, 2, 2, 2)  # per video frame of 9, its token frame (causal VAE, time by 4)
NEG = dict(negative_prompt="a blurry dog", true_cfg_scale=2.0)
LAYERS = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) rotated pairwise (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) by (S, D) tables whose pairs
    share a frequency, written out from the formula."""
    c, s = cos[None, :, None, 0::2].double(), sin[None, :, None, 0::2].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


class HunyuanRecorder:
    """Records a joint layer's softmax probabilities (B, H, N + T, N + T) in float64, ``[video, text]``,
    then lets the original processor compute the output (a recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original: Any) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        with torch.no_grad():

            def heads(x):
                return x.unflatten(-1, (attn.heads, -1))  # (B, S, H, D)

            t = encoder_hidden_states.shape[1]
            if attn.add_q_proj is None:  # single-stream: one projection of the fused sequence
                x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
                q, k = attn.norm_q(heads(attn.to_q(x))).double(), attn.norm_k(heads(attn.to_k(x))).double()
            else:  # dual-stream: the text through its own projections and norms, after the video
                q = attn.norm_q(heads(attn.to_q(hidden_states)))
                k = attn.norm_k(heads(attn.to_k(hidden_states)))
                cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
                ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
                q, k = torch.cat([q, cq], dim=1).double(), torch.cat([k, ck], dim=1).double()
            q[:, :-t], k[:, :-t] = rotate(q[:, :-t], *image_rotary_emb), rotate(k[:, :-t], *image_rotary_emb)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, D)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            scores = scores.masked_fill(~attention_mask.bool(), -torch.inf)  # (B, 1, 1, S): padding keys
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@contextmanager
def recording(transformer):
    mods = {n: m for n, m in transformer.named_modules() if n in LAYERS}
    with recorders(mods, HunyuanRecorder) as book:
        yield book


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuanvideo_pipeline()


def call(pipe, prompt, **kw):
    kw = {"prompt_template": prompt_template(), **KW, **kw}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def run(pipe, prompt, trace_kwargs=None, **kw):
    # the full-resolution store: the references are dense (N x N)
    return traced_and_recorded(
        lambda: call(pipe, prompt, **kw),
        recording(pipe.transformer),
        daami2i.trace(pipe, **{"self_pool": 1, **(trace_kwargs or {})}),
    )


def assert_close(ours, ref):
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-4)


def references(book, calls, grid=GRID):
    """Dense self-attention (N x N, the video keys) and token maps (T, rows, cols, the text keys) of
    the chosen calls of each layer (each call is batch 1), from the full joint probabilities."""
    n = grid[0] * grid[1]
    picked = {name: [p for i, p in enumerate(ps) if i in calls] for name, ps in book.items()}
    selfs = {name: [p[:, :, :n, :n] for p in ps] for name, ps in picked.items()}
    crosses = {name: [p[:, :, :n, n:] for p in ps] for name, ps in picked.items()}
    layers = [(name, 1) for name in LAYERS]
    return dense_self(selfs, layers, grid, grid, [0]), dense_cross(crosses, layers, grid, grid, [0])


def positions(tokens, pieces):
    n = len(pieces)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n)]


def prompt_start(pipe, prompt, crop_start):
    """Where the prompt's ids begin among the text keys: in the templated ids, minus the cropped prefix."""
    ids = pipe.tokenizer(prompt_template()["template"].format(prompt))["input_ids"]
    mine = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i : i + len(mine)] == mine)
    return at - crop_start


def word_columns(pipe, prompt, word, crop_start=PREFIX_TOKENS):
    tok = pipe.tokenizer
    start = prompt_start(pipe, prompt, crop_start)
    return [start + c for c in positions(tok.tokenize(prompt), tok.tokenize(" " + word))]


# ------------------------------------------------------------------------- queries vs the reference


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_every_query_matches_the_recorded_attention(pipe, halves):
    prompt = "a red fox runs on snow"
    trc, book = run(pipe, prompt, dict(halves=halves), **NEG)
    gen = trc.last_generation
    assert sorted(trc.attention_layers) == sorted(LAYERS)  # the token refiner is no site
    assert gen.grid_size == GRID and gen.image_size == (3 * 32, 48) and gen.steps_captured == [0, 1]
    assert not gen.cfg and gen.n_images == 1  # true CFG: separate calls, never a batch
    assert len(book[LAYERS[0]]) == 4  # two steps, each the prompt's call then the negative prompt's
    assert book[LAYERS[0]][0].shape == (1, 2, N + TEXT, N + TEXT)
    calls = {"cond": {0, 2}, "uncond": {1, 3}, "both": {0, 1, 2, 3}}[halves]
    self_ref, maps = references(book, calls)
    if halves == "both":  # the passes' mean, as the halves of a batch
        self_ref, maps = self_ref / 2, maps / 2
    ghm = trc.compute_global_heat_map()
    assert ghm.frame_size == FRAME and ghm.frames.source == SOURCE
    per = FRAME[0] * FRAME[1]
    w = torch.zeros(N)
    w[[2 * per + 0, 2 * per + 4]] = 1  # pixel ids of one frame, in the token frame of video frame 5
    assert_close(ghm.compute_pixel_heat_map([0, 4], frame=5).value, column_query(self_ref, w, GRID))
    assert_close(ghm.compute_pixel_heat_map([0, 4], "attends_to", frame=-1).value, row_query(self_ref, w, GRID))
    w = torch.zeros(N)
    w[[1, per + 1, 2 * per + 1]] = 1  # frame=None: the same pixel in every frame
    assert_close(ghm.compute_pixel_heat_map(1).value, column_query(self_ref, w, GRID))
    box = torch.zeros(GRID)
    box[2:4, 0:2] = 1  # video frames 1-4 come from latent frame 1: its left 2 x 2 tokens
    for frame in (1, 4, range(2, 4)):
        assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=frame).value, column_query(self_ref, box, GRID))
    box[4:6, 0:2] = 1  # a frame range spanning latent frames 1 and 2
    assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=range(3, 9)).value, column_query(self_ref, box, GRID))
    assert_close(
        ghm.compute_bbox_heat_map(0, 0, 1, 1, "attends_to", frame=range(3, 9)).value, row_query(self_ref, box, GRID)
    )
    tri = triangle((32, 48))  # a polygon in the pixels of video frame 0
    cover = torch.zeros(GRID)
    cover[0:2] = block_mean(inside_polygon(tri, (32, 48)), FRAME)
    assert_close(ghm.compute_contour_heat_map(tri, 32, 48, frame=0).value, column_query(self_ref, cover, GRID))
    with pytest.raises(daami2i.QueryError, match="outside this video's 9 frames"):
        ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=9)
    # the text padding is masked: no query gives it any probability
    ids = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    first = book[LAYERS[0]][0]
    assert float(first[..., N + len(ids) + 1 :].abs().max()) == 0.0  # past the prompt and <|eot_id|>
    if halves == "uncond":
        return  # the prompt's words are not the negative prompt's keys
    stream = gen.streams[0]
    assert stream["stop_row"] - stream["first_row"] == len(ids) + 1  # word columns: prompt + <|eot_id|>
    cols = word_columns(pipe, prompt, "fox")
    assert cols == [2, 3, 4]  # 'Ġf', 'o', 'x' after 'a', 'Ġred': the crop leaves the prompt first
    wm = ghm.compute_word_heat_map("fox")
    ref = maps[cols].mean(0)  # (stacked rows, cols)
    assert_close(wm.value, ref)
    assert wm.heatmap.shape == (3, *FRAME)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, ref, GRID))
    only = torch.zeros_like(ref)
    only[2:4] = ref[2:4]  # frame=2: the guide's weight in latent frame 1 only
    assert_close(ghm.compute_guided_heat_map(wm, frame=2).value, column_query(self_ref, only, GRID))
    video = call(pipe, prompt, **NEG)[0]
    up = torch.nn.functional.interpolate(ref.view(3, 1, 2, 3), size=(32, 48), mode="bicubic", align_corners=False)
    up = up[list(SOURCE), 0]
    assert_close(wm.expand_as(video), (up - up.min()) / (up.max() - up.min()))
    if halves == "cond":  # never the negative prompt's call
        other, _ = references(book, {1, 3})
        w = torch.zeros(N)
        w[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w, GRID))


def test_without_true_cfg_each_step_is_one_call(pipe):
    """Guidance-distilled: guidance_scale is an embedding, not a batch; without a negative prompt (or
    with true_cfg_scale 1) one call per step, and halves='uncond' is refused by name."""
    trc, book = run(pipe, "a red fox", guidance_scale=8.0, negative_prompt="a dog")  # true_cfg_scale 1: no CFG
    assert len(book[LAYERS[0]]) == 2 and book[LAYERS[0]][0].shape[0] == 1
    _, maps = references(book, {0, 1})
    cols = word_columns(pipe, "a red fox", "fox")
    assert_close(trc.compute_global_heat_map().compute_word_heat_map("fox").value, maps[cols].mean(0))
    with pytest.raises(daami2i.TraceError, match="true_cfg_scale > 1"):
        with daami2i.trace(pipe, halves="uncond"):
            call(pipe, "a red fox")


def test_labels_are_the_ids_the_encoder_received(pipe):
    """With the pipeline's default template (crop_start 95, written for the real tokenizer) the tiny
    tokenizer's prefix is 168 tokens: 73 template tokens stay before the prompt among the text keys. The
    labels come from the received ids past the crop, so the word maps sit at the shifted columns."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    prompt, text = "a red fox", 96
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    trc, book = run(pipe, prompt, prompt_template=DEFAULT_PROMPT_TEMPLATE, max_sequence_length=text)
    assert book[LAYERS[0]][0].shape[-1] == N + text
    t = text
    picked = {n: [p[:, :, :N, N : N + t] for p in ps] for n, ps in book.items()}
    maps = dense_cross(picked, [(n, 1) for n in LAYERS], GRID, GRID, [0])
    ghm = trc.compute_global_heat_map()
    tok = pipe.tokenizer
    assert ghm.streams[0].tokens == tok.tokenize(prompt)
    assert prompt_start(pipe, prompt, crop) == PREFIX_TOKENS - crop == 73
    for word in ("red", "fox"):
        cols = word_columns(pipe, prompt, word, crop)
        assert cols and min(cols) >= 73
        assert_close(ghm.compute_word_heat_map(word).value, maps[cols].mean(0))


def test_text_relations_match_the_joint_softmax(pipe):
    """relations text->image / text->text: the prompt's tokens as queries of the joint layers, their
    probabilities over the video keys and over the prompt's text keys."""
    prompt = "a red fox runs on snow"
    relations = ["image->text", "image->image", "text->image", "text->text"]
    trc, book = run(pipe, prompt, dict(relations=relations))
    ghm = trc.compute_global_heat_map()
    per_layer = [sum(p[0].mean(0) for p in book[name]) for name in LAYERS]  # (S, S) head mean, summed over steps
    q = [N + c for c in word_columns(pipe, prompt, "fox")]
    ref = torch.stack([p[q][:, :N].mean(0).reshape(GRID) for p in per_layer]).mean(0)
    got = ghm.compute_text_query_heat_map("fox")
    assert_close(got.value, ref)
    assert got.heatmap.shape == (3, *FRAME)
    kept = [N + c for c in range(len(pipe.tokenizer.tokenize(prompt)))]
    tokens, tt = ghm.text_to_text()
    assert tokens[:5] == ["a", "red", "f", "o", "x"] and len(tokens) == len(kept)
    assert_close(tt, torch.stack([p[kept][:, kept] for p in per_layer]).mean(0))


# -------------------------------------------------------------------------------- hygiene and store


def test_frames_and_pipeline_are_left_as_they_were(pipe):
    """Traced frames equal untraced ones bit for bit; after a trace, also one left by an exception, the
    processors (the token refiner's too), hooks, patched methods and the attention-function wrapper are
    the originals."""
    import diffusers.models.transformers.transformer_hunyuan_video as module
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    denoiser = pipe.transformer
    before = {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    hooks = (
        len(denoiser._forward_pre_hooks),
        len(pipe.text_encoder._forward_pre_hooks),
        len(pipe.text_encoder_2._forward_pre_hooks),
    )
    plain = call(pipe, "a red cat", **NEG)
    with daami2i.trace(pipe):
        traced = call(pipe, "a red cat", **NEG)
    assert np.array_equal(plain, traced)
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(pipe):
            call(pipe, "a red cat", num_inference_steps=1)
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")} == before
    assert module.dispatch_attention_fn is dispatch_attention_fn
    import diffusers.models.attention_processor as attention_processor

    assert attention_processor.F is torch.nn.functional  # the token refiner's processor module
    assert (
        len(denoiser._forward_pre_hooks),
        len(pipe.text_encoder._forward_pre_hooks),
        len(pipe.text_encoder_2._forward_pre_hooks),
    ) == hooks
    assert "check_inputs" not in vars(pipe) and "set_timesteps" not in vars(pipe.scheduler)


def test_store_estimate_and_experiment(pipe, tmp_path):
    trc, _ = run(pipe, "a red fox", dict(relations=["image->text", "image->image", "text->image", "text->text"]))
    gen = trc.last_generation
    tokens = next(iter(gen.cross_attention.values())).sums.shape[-1]
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=tokens, frames=gen.frames.token_frames)
    assert need["total"] == gen.nbytes() and need["self"] == gen.nbytes("self") == N * N * 4
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    ghm = trc.compute_global_heat_map()
    assert again.frames == gen.frames and again.frame_size == FRAME
    assert_close(again.compute_word_heat_map("fox").value, ghm.compute_word_heat_map("fox").value)
    assert_close(again.compute_text_query_heat_map("fox").value, ghm.compute_text_query_heat_map("fox").value)
    assert_close(
        again.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value, ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value
    )
    # the published size: 129 frames of 720 x 1280 (33 latent frames of 45 x 80 tokens), pooled by "auto"
    auto = daami2i.trace(pipe)
    published = auto.estimate_nbytes(auto.adapter.default_latent(pipe.transformer), 1, n_tokens=20, frames=33)
    assert published["total"] <= 2**30


# ------------------------------------------------------------------------------------------ frames


class PerFrame(torch.nn.Module):
    """A GroupNorm applied to each frame of a (B, C, T, H, W) tensor on its own."""

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return self.norm(x)
        b, c, t, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def test_frame_layout_is_what_the_vae_decodes():
    """With the decoder's GroupNorms per frame (the stock ones mix all frames), a latent frame changes no
    decoded frame before its first one (causal) and every frame from it on, so a video frame's source,
    the latest latent frame that changes it, is FrameLayout.causal's, for 1..7 latent frames (decoded
    framewise, in overlapping tiles of 4 latent frames, from 5 on: there a frame's reach ends with its
    tiles); the trace's layout of a run is the same and has as many frames as the pipeline decoded."""
    pipe = tiny_hunyuanvideo_pipeline(seed=1)
    for module in list(pipe.vae.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, PerFrame(child))
    torch.manual_seed(0)
    for frames in range(1, 8):
        latents = torch.randn(1, 4, frames, 4, 6)
        with torch.no_grad():
            base = pipe.vae.decode(latents).sample
            masks = []
            for j in range(frames):
                moved = latents.clone()
                moved[:, :, j] += 1
                masks.append(((pipe.vae.decode(moved).sample - base).abs().amax(dim=(0, 1, 3, 4)) > 0).tolist())
        expected = FrameLayout.causal(frames, 2).source
        assert len(masks[0]) == len(expected) == 4 * (frames - 1) + 1
        assert [max(j for j in range(frames) if masks[j][v]) for v in range(len(expected))] == list(expected)
        for j in range(frames):  # causal: nothing before its first frame, every frame it is the source of
            assert not any(m for m, s in zip(masks[j], expected, strict=True) if s < j), frames
            assert all(m for m, s in zip(masks[j], expected, strict=True) if s == j), frames
            if frames <= 4:  # decoded at once, each latent frame reaches every later frame (from 5 on the
                assert masks[j] == [s >= j for s in expected]  # framewise tiles end a frame's reach)
    for num_frames in (1, 5, 13):
        with daami2i.trace(pipe) as trc:
            video = call(pipe, "a red fox", num_frames=num_frames, num_inference_steps=1)[0]
        layout = trc.last_generation.frames
        latent_frames = video_token_grid(pipe, num_frames, 32, 48)[0]
        assert layout.video_frames == video.shape[0] == num_frames
        assert layout.source == FrameLayout.causal(latent_frames, 2).source


# ------------------------------------------------------------------------------------------ refusals


def test_other_pipelines_real_videos_and_bad_sizes_are_refused_clearly(pipe):
    for name in ("HunyuanVideoImageToVideoPipeline", "HunyuanVideoFramepackPipeline"):
        other = type(name, (), {"transformer": pipe.transformer, "unet": None})()
        with pytest.raises(daami2i.TraceError, match="text-to-video"):
            daami2i.trace(other)
    for name in ("HunyuanVideoFramepackTransformer3DModel",):  # HunyuanVideo 1.5: its own adapter
        model = type(name, (torch.nn.Module,), {})()
        with pytest.raises(daami2i.TraceError, match="HunyuanVideo 1.0 text-to-video"):
            daami2i.trace(type("Pipe", (), {"transformer": model, "unet": None})())
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(pipe, np.zeros((32, 48, 3), dtype=np.uint8), "a fox")
    latents = torch.randn(1, 4, 2, 5, 6)  # 5 latent rows: not a multiple of patch 2
    text = torch.randn(1, TEXT, 24)
    with pytest.raises(daami2i.TraceError, match="multiple of the transformer's patches"):
        with daami2i.trace(pipe):
            pipe.transformer(latents, torch.tensor([500.0]), text, torch.ones(1, TEXT), torch.randn(1, 16))
    assert not any(
        type(m.processor).__module__.startswith("daami2i")
        for m in pipe.transformer.modules()
        if hasattr(m, "processor")
    )


def test_cli_generate_writes_a_video(pipe, tmp_path):
    """`daami2i generate` on HunyuanVideo (the pipeline's default template and text length: the labels
    come from the received ids past the crop): the video, one overlay video per word and the experiment."""
    import imageio.v3 as iio
    from typer.testing import CliRunner

    from daami2i.cli import app
    from daami2i.video import experiment_frames

    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red fox", "-m", str(tmp_path / "model"), "--steps", "1", "--height", "32", "--width", "48"]
    res = CliRunner().invoke(app, [*args, "--num-frames", "5", "--video-format", "gif", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert iio.imread(out / "video.gif", plugin="pillow", index=None).shape[1:3] == (32, 48)
    assert iio.imread(out / "words" / "fox.gif", plugin="pillow", index=None).shape[1:3] == (32, 48)
    exp = daami2i.load_experiment(out / "experiment")
    assert experiment_frames(exp).shape == (5, 32, 48, 3)

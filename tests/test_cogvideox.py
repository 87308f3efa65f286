"""CogVideoX text to video (1.0 with RoPE as 5b, 1.0 with sin-cos positions as 2b, 1.5 with
``patch_size_t=2``): joint ``[T5, video]`` layers, the token frames stacked top to bottom. Every query
equals a dense reference from probabilities recorded by explicit attention (LayerNorm-ed q and k,
RoPE on the video part written out here) in a separate identical run; the conditional half is the
prompt's, never the negative prompt's; the frame layout is checked against what the VAE decodes."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_cogvideox_pipeline
from daami2i.tracing.families.cogvideox import decoded_sources
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
GRIDS = {"1.0": (3 * 2, 3), "2b": (3 * 2, 3), "1.5": (2 * 2, 3)}  # 3 latent frames; 1.5: padded to 4, in pairs
SOURCES = {  # per video frame of 9, the token frame
    "1.0": (0, 1, 1, 1, 1, 2, 2, 2, 2),
    "2b": (0, 1, 1, 1, 1, 2, 2, 2, 2),
    "1.5": (0, 1, 1, 1, 1, 1, 1, 1, 1),  # padded latent frame 0 is dropped: latent 1 is video frame 0
}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) rotated pairwise (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) by (S, D) tables whose pairs
    share a frequency, written out from the formula."""
    c, s = cos[None, None, :, 0::2].double(), sin[None, None, :, 0::2].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


class CogRecorder:
    """Records a joint layer's softmax probabilities (B, H, T + N, T + N) in float64, then lets the
    original processor compute the output (a recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original: Any) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        with torch.no_grad():
            t = encoder_hidden_states.shape[1]
            x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [text, video]
            b = x.shape[0]
            q = attn.to_q(x).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
            k = attn.to_k(x).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
            q, k = attn.norm_q(q).double(), attn.norm_k(k).double()  # LayerNorm over each head's width
            if image_rotary_emb is not None:  # RoPE on the video part only
                q[:, :, t:] = rotate(q[:, :, t:], *image_rotary_emb)
                k[:, :, t:] = rotate(k[:, :, t:], *image_rotary_emb)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@contextmanager
def recording(transformer):
    mods = {n: m for n, m in transformer.named_modules() if n.startswith("transformer_blocks.") and n.endswith("attn1")}
    with recorders(mods, CogRecorder) as book:
        yield book


@pytest.fixture(scope="module")
def pipes():
    return {
        "1.0": tiny_cogvideox_pipeline(),
        "2b": tiny_cogvideox_pipeline(rotary=False),
        "1.5": tiny_cogvideox_pipeline(patch_size_t=2),
    }


def call(pipe, prompt, **kw):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **{**KW, **kw}).frames


def run(pipe, prompt, trace_kwargs=None, **kw):
    # the full-resolution store: the references are dense (N x N)
    return traced_and_recorded(
        lambda: call(pipe, prompt, **kw),
        recording(pipe.transformer),
        daami2i.trace(pipe, **{"self_pool": 1, **(trace_kwargs or {})}),
    )


def assert_close(ours, ref):
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-4)


def references(trc, book, rows, grid):
    """Dense self-attention (N x N, the video keys) and token maps (T, rows, cols, the text keys) of
    the chosen batch rows, from the full joint probabilities."""
    t = TEXT
    selfs = {n: [p[:, :, t:, t:] for p in ps] for n, ps in book.items()}
    crosses = {n: [p[:, :, t:, :t] for p in ps] for n, ps in book.items()}
    layers = [(s.name, 1) for s in trc.sites]
    # the helpers take the token grid as the "latent" of factor-1 layers (patches already cut)
    return dense_self(selfs, layers, grid, grid, rows), dense_cross(crosses, layers, grid, grid, rows)


def positions(tokens, pieces):
    n = len(pieces)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n)]


@pytest.mark.parametrize(
    "version, halves", [("1.0", "cond"), ("1.0", "uncond"), ("1.0", "both"), ("2b", "cond"), ("1.5", "cond")]
)
def test_every_query_matches_the_recorded_attention(pipes, version, halves):
    pipe, grid = pipes[version], GRIDS[version]
    prompt = "a red fox runs on snow"
    trc, book = run(pipe, prompt, dict(halves=halves), negative_prompt="a blurry dog")
    gen = trc.last_generation
    n_frames = grid[0] // FRAME[0]
    assert gen.grid_size == grid and gen.image_size == (n_frames * 32, 48) and gen.steps_captured == [0, 1]
    assert len(book["transformer_blocks.0.attn1"]) == 2  # one call per step, the batch [uncond, cond]
    assert book["transformer_blocks.0.attn1"][0].shape[:3] == (2, 2, TEXT + grid[0] * grid[1])
    rows = {"cond": [1], "uncond": [0], "both": [0, 1]}[halves]
    self_ref, maps = references(trc, book, rows, grid)
    ghm = trc.compute_global_heat_map()
    assert ghm.frame_size == FRAME and ghm.frames.source == SOURCES[version]
    n, per = grid[0] * grid[1], FRAME[0] * FRAME[1]
    last = n_frames - 1
    w = torch.zeros(n)
    w[[last * per + 0, last * per + 4]] = 1  # pixel ids of one frame, in the last token frame
    assert_close(ghm.compute_pixel_heat_map([0, 4], frame=-1).value, column_query(self_ref, w, grid))
    assert_close(ghm.compute_pixel_heat_map([0, 4], "attends_to", frame=-1).value, row_query(self_ref, w, grid))
    w = torch.zeros(n)
    w[[f * per + 1 for f in range(n_frames)]] = 1  # frame=None: the same pixel in every frame
    assert_close(ghm.compute_pixel_heat_map(1).value, column_query(self_ref, w, grid))
    box = torch.zeros(grid)
    box[2:4, 0:2] = 1  # video frames 1-4 come from token frame 1: its left 2 x 2 tokens
    for frame in (1, 4, range(2, 4)):
        assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=frame).value, column_query(self_ref, box, grid))
    box[:2, 0:2] = 1  # frames 0-8 span every token frame
    box[2 * FRAME[0] :, 0:2] = 1
    assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=range(0, 9)).value, column_query(self_ref, box, grid))
    tri = triangle((32, 48))  # a polygon in the pixels of video frame 0
    cover = torch.zeros(grid)
    cover[0:2] = block_mean(inside_polygon(tri, (32, 48)), FRAME)
    assert_close(ghm.compute_contour_heat_map(tri, 32, 48, frame=0).value, column_query(self_ref, cover, grid))
    # the T5 padding is keys of every query (unmasked): the recorded rows give it a real share
    first = book["transformer_blocks.0.attn1"][0]
    ids = pipe.tokenizer(prompt)["input_ids"]  # the prompt's tokens and </s>
    assert float(first[:, :, TEXT:, len(ids) : TEXT].sum(-1).min()) > 1e-3
    if halves == "uncond":
        return  # the prompt's words are not the negative prompt's keys
    stream = gen.streams[0]
    assert stream["stop_row"] - stream["first_row"] == len(ids)  # word columns: prompt + </s>, never padding
    tok = pipe.tokenizer
    cols = positions(tok.tokenize(prompt), tok.tokenize("fox"))
    assert cols
    wm = ghm.compute_word_heat_map("fox")
    ref = maps[cols].mean(0)  # (stacked rows, cols)
    assert_close(wm.value, ref)
    assert wm.heatmap.shape == (n_frames, *FRAME)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, ref, grid))
    only = torch.zeros_like(ref)
    only[2:4] = ref[2:4]  # frame=2: the guide's weight in token frame 1 only
    assert_close(ghm.compute_guided_heat_map(wm, frame=2).value, column_query(self_ref, only, grid))
    video = call(pipe, prompt, negative_prompt="a blurry dog")[0]
    # each token frame resized on its own, repeated for the video frames the layout gives it, normalised
    # over the whole video (the layout itself is checked against the VAE in the frame-layout tests)
    per = torch.nn.functional.interpolate(
        ref.view(n_frames, 1, *FRAME), size=(32, 48), mode="bicubic", align_corners=False
    )[:, 0]
    up = per[list(gen.frames.source)]
    up = (up - up.min()) / (up.max() - up.min())
    assert len(gen.frames.source) == 9
    assert_close(wm.expand_as(video), up)
    if halves == "cond":  # never the negative prompt's half
        other, _ = references(trc, book, [0], grid)
        w = torch.zeros(n)
        w[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w, grid))


def test_without_guidance_the_batch_is_the_prompt(pipes):
    pipe = pipes["1.0"]
    trc, book = run(pipe, "a red fox", guidance_scale=1.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1 and book["transformer_blocks.0.attn1"][0].shape[0] == 1
    self_ref, maps = references(trc, book, [0], GRIDS["1.0"])
    tok = pipe.tokenizer
    cols = positions(tok.tokenize("a red fox"), tok.tokenize("fox"))
    assert_close(trc.compute_global_heat_map().compute_word_heat_map("fox").value, maps[cols].mean(0))
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(pipe, halves="uncond"):
            call(pipe, "a red fox", guidance_scale=1.0)


def test_labels_are_the_ids_the_encoder_received(pipes):
    """The T5 stream is labelled where the encoder saw the prompt: three template tokens put in front of
    its ids move every word's columns, and the word maps follow (dense reference at the shifted columns)."""
    pipe = pipes["1.0"]
    template = [5, 6, 7]

    def shift(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        moved = torch.cat([torch.tensor([template] * ids.shape[0]), ids[:, : -len(template)]], dim=1)
        return ((moved, *args[1:]), kwargs) if args else (args, {**kwargs, "input_ids": moved})

    prompt = "a red fox"
    handle = pipe.text_encoder.register_forward_pre_hook(shift, with_kwargs=True)
    try:
        trc, book = run(pipe, prompt)
    finally:
        handle.remove()
    _, maps = references(trc, book, [1], GRIDS["1.0"])
    ghm = trc.compute_global_heat_map()
    tok = pipe.tokenizer
    assert ghm.streams[0].tokens == tok.tokenize(prompt)
    for word in ("red", "fox"):
        cols = [len(template) + c for c in positions(tok.tokenize(prompt), tok.tokenize(word))]
        assert_close(ghm.compute_word_heat_map(word).value, maps[cols].mean(0))


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_frames_and_pipeline_are_left_as_they_were(pipes, version):
    """Traced frames equal untraced ones bit for bit; after a trace, also one left by an exception, the
    processors, hooks, patched methods and the attention-function wrapper are the originals."""
    import diffusers.models.attention_processor as attention_processor

    pipe = pipes[version]
    denoiser = pipe.transformer
    before = {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    hooks = (len(denoiser._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks))
    plain = call(pipe, "a red cat")
    with daami2i.trace(pipe):
        traced = call(pipe, "a red cat")
    assert np.array_equal(plain, traced)
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(pipe):
            call(pipe, "a red cat", num_inference_steps=1)
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")} == before
    assert attention_processor.F is torch.nn.functional
    assert (len(denoiser._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks)) == hooks
    assert "check_inputs" not in vars(pipe) and "encode_prompt" not in vars(pipe)


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_store_estimate_and_experiment(pipes, version, tmp_path):
    pipe = pipes[version]
    trc, _ = run(pipe, "a red fox")
    gen = trc.last_generation
    tokens = next(iter(gen.cross_attention.values())).sums.shape[-1]
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=tokens)
    assert need["self"] == gen.nbytes("self") and need["cross"] == gen.nbytes("cross")
    assert gen.nbytes() == need["total"]
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    ghm = trc.compute_global_heat_map()
    assert again.frames == gen.frames and again.frame_size == FRAME
    assert_close(again.compute_word_heat_map("fox").value, ghm.compute_word_heat_map("fox").value)
    assert_close(
        again.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value, ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value
    )


# -------------------------------------------------------------------------------------- frame layout


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


def changed(pipe, latents, j):
    """Per decoded frame, whether adding 1 to latent frame ``j`` of (B, F, C, H, W) ``latents`` changes it."""
    with torch.no_grad():
        base = pipe.decode_latents(latents)  # (B, C, frames, H, W)
        moved = latents.clone()
        moved[:, j] += 1
        return ((pipe.decode_latents(moved) - base).abs().amax(dim=(0, 1, 3, 4)) > 0).tolist()


def test_decoded_sources_are_what_the_vae_decodes():
    """With the decoder's GroupNorms per frame (the stock ones mix a chunk's frames), a latent frame
    changes exactly the decoded frames from its first one on (causal convolutions), so a video frame's
    source is the latest latent frame that changes it; the stock VAE agrees where each chunk starts."""
    stock = tiny_cogvideox_pipeline(seed=1)
    framewise = tiny_cogvideox_pipeline(seed=1)
    for module in list(framewise.vae.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, PerFrame(child))
    torch.manual_seed(0)
    for frames in range(1, 8):
        latents = torch.randn(1, frames, 4, 4, 6)
        expected = decoded_sources(frames)
        masks = [changed(framewise, latents, j) for j in range(frames)]
        assert len(masks[0]) == len(expected)
        measured = [max(j for j in range(frames) if masks[j][v]) for v in range(len(expected))]
        assert measured == expected, frames
        for j in range(frames):
            assert masks[j] == [s >= j for s in expected]  # causal: nothing before its first frame
        starts = {expected.index(j) for j in range(frames)}
        for j in range(frames):
            first = changed(stock, latents, j).index(True)
            assert first <= expected.index(j) and first in starts | {0}  # a chunk's start, never later


@pytest.mark.parametrize("version, num_frames", [("1.0", 9), ("1.0", 5), ("1.0", 13), ("1.5", 9), ("1.5", 13)])
def test_frame_layout_is_the_run(pipes, version, num_frames):
    """The trace's layout has as many video frames as the pipeline decoded; 1.5 pads 3 latent frames to
    4 at the front and drops the padding before decoding: changing padded latent frame 0 after the last
    step changes no decoded frame, frame 1 every one (its source)."""
    pipe = pipes[version]
    kw = {**KW, "num_frames": num_frames}
    with daami2i.trace(pipe) as trc:
        video = call(pipe, "a red fox", **kw)[0]
    layout = trc.last_generation.frames
    latent_frames = (num_frames - 1) // 4 + 1
    assert layout.video_frames == video.shape[0]
    if version == "1.0":
        assert layout.token_frames == latent_frames and layout.source == tuple(decoded_sources(latent_frames))
        return
    dropped = (-latent_frames) % 2
    padded = latent_frames + dropped
    assert layout.token_frames == padded // 2
    assert layout.source == tuple((dropped + j) // 2 for j in decoded_sources(latent_frames))
    assert ("not decoded" in layout.note) == bool(dropped)

    def bump(frame):
        def callback(p, i, t, tensors):
            latents = tensors["latents"]
            if i == kw["num_inference_steps"] - 1:
                latents = latents.clone()
                latents[:, frame] += 1
            return {"latents": latents}

        return call(pipe, "a red fox", callback_on_step_end=callback, **kw)[0]

    base = call(pipe, "a red fox", **kw)
    moved = [np.abs(bump(j) - base[0]).max(axis=(1, 2, 3)) > 0 for j in range(padded)]
    for j in range(padded):
        latent = j - dropped  # index among the decoded latent frames
        if latent < 0:
            assert not moved[j].any()  # a padding frame is never decoded
        else:
            first = decoded_sources(latent_frames).index(latent)
            assert moved[j][first:].all()  # the frames it is the source of, and later (causal)


def test_a_transformer_called_outside_the_pipeline_assumes_no_padding(pipes):
    pipe = pipes["1.5"]
    latents = torch.randn(1, 4, 4, 4, 6)
    text = torch.randn(1, TEXT, 32)
    with daami2i.trace(pipe) as trc:
        pipe.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]))
    layout = trc.last_generation.frames
    assert layout.video_frames == 16 and layout.source == (0,) * 8 + (1,) * 8 and "outside" in layout.note


# ------------------------------------------------------------------------------------------ refusals


def test_other_pipelines_real_videos_and_bad_sizes_are_refused_clearly(pipes):
    pipe = pipes["1.0"]
    for name in ("CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"):
        other = type(name, (), {"transformer": pipe.transformer, "unet": None})()
        with pytest.raises(daami2i.TraceError, match="text-to-video"):
            daami2i.trace(other)
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(pipe, np.zeros((32, 48, 3), dtype=np.uint8), "a fox")
    with pytest.raises(daami2i.TraceError, match="multiple of the transformer's patch size"):
        with daami2i.trace(pipe):
            call(pipe, "a red fox", height=40)
    assert not any(
        type(m.processor).__module__.startswith("daami2i")
        for m in pipe.transformer.modules()
        if hasattr(m, "processor")
    )


def test_cli_generate_writes_a_video(pipes, tmp_path):
    """`daami2i generate` on CogVideoX: the video, one overlay video per word and the experiment (with its
    frames); `show` draws a word over the saved frames (tests/test_video_trace.py checks the pixels)."""
    import imageio.v3 as iio
    from typer.testing import CliRunner

    from daami2i.cli import app
    from daami2i.video import experiment_frames

    pipes["1.0"].save_pretrained(tmp_path / "model")
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_padding_read_tells_outside_from_not_found():
    """_added_frames: the pipeline's own local when there, None outside a pipeline call, -1 (warned
    about by frame_layout) inside a call that no longer has it (a changed diffusers)."""
    from daami2i.tracing.families.cogvideox import _added_frames

    class Pipe:
        def __call__(self, padded: bool):
            if padded:
                additional_frames = 1  # noqa: F841 - read from this frame by _added_frames
            return _added_frames(self)

    pipe = Pipe()
    assert pipe(True) == 1 and pipe(False) == -1 and _added_frames(pipe) is None

"""AnimateDiff: the spatial layers see each frame as a batch item, the motion modules each pixel
across frames. Every query equals a dense reference built from probabilities recorded by explicit
attention (diffusers' own ``get_attention_scores`` on ``to_q`` / ``to_k``, in float32) in a separate
identical run: self-attention as the block-diagonal (frames x N)^2 matrix of the frames' own blocks,
word maps as the frames' rows stacked, temporal attention as each pixel's (frames x frames) matrix
upsampled the naive way."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import daami2i
from daami2i.testing import tiny_animatediff_pipeline
from reference import column_query, recording, row_query, traced_and_recorded

FRAMES = 4
KW = dict(num_frames=FRAMES, height=64, width=96, num_inference_steps=2)
FRAME = (8, 12)  # one frame's latent grid
GRID = (FRAMES * 8, 12)  # the frames stacked


@pytest.fixture(scope="module")
def pipe():
    return tiny_animatediff_pipeline()


def call(pipe, prompt, **kw):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **{**KW, **kw}).frames


def run(pipe, prompt, trace_kwargs=None, **kw):
    return traced_and_recorded(
        lambda: call(pipe, prompt, **kw),
        recording(pipe.unet, passthrough=True),
        daami2i.trace(pipe, **(trace_kwargs or {})),
    )


def per_frame_up(x: torch.Tensor, size) -> torch.Tensor:
    """(..., F * h, w) -> (..., F * H, W): each frame resized bicubically on its own."""
    lead, (hh, w) = x.shape[:-2], x.shape[-2:]
    h = hh // FRAMES
    y = F.interpolate(x.reshape(-1, 1, h, w).float(), size=(size[0] // FRAMES, size[1]), mode="bicubic")
    return y.reshape(*lead, size[0], size[1])


def assert_close(ours, ref):
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-4)


def kept(n_batch: int, halves: str) -> list[int]:
    """The video rows of the guidance batch [uncond, cond] that daami2i keeps."""
    return {"cond": [1], "uncond": [0], "both": [0, 1]}[halves] if n_batch == 2 else [0]


def dense_blocks(book, trc, videos) -> torch.Tensor:
    """The block-diagonal (F * N)^2 self-attention of the captured spatial self layers: per layer and
    frame, head and half means summed over steps; mean over layers."""
    names = [s.name for s in trc.selected if s.kind == "self"]
    n = FRAME[0] * FRAME[1]
    total = torch.zeros(FRAMES * n, FRAMES * n, dtype=torch.float64)
    for name in names:
        for probs in book[name]:  # (2 * F, heads, N, N): item b * F + f
            p = probs.view(2, FRAMES, *probs.shape[1:])[videos].double().mean(dim=(0, 2))  # (F, N, N)
            for f in range(FRAMES):
                total[f * n : (f + 1) * n, f * n : (f + 1) * n] += p[f]
    return total / len(names)


def dense_words(book, trc, videos) -> torch.Tensor:
    """(77, F * h, w) word maps: per cross layer the head mean (daami2i keeps it for AnimateDiff) of the
    frames' rows stacked, summed over steps, upsampled frame by frame, clamped; mean over layers."""
    names = [s.name for s in trc.selected if s.kind == "cross"]
    maps = []
    for name in names:
        acc = None
        for probs in book[name]:  # (2 * F, heads, N_r, 77)
            p = probs.view(2, FRAMES, *probs.shape[1:])[videos].double().mean(dim=(0, 2))  # (F, N_r, 77)
            acc = p if acc is None else acc + p
        f_, n_r, t = acc.shape
        h = int(round((n_r * FRAME[0] / FRAME[1]) ** 0.5))
        stacked = acc.permute(2, 0, 1).reshape(t, FRAMES * h, n_r // h)  # (77, F * h_r, w_r)
        maps.append(per_frame_up(stacked, GRID).clamp(min=0))
    return torch.stack(maps).mean(0)


def dense_temporal(book, trc, videos, weights, frame, direction) -> torch.Tensor:
    """The (F,) curve of a region: every pixel's (F x F) motion-module matrix, head and half means
    summed over steps; its row (attends_to) or column (attended_by) ``frame`` upsampled naively to one
    frame's grid, weighted by the region; over layers, the mean."""
    names = [s.name for s in trc.selected if s.kind == "temporal"]
    g = weights.double().flatten() / weights.sum()
    total = torch.zeros(FRAMES, dtype=torch.float64)
    for name in names:
        acc = None
        for probs in book[name]:  # (2 * h_r * w_r, heads, F, F): item b * h_r * w_r + pixel
            p = probs.view(2, -1, *probs.shape[1:])[videos].double().mean(dim=(0, 2))  # (pixels, F, F)
            acc = p if acc is None else acc + p
        part = acc[:, frame, :] if direction == "attends_to" else acc[:, :, frame]  # (pixels, F)
        n_r = part.shape[0]
        h = int(round((n_r * FRAME[0] / FRAME[1]) ** 0.5))
        up = F.interpolate(part.T.reshape(FRAMES, 1, h, n_r // h), size=FRAME, mode="bicubic")[:, 0]  # (F, 8, 12)
        total += up.reshape(FRAMES, -1) @ g
    return total / len(names)


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_every_query_matches_the_recorded_attention(pipe, halves):
    prompt = "a red fox runs on snow"
    trc, book = run(pipe, prompt, dict(halves=halves))
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.frames.source == (0, 1, 2, 3)
    videos = kept(2, halves)
    assert all(p.shape[0] == 2 * FRAMES for n, ps in book.items() if ".attentions." in n for p in ps)
    self_ref = dense_blocks(book, trc, videos)
    ghm = trc.compute_global_heat_map()
    n = FRAME[0] * FRAME[1]
    w = torch.zeros(FRAMES * n)
    w[[2 * n + 5, 2 * n + 40]] = 1  # pixels 5 and 40 of frame 2
    assert_close(ghm.compute_pixel_heat_map([5, 40], frame=2).value, column_query(self_ref, w, GRID))
    assert_close(ghm.compute_pixel_heat_map([5, 40], "attends_to", frame=2).value, row_query(self_ref, w, GRID))
    box = torch.zeros(GRID)
    box[8:12, 2:6] = 1  # frame 1's box
    box[16:20, 2:6] = 1  # and frame 2's
    assert_close(ghm.compute_bbox_heat_map(2, 0, 5, 3, frame=[1, 2]).value, column_query(self_ref, box, GRID))
    # a region in one frame is tied to nothing in another frame: its blocks are the frame's own
    assert float(ghm.compute_pixel_heat_map(5, frame=0).value[8:].abs().max()) == 0.0
    for direction in ("attends_to", "attended_by"):
        region = torch.zeros(FRAME)
        region[2:5, 3:7] = 1
        ours = ghm.compute_temporal_attention(box=(3, 2, 6, 4), frame=1, direction=direction)
        torch.testing.assert_close(
            ours.double(), dense_temporal(book, trc, videos, region, 1, direction), atol=1e-6, rtol=1e-4
        )
    if halves == "uncond":
        return
    rows = [1 + i for i, t in enumerate(pipe.tokenizer.tokenize(prompt)) if t == "fox</w>"]
    assert rows
    maps = dense_words(book, trc, [1] if halves == "cond" else [0, 1])
    wm = ghm.compute_word_heat_map("fox")
    assert_close(wm.value, maps[rows].mean(0))
    assert wm.heatmap.shape == (FRAMES, *FRAME)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, wm.value, GRID))
    if halves == "cond":  # never the negative prompt's half
        other = dense_blocks(book, trc, [0])
        w0 = torch.zeros(FRAMES * n)
        w0[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w0, GRID))


def test_store_estimate_experiment_and_refusals(pipe, tmp_path):
    trc, _ = run(pipe, "a red fox")
    gen = trc.last_generation
    need = trc.estimate_nbytes(gen.latent_size, 1, n_tokens=77, frames=FRAMES)
    assert need["self"] == gen.nbytes("self") and need["cross"] == gen.nbytes("cross")
    n = FRAME[0] * FRAME[1]
    blocks = FRAMES * n * n * 4
    temporal = sum(FRAMES * FRAMES * 4 * (8 // f) * (12 // f) for f in (1, 2, 4))  # motion modules at 3 resolutions
    assert gen.nbytes("self") == blocks + temporal
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    ghm = trc.compute_global_heat_map()
    assert torch.equal(
        again.compute_bbox_heat_map(1, 1, 4, 4, frame=3).value, ghm.compute_bbox_heat_map(1, 1, 4, 4, frame=3).value
    )
    assert torch.equal(again.compute_temporal_attention(7, frame=0), ghm.compute_temporal_attention(7, frame=0))
    with pytest.raises(daami2i.ConfigError, match="one block per frame"):
        daami2i.trace(pipe, self_pool=2)
    with pytest.raises(daami2i.QueryError, match="exactly one of"):
        ghm.compute_temporal_attention(frame=0)
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(pipe, np.zeros((64, 96, 3), dtype=np.uint8), "a fox")


def test_images_have_no_temporal_attention():
    from daami2i.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline()
    with daami2i.trace(sd) as trc:
        sd("a red cat", num_inference_steps=1, height=64, width=64)
    with pytest.raises(daami2i.QueryError, match="no temporal attention"):
        trc.compute_global_heat_map().compute_temporal_attention(0, frame=0)


def test_cli_generate_writes_the_video(pipe, tmp_path: Any):
    from typer.testing import CliRunner

    from daami2i.cli import app

    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red fox", "-m", str(tmp_path / "model"), "--steps", "1", "--height", "64", "--width", "96"]
    res = CliRunner().invoke(app, [*args, "--num-frames", "4", "--video-format", "png", "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.frames.video_frames == 4 and sorted(exp.generation.temporal) == [1, 2, 4]

"""HunyuanVideo 1.5 text to video: joint ``[video, text]`` attention in the dual-stream blocks (the token
refiner's never traced), the text part reordered by the transformer per item and call (valid image, ByT5
and Qwen tokens first, then their padding), the token frames stacked top to bottom. Every query equals a
dense reference from probabilities recorded by explicit attention (RMS-normed q and k, RoPE on the video
part written out here, the padding keys masked as the transformer masks them) in a separate identical
run, read at the model's own (reordered) columns of each call; the prompt's pass is never the negative
prompt's (the guider runs them as separate calls), nor averaged with it; the word labels are the ids the
Qwen encoder received, past the dropped template prefix."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import daami2i
from daami2i.heatmaps.frames import FrameLayout
from daami2i.testing.hunyuanvideo15 import (
    BYT5_LENGTH,
    IMAGE_TOKENS,
    QWEN_LENGTH,
    tiny_hunyuanvideo15_pipeline,
    video_token_grid,
)
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

KW = dict(num_frames=9, height=32, width=48, num_inference_steps=2)
FRAME = (2, 3)  # tokens of one frame: 32 x 48 px are 2 x 3 latents (space by 16), patch 1
GRID = (3 * 2, 3)  # 9 frames: 3 latent frames, stacked
N = GRID[0] * GRID[1]
TEXT = IMAGE_TOKENS + BYT5_LENGTH + QWEN_LENGTH  # the text part of every joint call
SOURCE = (0, 1, 1, 1, 1, 2, 2, 2, 2)  # per video frame of 9, its token frame (causal VAE, time by 4)
PROMPT = 'a red fox holds a sign "HELLO"'  # quoted: glyph text for ByT5, so the Qwen tokens move
LAYERS = ("transformer_blocks.0.attn", "transformer_blocks.1.attn")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) rotated pairwise (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) by (S, D) tables whose pairs
    share a frequency, written out from the formula."""
    c, s = cos[None, :, None, 0::2].double(), sin[None, :, None, 0::2].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


class Recorder15:
    """Records a joint layer's softmax probabilities (B, H, N + T, N + T) in float64 in the model's own
    ``[video, reordered text]`` order, the padding keys masked; the original processor computes the output."""

    def __init__(self, name: str, book: dict, original: Any) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        with torch.no_grad():

            def heads(x):
                return x.unflatten(-1, (attn.heads, -1))  # (B, S, H, D)

            n = hidden_states.shape[1]
            q = attn.norm_q(heads(attn.to_q(hidden_states))).double()
            k = attn.norm_k(heads(attn.to_k(hidden_states))).double()
            q, k = rotate(q, *image_rotary_emb), rotate(k, *image_rotary_emb)
            cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))).double()
            ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))).double()
            q, k = torch.cat([q, cq], dim=1).transpose(1, 2), torch.cat([k, ck], dim=1).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            valid = torch.cat([torch.ones(q.shape[0], n, dtype=torch.bool), attention_mask.bool()], dim=1)
            scores = scores.masked_fill(~valid[:, None, None, :], -torch.inf)  # padding keys
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@contextmanager
def recording(transformer):
    """{layer: [probs per call]} and, under "byt5", the valid ByT5 tokens of each transformer call."""
    mods = {n: m for n, m in transformer.named_modules() if n in LAYERS}
    with recorders(mods, Recorder15) as book:
        handle = transformer.register_forward_pre_hook(
            lambda _m, _a, kw: book["byt5"].append(int(kw["encoder_attention_mask_2"].sum())), with_kwargs=True
        )
        try:
            yield book
        finally:
            handle.remove()


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuanvideo15_pipeline()


def call(pipe, prompt, **kw):
    kw = {**KW, **kw}
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


def qwen_probs(book, name, i):
    """Call ``i``'s probabilities with the keys [video, Qwen positions 0..L1-1]: in the model's order the
    Qwen tokens follow the call's valid ByT5 tokens (no image token is valid in text to video)."""
    p, n2 = book[name][i], book["byt5"][i]
    return torch.cat([p[..., :N], p[..., N + n2 : N + n2 + QWEN_LENGTH]], dim=-1)


def references(book, calls):
    """Dense self-attention (N x N) and Qwen token maps (L1, rows, cols) of the chosen calls (batch 1 each)."""
    picked = {name: [qwen_probs(book, name, i) for i in sorted(calls)] for name in LAYERS}
    selfs = {name: [p[:, :, :N, :N] for p in ps] for name, ps in picked.items()}
    crosses = {name: [p[:, :, :N, N:] for p in ps] for name, ps in picked.items()}
    layers = [(name, 1) for name in LAYERS]
    return dense_self(selfs, layers, GRID, GRID, [0]), dense_cross(crosses, layers, GRID, GRID, [0])


def prompt_start(pipe, prompt):
    """Where the prompt's ids begin among the Qwen keys: in the templated ids, minus the dropped prefix."""
    messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    mine = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i : i + len(mine)] == mine)
    return at - pipe.prompt_template_encode_start_idx


def word_columns(pipe, prompt, word):
    tok = pipe.tokenizer
    toks, pieces = tok.tokenize(prompt), tok.tokenize(" " + word)
    at = [
        i + j
        for i in range(len(toks) - len(pieces) + 1)
        if toks[i : i + len(pieces)] == pieces
        for j in range(len(pieces))
    ]
    return [prompt_start(pipe, prompt) + c for c in at]


# ------------------------------------------------------------------------- queries vs the reference


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_every_query_matches_the_recorded_attention(pipe, halves):
    trc, book = run(pipe, PROMPT, dict(halves=halves), negative_prompt="a blurry dog")
    gen = trc.last_generation
    assert sorted(trc.attention_layers) == sorted(LAYERS)  # the token refiner is no site
    assert gen.grid_size == GRID and gen.image_size == (3 * 32, 48) and gen.steps_captured == [0, 1]
    assert not gen.cfg and gen.n_images == 1  # the guider: separate calls, never a batch
    assert len(book[LAYERS[0]]) == 4  # two steps, each the prompt's call then the negative prompt's
    assert book[LAYERS[0]][0].shape == (1, 2, N + TEXT, N + TEXT)
    assert book["byt5"][0] > 0 and book["byt5"][1] == 0  # the glyph text moves the prompt's Qwen tokens
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
    # the padding is masked: no query gives it any probability (model order: valid tokens, then padding)
    first = book[LAYERS[0]][0]
    valid = N + int((first[0, 0, 0, N:] > 0).sum())
    assert float(first[..., valid:].abs().max()) == 0.0 and book["byt5"][0] < valid - N < TEXT
    if halves == "uncond":
        return  # the prompt's words are not the negative prompt's keys
    stream = gen.streams[0]
    ids = pipe.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert stream["stop_row"] - stream["first_row"] == len(ids) + 1  # word columns: prompt + <|im_end|>
    cols = word_columns(pipe, PROMPT, "fox")
    assert cols and cols[0] == len(pipe.tokenizer.tokenize("a red"))  # the dropped prefix leaves the prompt first
    wm = ghm.compute_word_heat_map("fox")
    ref = maps[cols].mean(0)  # (stacked rows, cols)
    assert_close(wm.value, ref)
    assert wm.heatmap.shape == (3, *FRAME)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, ref, GRID))
    only = torch.zeros_like(ref)
    only[2:4] = ref[2:4]  # frame=2: the guide's weight in latent frame 1 only
    assert_close(ghm.compute_guided_heat_map(wm, frame=2).value, column_query(self_ref, only, GRID))
    video = call(pipe, PROMPT, negative_prompt="a blurry dog")[0]
    up = torch.nn.functional.interpolate(ref.view(3, 1, 2, 3), size=(32, 48), mode="bicubic", align_corners=False)
    up = up[list(SOURCE), 0]
    assert_close(wm.expand_as(video), (up - up.min()) / (up.max() - up.min()))
    if halves == "cond":  # never the negative prompt's call
        other, _ = references(book, {1, 3})
        w = torch.zeros(N)
        w[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w, GRID))
        # reading the model's columns without undoing its reordering would give other word maps
        shifted = {n: [book[n][i][..., :N, N : N + QWEN_LENGTH] for i in (0, 2)] for n in LAYERS}
        wrong = dense_cross(shifted, [(n, 1) for n in LAYERS], GRID, GRID, [0])
        assert not torch.allclose(wm.value, wrong[cols].mean(0), atol=1e-4)


def test_without_guidance_each_step_is_one_call():
    """A guider with guidance_scale 1 runs one call per step (no negative prompt); halves='uncond' is
    refused by name."""
    pipe = tiny_hunyuanvideo15_pipeline(guidance_scale=1.0)
    trc, book = run(pipe, "a red fox")
    assert len(book[LAYERS[0]]) == 2 and book[LAYERS[0]][0].shape[0] == 1
    _, maps = references(book, {0, 1})
    cols = word_columns(pipe, "a red fox", "fox")
    assert_close(trc.compute_global_heat_map().compute_word_heat_map("fox").value, maps[cols].mean(0))
    with pytest.raises(daami2i.TraceError, match="guidance_scale > 1"):
        with daami2i.trace(pipe, halves="uncond"):
            call(pipe, "a red fox")


def test_labels_are_the_ids_the_encoder_received(pipe):
    """With the published prefix length (108, for the real tokenizer) the tiny tokenizer's longer prefix
    leaves template tokens before the prompt among the Qwen keys: the labels come from the received ids
    past the dropped positions, so the word maps sit at the shifted columns."""
    saved = pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length
    prefix = saved[0]
    pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length = prefix - 12, QWEN_LENGTH
    try:
        prompt = "a red fox"
        trc, book = run(pipe, prompt)
        assert prompt_start(pipe, prompt) == 12
        _, maps = references(book, {0, 2})
        ghm = trc.compute_global_heat_map()
        assert ghm.streams[0].tokens == pipe.tokenizer.tokenize(prompt)
        for word in ("red", "fox"):
            cols = word_columns(pipe, prompt, word)
            assert cols and min(cols) >= 12
            assert_close(ghm.compute_word_heat_map(word).value, maps[cols].mean(0))
    finally:
        pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length = saved


def test_text_relations_match_the_joint_softmax(pipe):
    """relations text->image / text->text: the prompt's Qwen tokens as queries of the joint layers, their
    probabilities over the video keys and over the prompt's text keys (at the model's reordered columns)."""
    relations = ["image->text", "image->image", "text->image", "text->text"]
    trc, book = run(pipe, PROMPT, dict(relations=relations))
    ghm = trc.compute_global_heat_map()

    def qwen_rows(i, name):
        p, n2 = book[name][i][0].mean(0), book["byt5"][i]  # (S, S) head mean
        keep = list(range(N)) + list(range(N + n2, N + n2 + QWEN_LENGTH))
        return p[keep][:, keep]

    per_layer = [sum(qwen_rows(i, name) for i in (0, 2)) for name in LAYERS]  # the prompt's calls
    q = [N + c for c in word_columns(pipe, PROMPT, "fox")]
    ref = torch.stack([p[q][:, :N].mean(0).reshape(GRID) for p in per_layer]).mean(0)
    got = ghm.compute_text_query_heat_map("fox")
    assert_close(got.value, ref)
    assert got.heatmap.shape == (3, *FRAME)
    n_kept = len(pipe.tokenizer.tokenize(PROMPT))  # the prompt's tokens
    kept = [N + prompt_start(pipe, PROMPT) + c for c in range(n_kept)]
    tokens, tt = ghm.text_to_text()
    assert tokens[:3] == ["a", "red", "f"] and len(tokens) == len(kept)
    assert_close(tt, torch.stack([p[kept][:, kept] for p in per_layer]).mean(0))


# -------------------------------------------------------------------------------- hygiene and store


def test_frames_and_pipeline_are_left_as_they_were(pipe):
    """Traced frames equal untraced ones bit for bit; after a trace, also one left by an exception, the
    processors (the token refiner's too), hooks, patched methods and the attention-function wrapper are
    the originals."""
    import diffusers.models.attention_processor as attention_processor
    import diffusers.models.transformers.transformer_hunyuan_video15 as module
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    denoiser = pipe.transformer
    before = {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    encoders = (denoiser, pipe.text_encoder, pipe.text_encoder_2)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in encoders]
    plain = call(pipe, PROMPT)
    with daami2i.trace(pipe):
        traced = call(pipe, PROMPT)
    assert np.array_equal(plain, traced)
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(pipe):
            call(pipe, PROMPT, num_inference_steps=1)
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")} == before
    assert module.dispatch_attention_fn is dispatch_attention_fn
    assert attention_processor.F is torch.nn.functional  # the token refiner's processor module
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in encoders] == hooks
    assert "check_inputs" not in vars(pipe) and "set_timesteps" not in vars(pipe.scheduler)


def test_store_estimate_and_experiment(pipe, tmp_path):
    trc, _ = run(pipe, PROMPT, dict(relations=["image->text", "image->image", "text->image", "text->text"]))
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
    # the published size: 121 frames of 480 x 848 (31 latent frames of 30 x 53 tokens), pooled by "auto"
    auto = daami2i.trace(pipe)
    published = auto.estimate_nbytes(auto.adapter.default_latent(pipe.transformer), 1, n_tokens=20, frames=31)
    assert published["total"] <= 2**30


# ------------------------------------------------------------------------------------------ frames


def test_frame_layout_is_what_the_vae_decodes():
    """The decoder is causal (causal 3-D convolutions, RMS norms over channels): a latent frame changes
    no decoded frame before its first one and every frame whose source it is, so a video frame's source,
    the latest latent frame that changes it, is FrameLayout.causal's; the trace's layout of a run is the
    same and has as many frames as the pipeline decoded."""
    pipe = tiny_hunyuanvideo15_pipeline(seed=1)
    torch.manual_seed(0)
    for frames in range(1, 6):
        latents = torch.randn(1, 4, frames, 2, 3)
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
        for j in range(frames):
            assert not any(m for m, s in zip(masks[j], expected, strict=True) if s < j), frames
            assert all(m for m, s in zip(masks[j], expected, strict=True) if s == j), frames
    for num_frames in (1, 5, 13):
        with daami2i.trace(pipe) as trc:
            video = call(pipe, "a red fox", num_frames=num_frames, num_inference_steps=1)[0]
        layout = trc.last_generation.frames
        latent_frames = video_token_grid(pipe, num_frames, 32, 48)[0]
        assert layout.video_frames == video.shape[0] == num_frames
        assert layout.source == FrameLayout.causal(latent_frames, 2).source


# ------------------------------------------------------------------------------------------ refusals


def test_image_to_video_real_videos_and_bad_calls_are_refused_clearly(pipe):
    other = type("HunyuanVideo15ImageToVideoPipeline", (), {"transformer": pipe.transformer, "unet": None})()
    with pytest.raises(daami2i.TraceError, match="1.5 text-to-video"):
        daami2i.trace(other)
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(pipe, np.zeros((32, 48, 3), dtype=np.uint8), "a fox")
    latents = torch.randn(1, 9, 2, 2, 3)
    text, mask = torch.randn(1, QWEN_LENGTH, 24), torch.ones(1, QWEN_LENGTH)
    glyph, glyph_mask = torch.randn(1, BYT5_LENGTH, 16), torch.zeros(1, BYT5_LENGTH)
    kw = dict(
        hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text, encoder_attention_mask=mask,
        encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask,
    )  # fmt: skip
    with pytest.raises(daami2i.TraceError, match="image embeddings"):
        with daami2i.trace(pipe):
            pipe.transformer(**kw, image_embeds=torch.ones(1, IMAGE_TOKENS, 8))
    with pytest.raises(daami2i.TraceError, match="encoder_attention_mask_2"):
        with daami2i.trace(pipe):
            pipe.transformer(**{**kw, "encoder_attention_mask_2": None}, image_embeds=torch.zeros(1, IMAGE_TOKENS, 8))
    with daami2i.trace(pipe, self_pool=1) as trc:  # a bare call in text to video: traced
        pipe.transformer(**kw, image_embeds=torch.zeros(1, IMAGE_TOKENS, 8))
    assert trc.last_generation.grid_size == (4, 3)
    assert not any(
        type(m.processor).__module__.startswith("daami2i")
        for m in pipe.transformer.modules()
        if hasattr(m, "processor")
    )
    assert daami2i.trace(tiny_hunyuanvideo15_pipeline()).adapter.name == "hunyuanvideo15"


def test_cli_generate_writes_a_hunyuanvideo15_video(tmp_path):
    """`daami2i generate` on HunyuanVideo 1.5, whose call takes no guidance_scale (its guider holds it):
    --guidance sets the guider's scale, and the video, word videos and experiment are written."""
    from typer.testing import CliRunner

    from daami2i.cli import app
    from daami2i.testing import tiny_hunyuanvideo15_pipeline

    pipe = tiny_hunyuanvideo15_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red fox", "-m", str(tmp_path / "model"), "--steps", "1", "--height", "32", "--width", "48"]
    res = CliRunner().invoke(
        app, [*args, "--num-frames", "5", "--guidance", "3", "--video-format", "png", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.frames.video_frames == 5 and "fox" in exp.compute_global_heat_map().words

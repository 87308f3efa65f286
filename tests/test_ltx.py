"""LTX-Video text to video (``LTXPipeline``): video self-attention (``attn1``) and a masked
cross-attention to T5 (``attn2``) per block, the packed tokens traced as the latent frames stacked top
to bottom. Every query equals a dense reference from probabilities recorded by explicit attention
(RMS-normed q and k, the rotary embedding written out here, the padding mask added) in a separate
identical run; the conditional half is the prompt's, never the negative prompt's; the frame layout
is checked against what the VAE decodes."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_ltx_pipeline
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
KW = dict(num_frames=17, height=64, width=96, num_inference_steps=2, max_sequence_length=TEXT)
FRAME = (2, 3)  # tokens of one frame: 64 x 96 px are 2 x 3 latents (the VAE scales by 32), patch 1
GRID = (3 * 2, 3)  # 17 frames: 3 latent frames (time by 8), stacked
SOURCE = (0,) + (1,) * 8 + (2,) * 8  # per video frame of 17, its latent frame


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, S, D) rotated pairwise (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) by (B, S, D) tables whose
    pairs share a frequency, written out from the formula."""
    c, s = cos[..., 0::2].double(), sin[..., 0::2].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


class LTXRecorder:
    """Records a layer's softmax probabilities (B, H, N, keys) in float64 (and, under ``name + "#raw"``,
    those a softmax without the padding mask would give), then lets the original processor compute the
    output (a recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original: Any) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        with torch.no_grad():
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q = attn.norm_q(attn.to_q(hidden_states)).double()  # RMS norm across heads, then split
            k = attn.norm_k(attn.to_k(context)).double()
            if image_rotary_emb is not None:
                q, k = rotate(q, *image_rotary_emb), rotate(k, *image_rotary_emb)
            q = q.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = k.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            self.book[self.name + "#raw"].append(torch.softmax(scores, dim=-1))
            if attention_mask is not None:  # (B, 1, T) additive: 0 kept, -10000 padding
                scores = scores + attention_mask.double()[:, None]
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@contextmanager
def recording(transformer):
    mods = {
        n: m
        for n, m in transformer.named_modules()
        if n.startswith("transformer_blocks.") and n.endswith(("attn1", "attn2"))
    }
    with recorders(mods, LTXRecorder) as book:
        yield book


@pytest.fixture(scope="module")
def ltx():
    return tiny_ltx_pipeline()


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


def references(trc, book, rows, suffix=""):
    """Dense self-attention (N x N) and token maps (T, rows, cols) of the chosen batch rows."""
    picked = {n: book[n + suffix] for n in book if "#" not in n}
    selfs = [(s.name, 1) for s in trc.sites if s.kind == "self"]
    crosses = [(s.name, 1) for s in trc.sites if s.kind == "cross"]
    # the helpers take the token grid as the "latent" of factor-1 layers (patch 1)
    return dense_self(picked, selfs, GRID, GRID, rows), dense_cross(picked, crosses, GRID, GRID, rows)


def positions(tokens, pieces):
    n = len(pieces)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n)]


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_every_query_matches_the_recorded_attention(ltx, halves):
    prompt = "a red fox runs on snow"
    trc, book = run(ltx, prompt, dict(halves=halves), negative_prompt="a blurry dog")
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.image_size == (3 * 64, 96) and gen.steps_captured == [0, 1]
    assert gen.cfg and gen.n_images == 1
    assert len(book["transformer_blocks.0.attn1"]) == 2  # one call per step, the batch [uncond, cond]
    assert book["transformer_blocks.0.attn1"][0].shape == (2, 2, 18, 18)
    assert book["transformer_blocks.0.attn2"][0].shape == (2, 2, 18, TEXT)
    rows = {"cond": [1], "uncond": [0], "both": [0, 1]}[halves]
    self_ref, maps = references(trc, book, rows)
    ghm = trc.compute_global_heat_map()
    assert ghm.frame_size == FRAME and ghm.frames.source == SOURCE
    n, per = GRID[0] * GRID[1], FRAME[0] * FRAME[1]
    w = torch.zeros(n)
    w[[2 * per + 0, 2 * per + 4]] = 1  # pixel ids of one frame, in latent frame 2 (video frames 9-16)
    assert_close(ghm.compute_pixel_heat_map([0, 4], frame=9).value, column_query(self_ref, w, GRID))
    assert_close(ghm.compute_pixel_heat_map([0, 4], "attends_to", frame=-1).value, row_query(self_ref, w, GRID))
    w = torch.zeros(n)
    w[[1, per + 1, 2 * per + 1]] = 1  # frame=None: the same pixel in every frame
    assert_close(ghm.compute_pixel_heat_map(1).value, column_query(self_ref, w, GRID))
    assert_close(ghm.compute_pixel_heat_map(1, "attends_to").value, row_query(self_ref, w, GRID))
    box = torch.zeros(GRID)
    box[2:4, 0:2] = 1  # video frames 1-8 come from latent frame 1: its left 2 x 2 tokens
    for frame in (1, 8, range(2, 6)):
        assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=frame).value, column_query(self_ref, box, GRID))
    box[4:6, 0:2] = 1  # a frame range spanning latent frames 1 and 2
    assert_close(ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=range(5, 17)).value, column_query(self_ref, box, GRID))
    assert_close(
        ghm.compute_bbox_heat_map(0, 0, 1, 1, "attends_to", frame=range(5, 17)).value, row_query(self_ref, box, GRID)
    )
    tri = triangle((64, 96))  # a polygon in the pixels of video frame 0
    cover = torch.zeros(GRID)
    cover[0:2] = block_mean(inside_polygon(tri, (64, 96)), FRAME)
    assert_close(ghm.compute_contour_heat_map(tri, 64, 96, frame=0).value, column_query(self_ref, cover, GRID))
    pm = ghm.compute_pixel_heat_map(0, frame=0)
    assert pm.heatmap.shape == (3, 2, 3) and torch.equal(pm.heatmap[2], pm.value[4:6])
    assert torch.equal(pm.frame(12).value, pm.value[4:6])  # video frame 12 shows latent frame 2
    with pytest.raises(daami2i.QueryError, match="outside this video's 17 frames"):
        ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=17)
    with pytest.raises(daami2i.QueryError, match="pixel ids must lie in"):
        ghm.compute_pixel_heat_map(7, frame=0)  # a stacked id is not an id of one frame
    # the T5 padding is masked: its keys get exactly nothing, and the kept columns are prompt + </s>
    tok = ltx.tokenizer
    ids = tok(prompt)["input_ids"]
    cross = book["transformer_blocks.0.attn2"][0]
    assert float(cross[1, :, :, len(ids) :].abs().max()) == 0.0
    assert float(book["transformer_blocks.0.attn2#raw"][0][1, :, :, len(ids) :].sum(-1).min()) > 1e-3
    if halves == "uncond":
        return  # the prompt's words are not the negative prompt's keys
    stream = gen.streams[0]
    assert stream["stop_row"] - stream["first_row"] == len(ids)  # word columns: never padding
    cols = positions(tok.tokenize(prompt), tok.tokenize("fox"))
    assert cols
    wm = ghm.compute_word_heat_map("fox")
    ref = maps[cols].mean(0)  # (stacked rows, cols)
    assert_close(wm.value, ref)
    _, unmasked = references(trc, book, rows, "#raw")  # a trace that ignored the mask would give these
    assert not torch.allclose(wm.value.double(), unmasked[cols].mean(0).double(), atol=1e-4)
    assert wm.heatmap.shape == (3, *FRAME)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, ref, GRID))
    only = torch.zeros_like(ref)
    only[2:4] = ref[2:4]  # frame=3: the guide's weight in latent frame 1 only
    assert_close(ghm.compute_guided_heat_map(wm, frame=3).value, column_query(self_ref, only, GRID))
    # the video frames' maps: each latent frame resized on its own, repeated for its video frames,
    # normalised over the whole video
    video = call(ltx, prompt, negative_prompt="a blurry dog")[0]
    up = torch.nn.functional.interpolate(ref.view(3, 1, 2, 3), size=(64, 96), mode="bicubic", align_corners=False)
    up = up[list(SOURCE), 0]
    up = (up - up.min()) / (up.max() - up.min())
    assert_close(wm.expand_as(video), up)
    if halves == "cond":  # never the negative prompt's half
        other, _ = references(trc, book, [0])
        w = torch.zeros(n)
        w[0] = 1
        assert not torch.allclose(ghm.compute_pixel_heat_map(0, frame=0).value, column_query(other, w, GRID))


def test_guidance_is_one_batch_uncond_then_cond(ltx):
    """The transformer sees one call per step whose text is ``[negative; prompt]`` (as encode_prompt
    returns them) with their masks; guidance_scale <= 1 runs the prompt alone."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(), kwargs["encoder_attention_mask"].clone()))

    handle = ltx.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call(ltx, "a red fox", negative_prompt="a blurry dog")
    finally:
        handle.remove()
    with torch.no_grad():  # as the pipeline runs it
        pos, pos_mask, neg, neg_mask = ltx.encode_prompt("a red fox", "a blurry dog", max_sequence_length=TEXT)
    assert len(seen) == 2
    for context, mask in seen:
        assert torch.equal(context, torch.cat([neg, pos])) and torch.equal(mask, torch.cat([neg_mask, pos_mask]))
    trc, book = run(ltx, "a red fox", guidance_scale=1.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1 and book["transformer_blocks.0.attn1"][0].shape[0] == 1
    _, maps = references(trc, book, [0])
    cols = positions(ltx.tokenizer.tokenize("a red fox"), ltx.tokenizer.tokenize("fox"))
    assert_close(trc.compute_global_heat_map().compute_word_heat_map("fox").value, maps[cols].mean(0))
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(ltx, halves="uncond"):
            call(ltx, "a red fox", guidance_scale=1.0)


def test_labels_are_the_ids_the_encoder_received(ltx):
    """The T5 stream is labelled where the encoder saw the prompt: three template tokens put in front of
    its ids (and the mask widened to match) move every word's columns, and the word maps follow."""
    template = [5, 6, 7]

    def shift(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        moved = torch.cat([torch.tensor([template] * ids.shape[0]), ids[:, : -len(template)]], dim=1)
        return ((moved, *args[1:]), kwargs) if args else (args, {**kwargs, "input_ids": moved})

    def widen(_module, args, kwargs):
        mask = kwargs["encoder_attention_mask"]
        wide = torch.cat([torch.ones_like(mask[:, : len(template)]), mask[:, : -len(template)]], dim=1)
        return args, {**kwargs, "encoder_attention_mask": wide}

    prompt = "a red fox"
    handles = [
        ltx.text_encoder.register_forward_pre_hook(shift, with_kwargs=True),
        ltx.transformer.register_forward_pre_hook(widen, with_kwargs=True),
    ]
    try:
        trc, book = run(ltx, prompt)
    finally:
        for handle in handles:
            handle.remove()
    _, maps = references(trc, book, [1])
    ghm = trc.compute_global_heat_map()
    tok = ltx.tokenizer
    assert ghm.streams[0].tokens == tok.tokenize(prompt)
    for word in ("red", "fox"):
        cols = [len(template) + c for c in positions(tok.tokenize(prompt), tok.tokenize(word))]
        assert_close(ghm.compute_word_heat_map(word).value, maps[cols].mean(0))


@pytest.mark.parametrize("version", ["0.9", "0.9.1", "0.9.5"])
def test_frames_and_pipeline_are_left_as_they_were(version):
    """Traced frames equal untraced ones bit for bit (also with the timestep-conditioned decoders of
    LTX-Video 0.9.1 and 0.9.5); after a trace, also one left by an exception, the processors, hooks,
    patched methods and the attention-function wrapper are the originals."""
    import diffusers.models.transformers.transformer_ltx as transformer_ltx

    pipe = tiny_ltx_pipeline(version=version)
    kw = dict(decode_timestep=0.05, decode_noise_scale=0.025) if version != "0.9" else {}
    denoiser = pipe.transformer
    dispatch = transformer_ltx.dispatch_attention_fn
    before = {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    hooks = (len(denoiser._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks))
    plain = call(pipe, "a red cat", **kw)
    with daami2i.trace(pipe):
        traced = call(pipe, "a red cat", **kw)
    assert np.array_equal(plain, traced)
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(pipe):
            call(pipe, "a red cat", num_inference_steps=1)
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "set_processor")} == before
    assert transformer_ltx.dispatch_attention_fn is dispatch
    assert (len(denoiser._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks)) == hooks
    assert "check_inputs" not in vars(pipe) and "encode_prompt" not in vars(pipe)


def test_store_estimate_and_experiment(ltx, tmp_path):
    trc, _ = run(ltx, "a red fox")
    gen = trc.last_generation
    tokens = next(iter(gen.cross_attention.values())).sums.shape[-1]
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=tokens, frames=3)
    assert need["self"] == gen.nbytes("self") == 18 * 18 * 4 and need["cross"] == gen.nbytes("cross")
    assert gen.nbytes() == need["total"]
    trc.to_experiment(tmp_path / "exp")
    again = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    ghm = trc.compute_global_heat_map()
    assert again.frames == gen.frames and again.frame_size == FRAME
    assert_close(again.compute_word_heat_map("fox").value, ghm.compute_word_heat_map("fox").value)
    assert_close(
        again.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value, ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=3).value
    )


def test_published_size_store():
    """LTX-Video 0.9 at 480 x 704, 161 frames: 21 latent frames of 15 x 22 (6,930 tokens); the default
    store (auto pooling) stays under 1 GiB, the dense one is N^2 x 4 bytes."""
    trc = daami2i.trace(tiny_ltx_pipeline())
    latent = trc.adapter.default_latent(trc.unet)
    assert latent == (21 * 15, 22)
    dense = daami2i.trace(tiny_ltx_pipeline(), self_pool=1).estimate_nbytes(latent, 1, 21, frames=21)
    assert dense["self"] == 6930**2 * 4
    assert trc.estimate_nbytes(latent, 1, 21, frames=21)["total"] <= 2**30


# ------------------------------------------------------------------------------ token order, frames


def test_tokens_are_frame_major(ltx):
    """Changing one latent value at (frame, row, column) of the unpacked (B, C, F, H, W) latents changes
    exactly token ``f * H * W + row * W + col`` of the first block's attn1 input."""
    seen = []
    handle = ltx.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    torch.manual_seed(0)
    base = torch.randn(1, 8, 3, 2, 3)
    try:
        for f, r, c in [(0, 0, 0), (1, 0, 2), (2, 1, 1), (2, 1, 2)]:
            seen.clear()
            moved = base.clone()
            moved[0, 5, f, r, c] += 1
            for lat in (base, moved):
                kw = {**KW, "num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent"}
                ltx(prompt="a red fox", latents=ltx._pack_latents(lat), **kw)
            changed = (seen[1] - seen[0]).abs().amax(dim=(0, 2)) > 0
            assert changed.nonzero().flatten().tolist() == [f * 6 + r * 3 + c]
    finally:
        handle.remove()


def decoded(pipe, latents):
    t = torch.tensor([0.05]) if pipe.vae.config.timestep_conditioning else None
    with torch.no_grad():
        return pipe.vae.decode(latents, t, return_dict=False)[0]  # (B, 3, frames, H, W)


@pytest.mark.parametrize("version", ["0.9", "0.9.5"])
def test_frame_layout_is_what_the_vae_decodes(version):
    """With a causal decoder, adding 1 to latent frame ``j`` changes exactly the video frames whose
    source is ``j`` or later, so a frame's source is the latest latent frame that changes it: the
    layout's source, for 1 to 4 latent frames, for the 0.9 and the 0.9.5 VAE layouts; the published
    (non-causal) decoders decode as many frames."""
    from daami2i.heatmaps.frames import FrameLayout

    causal = tiny_ltx_pipeline(seed=1, version=version, decoder_causal=True)
    stock = tiny_ltx_pipeline(seed=1, version=version)
    torch.manual_seed(0)
    for frames in range(1, 5):
        latents = torch.randn(1, 8, frames, 2, 3)
        expected = FrameLayout.causal(frames, 2, 8).source
        base = decoded(causal, latents)
        masks = []
        for j in range(frames):
            moved = latents.clone()
            moved[:, :, j] += 1
            masks.append(((decoded(causal, moved) - base).abs().amax(dim=(0, 1, 3, 4)) > 0).tolist())
        assert len(masks[0]) == len(expected) == decoded(stock, latents).shape[2] == 8 * (frames - 1) + 1
        assert [max(j for j in range(frames) if masks[j][v]) for v in range(len(expected))] == list(expected)
        for j in range(frames):
            assert masks[j] == [s >= j for s in expected]


@pytest.mark.parametrize("num_frames", [1, 9, 17, 25, 12])
def test_frame_layout_is_the_run(ltx, num_frames):
    """The trace's layout has as many video frames as the pipeline decoded (12 frames: 2 latent frames, 9)."""
    with daami2i.trace(ltx) as trc:
        video = call(ltx, "a red fox", num_frames=num_frames, num_inference_steps=1)[0]
    layout = trc.last_generation.frames
    latent_frames = (num_frames - 1) // 8 + 1
    assert layout.token_frames == latent_frames and layout.rows == 2
    assert layout.video_frames == video.shape[0] == 8 * (latent_frames - 1) + 1
    assert trc.last_generation.grid_size == (2 * latent_frames, 3)


def test_a_direct_transformer_call(ltx):
    """The transformer called outside the pipeline, with the latent sizes: traced, each batch row an image;
    without them (or with video_coords, as LTXConditionPipeline calls it) a clear TraceError."""
    torch.manual_seed(0)
    x, text = torch.randn(1, 18, 8), torch.randn(1, TEXT, 32)
    mask = torch.ones(1, TEXT, dtype=torch.bool)
    args = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]), encoder_attention_mask=mask)
    with daami2i.trace(ltx) as trc:
        ltx.transformer(**args, num_frames=3, height=2, width=3)
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.frames.source == SOURCE
    with pytest.raises(daami2i.TraceError, match="num_frames / height / width"):
        with daami2i.trace(ltx):
            ltx.transformer(**args, num_frames=3, height=3, width=3)  # 27 tokens asked, 18 given
    coords = torch.zeros(1, 3, 18)  # per-token (frame, row, column), as LTXConditionPipeline passes them
    with pytest.raises(daami2i.TraceError, match="video_coords given"):
        with daami2i.trace(ltx):
            ltx.transformer(**args, num_frames=3, height=2, width=3, video_coords=coords)
    with pytest.raises(daami2i.TraceError, match="num_frames / height / width"):
        with daami2i.trace(ltx):
            ltx.transformer(**args)  # no sizes at all


# ------------------------------------------------------------------------------------------ refusals


def test_other_pipelines_real_videos_and_other_patches_are_refused_clearly(ltx):
    for name in ("LTXImageToVideoPipeline", "LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline"):
        other = type(name, (), {"transformer": ltx.transformer, "unet": None})()
        with pytest.raises(daami2i.TraceError, match="text-to-video"):
            daami2i.trace(other)
    with pytest.raises(daami2i.TraceError, match="real video"):
        daami2i.trace_image(ltx, np.zeros((64, 96, 3), dtype=np.uint8), "a fox")
    from diffusers import LTXVideoTransformer3DModel

    patched = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=2, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=32,
    )  # fmt: skip
    with pytest.raises(daami2i.TraceError, match="patch_size=2"):
        daami2i.trace(type("LTXPipeline", (), {"transformer": patched, "unet": None})())
    assert not any(
        type(m.processor).__module__.startswith("daami2i") for m in ltx.transformer.modules() if hasattr(m, "processor")
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

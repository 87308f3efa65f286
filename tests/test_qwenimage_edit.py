"""Qwen-Image Edit (``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``): the joint sequence is
``[text, output image, reference image(s)]``; the reference tokens are keys only (never output, never
stored as self-attention). Every query equals a dense reference built from the joint probabilities
recorded in a separate, identical run (``test_qwenimage.QwenRecorder``: explicit softmax over all
keys, the reference tokens included); the Qwen2.5-VL encoder also sees the reference image as vision
tokens inside its template, and the word maps' tokens are the ids it received; the negative prompt's
calls are captured alone or never."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from daami2i.testing import tiny_qwenimage_pipeline
from daami2i.testing.qwenimage import qwen_vl_processor
from test_qwenimage import QWEN_MODULE, assert_close, check_queries, received_ids, recording

KW = dict(
    height=128, width=192, num_inference_steps=2, true_cfg_scale=1.0
)  # VAE scaling by 16, 2x2 packing: a 4x6 grid
GRID = (4, 6)
N = GRID[0] * GRID[1]
NEG = dict(negative_prompt="a blurry photo of many things", true_cfg_scale=2.0)  # a longer text than the prompt
VISION = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


def picture(seed: int = 0, size: tuple[int, int] = (48, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def reference_grid(size: tuple[int, int]) -> tuple[int, int]:
    """The reference image's token grid: resized to about 1024 x 1024 pixels (sides multiples of 32), / 16, / 2."""
    h, w = size
    width = (1024 * 1024 * w / h) ** 0.5
    return round(width * h / w / 32) * 32 // 32, round(width / 32) * 32 // 32


@pytest.fixture(scope="module")
def edit():
    return tiny_qwenimage_pipeline(kind="edit")


@pytest.fixture(scope="module")
def plus():
    return tiny_qwenimage_pipeline(kind="edit_plus")


def call(pipe, prompt, image=None, **kw):
    kw = {**KW, **kw}
    image = picture() if image is None else image
    g = torch.Generator().manual_seed(0)
    return pipe(image=image, prompt=prompt, generator=g, output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    """(trace, recorded probabilities per layer and call, ids the encoder received in the traced run)."""
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer) as book:
        recorded = call(pipe, prompt, **kw)
    with received_ids(pipe) as ids, daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book), ids


def split(p: torch.Tensor, n_ref: int) -> int:
    """The text length of a recorded call (B, H, S, S) whose keys are [text, N output, n_ref reference]."""
    return p.shape[-1] - N - n_ref


def dense(trc, book, image, calls, n_ref, n_cols=None):
    """Dense references of the layers the trace selected, from the recorded calls ``calls``: the self
    matrix (N x N: output queries, output keys; the reference keys' share left out, not renormalised)
    and the maps of the first ``n_cols`` text keys of each call (T, h, w)."""
    h, w = trc.last_generation.grid_size
    self_names = [s.name for s in trc.sites if s.name in trc._self_names]
    cross_names = [s.name for s in trc.sites if s.name in trc._cross_names]
    total_self = torch.zeros(N, N, dtype=torch.float64)
    maps = []
    for name in dict.fromkeys(self_names + cross_names):
        acc_text = None
        for i, p in enumerate(book[name]):
            if i not in calls:
                continue
            t = split(p, n_ref)
            p = p[image].mean(0)  # (S, S), the head mean
            out = slice(t, t + N)  # the output image's tokens
            if name in self_names:
                total_self += p[out, out]
            cols = n_cols if n_cols is not None else t
            text = torch.zeros(N, cols, dtype=torch.float64)
            text[:, : min(t, cols)] = p[out, : min(t, cols)]
            acc_text = text if acc_text is None else acc_text + text
        if name in cross_names:
            maps.append(acc_text.T.reshape(-1, h, w))
    return (total_self / len(self_names)).float(), torch.stack(maps).mean(0).float()


def key_positions(pipe, ids_row, prompt, word):
    """Key columns (after the dropped prefix) of ``word`` in the prompt, found in the ids the encoder received."""
    tok = pipe.tokenizer
    row = ids_row.tolist()
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    start = next(i for i in range(len(row)) if row[i : i + len(p_ids)] == p_ids)
    w_ids = tok(" " + word, add_special_tokens=False).input_ids
    at = [start + j for j in range(len(p_ids)) if p_ids[j : j + len(w_ids)] == w_ids]
    assert at, (word, tok.convert_ids_to_tokens(p_ids))
    drop = pipe.prompt_template_encode_start_idx
    return [a + j - drop for a in at for j in range(len(w_ids))]


def test_the_tiny_edit_pipelines_are_the_real_classes(edit, plus):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from transformers import Qwen2VLProcessor

    assert type(edit) is QwenImageEditPipeline and type(plus) is QwenImageEditPlusPipeline
    assert isinstance(edit.processor, Qwen2VLProcessor) and edit.vae_scale_factor == 16
    assert len(edit.tokenizer) == edit.text_encoder.config.text_config.vocab_size
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_qwenimage_pipeline(kind="layered")  # type: ignore[arg-type]


def test_every_query_matches_the_joint_softmax(edit):
    prompts = ["a red cat on a mat", "a blue dog"]  # different lengths: the shorter one's padding is masked
    images = [picture(0), picture(1)]
    trc, book, ids = run(edit, prompts, image=images)
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.image_size == (128, 192) and gen.n_images == 2 and not gen.cfg
    assert gen.steps_captured == [0, 1] and len(ids) == 1
    rh, rw = reference_grid((48, 64))
    n_ref = rh * rw
    p = book[trc._cross_sites[0].name][0]
    t = split(p, n_ref)
    assert n_ref > 900 and t > 0 and p.shape[-1] == t + N + n_ref
    # the reference keys take real probability: the output's self rows over output keys sum to well below 1
    out = p[0, :, t : t + N]  # (H, N, S)
    ref_mass = out[..., t + N :].sum(-1)
    assert 0.3 < ref_mass.mean().item() < 0.999
    for i, (prompt, word) in enumerate(zip(prompts, ["red", "dog"], strict=True)):
        self_ref, maps_ref = dense(trc, book, i, {0, 1}, n_ref)
        assert float(self_ref.sum(-1).max()) < 0.99  # not renormalised over the output's keys
        rows = key_positions(edit, ids[0][i], prompt, word)
        check_queries(trc, self_ref, maps_ref[rows].mean(0), i, word)
    # the stored self-attention is the output grid only: the reference tokens are no queries nor keys there
    (store,) = gen.self_attention.values()
    assert tuple(store.sums.shape[-2:]) == (N, N)
    n_short = int(ids[0][1].ne(edit.tokenizer.pad_token_id).sum()) - edit.prompt_template_encode_start_idx
    assert n_short < t and float(p[1, :, :, n_short:t].abs().max()) == 0.0  # the short prompt's padding


def test_word_tokens_are_the_ids_the_encoder_received(edit):
    """The prompt's tokens sit after the reference image's vision tokens, which the pipeline keeps: the
    word maps use the key columns whose received ids are the prompt's, however many vision tokens the
    processor makes of the image."""
    prompt = "a red cat on a mat"
    saved = edit.processor
    pads = []
    for processor in (saved, qwen_vl_processor(edit.tokenizer, max_pixels=112 * 112)):
        edit.processor = processor
        try:
            trc, book, ids = run(edit, prompt)
        finally:
            edit.processor = saved
        drop = edit.prompt_template_encode_start_idx
        received = ids[0][0].tolist()
        (st,) = trc.last_generation.streams
        tokens = st["tokens"][0]
        columns = trc._text_columns.tolist()
        tok = edit.tokenizer
        assert [received[c + drop] for c in columns[: len(tokens)]] == tok.convert_tokens_to_ids(tokens)
        assert tok.decode(received[columns[0] + drop : columns[len(tokens) - 1] + drop + 1]) == prompt
        assert received[columns[len(tokens)] + drop] == tok.convert_tokens_to_ids("<|im_end|>")
        before = tok.convert_ids_to_tokens(received[drop : columns[0] + drop])  # kept, before the prompt
        assert before[0] == VISION[0] and before[-1] == VISION[2] and set(before[1:-1]) == {VISION[1]}
        pads.append(len(before) - 2)
        n_ref = int(np.prod(reference_grid((48, 64))))
        self_ref, maps_ref = dense(trc, book, 0, {0, 1}, n_ref)
        for word in ("red", "mat"):
            check_queries(trc, self_ref, maps_ref[key_positions(edit, ids[0][0], prompt, word)].mean(0), 0, word)
    assert pads[1] > pads[0] > 0  # more vision tokens: the prompt's columns moved, its labels did not


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_true_cfg_passes_are_captured_apart(edit, halves):
    """True CFG calls the transformer twice per step on equal inputs (the latents and the reference
    tokens concatenated anew): "cond" is the prompt's calls alone, "uncond" the negative prompt's,
    "both" their mean (as a batch's halves are averaged); one pass alone is never a mix."""
    prompt = "a red cat"
    trc, book, ids = run(edit, prompt, dict(halves=halves), **NEG)
    gen = trc.last_generation
    assert gen.steps_captured == [0, 1] and gen.steps_run == 2 and not gen.cfg and len(ids) == 2
    n_ref = int(np.prod(reference_grid((48, 64))))
    calls = {"cond": {0, 2}, "uncond": {1, 3}, "both": {0, 1, 2, 3}}[halves]
    records = book[trc._cross_sites[0].name]
    assert len(records) == 4 and len({p.shape[-1] for p in records}) == 2  # two text lengths
    n_cols = max(trc._text_columns.tolist()) + 1
    self_ref, maps_ref = dense(trc, book, 0, calls, n_ref, n_cols=n_cols)
    if halves == "both":  # the two passes' mean
        self_ref, maps_ref = self_ref / 2, maps_ref / 2
    rows = key_positions(edit, ids[0][0], prompt, "cat")
    ghm = check_queries(trc, self_ref, maps_ref[rows].mean(0), 0, "cat")
    if halves != "both":  # the other pass gives another map: the kept one is not a mix
        other = {"cond": {1, 3}, "uncond": {0, 2}}[halves]
        _, other_maps = dense(trc, book, 0, other, n_ref, n_cols=n_cols)
        assert float((other_maps[rows].mean(0) - ghm.compute_word_heat_map("cat").value).abs().max()) > 1e-4
        mixed = dense(trc, book, 0, {0, 1, 2, 3}, n_ref, n_cols=n_cols)[1][rows].mean(0) / 2
        assert float((mixed - ghm.compute_word_heat_map("cat").value).abs().max()) > 1e-5


def test_uncond_without_a_negative_prompt_is_an_error(edit):
    with pytest.raises(daami2i.TraceError, match="qwenimage ran step 0 without a second"):
        with daami2i.trace(edit, halves="uncond"):
            call(edit, "a red cat")


def test_edit_plus_with_two_reference_images(plus):
    """Edit Plus: "Picture 1: <vision tokens>Picture 2: <vision tokens>" before the prompt in the
    encoder's input, and both images' tokens after the output's in the transformer's keys."""
    prompt = "a red cat on a mat"
    images = [picture(0), picture(1, (64, 48))]
    trc, book, ids = run(plus, prompt, image=images, **NEG)
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.steps_captured == [0, 1] and len(ids) == 2
    n_ref = sum(int(np.prod(reference_grid(s))) for s in ((48, 64), (64, 48)))
    drop = plus.prompt_template_encode_start_idx
    received = ids[0][0].tolist()
    columns = trc._text_columns.tolist()
    before = plus.tokenizer.decode(received[drop : columns[0] + drop])
    assert before.startswith("Picture 1: <|vision_start|>") and "Picture 2: <|vision_start|>" in before
    assert before.endswith("<|vision_end|>")
    self_ref, maps_ref = dense(trc, book, 0, {0, 2}, n_ref, n_cols=max(columns) + 1)
    for word in ("red", "mat"):
        check_queries(trc, self_ref, maps_ref[key_positions(plus, ids[0][0], prompt, word)].mean(0), 0, word)


def test_text_queries_look_at_the_output_only(edit):
    """text->image: a word's query rows over the output's keys (the reference keys' share left out);
    text->text: the kept text columns among each other; both from the same joint softmax."""
    prompt = "a red cat"
    trc, book, ids = run(edit, prompt, dict(relations=["image->text", "image->image", "text->image", "text->text"]))
    n_ref = int(np.prod(reference_grid((48, 64))))
    names = [s.name for s in trc.sites if s.name in trc._cross_names]
    cols = trc._text_columns.tolist()
    rows = key_positions(edit, ids[0][0], prompt, "cat")
    expect_map, expect_tt = [], []
    for name in names:
        acc = None
        for p in book[name]:
            t = split(p, n_ref)
            p = p[0].mean(0)
            acc = (p[rows][:, t : t + N].mean(0), p[cols][:, cols]) if acc is None else (
                acc[0] + p[rows][:, t : t + N].mean(0), acc[1] + p[cols][:, cols]
            )  # fmt: skip
        expect_map.append(acc[0].reshape(GRID))
        expect_tt.append(acc[1])
    ghm = trc.compute_global_heat_map()
    assert_close(ghm.compute_text_query_heat_map("cat").value, torch.stack(expect_map).mean(0).float())
    tokens, tt = ghm.text_to_text()
    n = len(tokens)
    assert_close(tt, torch.stack(expect_tt).mean(0).float()[:n, :n])


def test_every_patch_is_undone_also_after_an_exception(edit):
    before = dict(edit.transformer.attn_processors)
    dispatch = vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"]
    hooks = (len(edit.transformer._forward_pre_hooks), len(edit.text_encoder._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(edit):
            call(edit, "a cat", **NEG)
            assert all(type(p).__name__ == "JointCapturingProcessor" for p in edit.transformer.attn_processors.values())
            assert vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"] is not dispatch
            raise RuntimeError("boom")
    assert edit.transformer.attn_processors == before
    assert vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"] is dispatch
    assert (len(edit.transformer._forward_pre_hooks), len(edit.text_encoder._forward_pre_hooks)) == hooks
    assert "check_inputs" not in vars(edit) and "postprocess" not in vars(edit.image_processor)
    plain = call(edit, "a cat")
    with daami2i.trace(edit):
        traced = call(edit, "a cat")
    assert np.array_equal(plain, traced)


def test_store_size_is_estimated_exactly(edit):
    """The reference tokens are not stored: the stores are the output grid's, as for text to image."""
    with daami2i.trace(edit, max_store_mb=100) as trc:
        call(edit, "a red cat", **NEG)
    gen = trc.last_generation
    n_text = next(iter(gen.cross_attention.values())).sums.shape[-1]
    est = trc.estimate_nbytes(gen.latent_size, 1, n_text)
    assert est["total"] == gen.nbytes() == N * N * 4 + len(trc._cross_sites) * N * n_text * 4
    with pytest.raises(daami2i.TraceError, match="over max_store_mb"):
        with daami2i.trace(edit, max_store_mb=0.001):
            call(edit, "a red cat")


def test_real_image_attribution_is_refused_for_edits(edit):
    with pytest.raises(daami2i.TraceError, match="edit pipeline"):
        daami2i.trace_image(edit, picture(), "a red cat", timesteps=(300,))
    assert len(edit.text_encoder._forward_pre_hooks) == 0 and len(edit.transformer._forward_pre_hooks) == 0


def test_experiment_round_trip(edit, tmp_path):
    with daami2i.trace(edit) as trc:
        call(edit, "a red cat and a blue dog")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")
    back = exp.compute_global_heat_map()
    assert [s.name for s in back.streams] == ["qwen"] and back.words == ["a", "red", "cat", "and", "blue", "dog"]
    assert exp.generation.image_size == (128, 192) and exp.generation.grid_size == GRID
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)
    assert torch.equal(back.compute_bbox_heat_map(2, 1, 4, 2).value, ghm.compute_bbox_heat_map(2, 1, 4, 2).value)

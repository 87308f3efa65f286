"""Z-Image: a single-stream transformer called with per-item lists, sequences ``[image, image padding,
caption, caption padding]`` (each padded to a multiple of 32, masked only when the items' lengths
differ), guidance in one batch ``[cond; uncond]``, a Qwen3 encoder that receives the chat-templated
prompt. Every query equals a dense reference built from probabilities recorded explicitly (the
layer's own projections and norms, the rotary formula written out, the model's mask) in a separate,
identical run; word labels are checked against the ids the text encoder received."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_zimage_pipeline
from reference import check_region_queries, column_query, dense_cross, dense_self

KW = dict(height=64, width=80, num_inference_steps=2)
GRID, N, PAD = (8, 10), 80, 16  # 64x80 px -> 16x20 latent -> 8x10 tokens, padded to 96
LONG_NEGATIVE = "a blurry dark ugly picture of a green dog " * 3  # its caption pads to 64: a mask


@pytest.fixture(scope="module")
def zimage():
    return tiny_zimage_pipeline()


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, S, H, D) by complex (B, S, D/2) frequencies, written out from the
    formula: each pair (x0, x1) times (cos + i sin)."""
    cos, sin = freqs.real.double()[:, :, None], freqs.imag.double()[:, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


class ZRecorder:
    """Records a layer's full softmax probabilities (B, H, S, S) in float64, then lets the original
    processor compute the output (the recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        with torch.no_grad():
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))).double()
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))).double()
            if freqs_cis is not None:
                q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if attention_mask is not None:  # (B, S) boolean: True = attend
                scores = scores.masked_fill(~attention_mask[:, None, None, :], -torch.inf)
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)


@contextmanager
def recording(transformer):
    """{main layer: [probs per call]} while the main layers' processors record."""
    book: dict = defaultdict(list)
    mods = {n: m for n, m in transformer.named_modules() if n.startswith("layers.") and n.endswith(".attention")}
    originals = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(ZRecorder(n, book, originals[n]))
    try:
        yield book
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


@contextmanager
def encoder_ids(pipe):
    """The input ids and masks the text encoder receives, per call."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(_m, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = pipe.text_encoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def call(pipe, prompt, **kw):
    """A pipeline call on copies of list prompts (diffusers' Z-Image rewrites them in place)."""
    kw = {**KW, **{k: list(v) if isinstance(v, list) else v for k, v in kw.items()}}
    prompt = list(prompt) if isinstance(prompt, list) else prompt
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer) as book, encoder_ids(pipe) as ids:
        recorded = call(pipe, prompt, **kw)
    with daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book), ids


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-9, f"max error {err:.3g} (map max {float(ref.abs().max()):.3g})"


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.double() - b.double()).abs().max()) > 1e-3 * float(b.abs().max())


def dense(book, rows, n=N, pad=PAD, grid=GRID):
    """(self-attention (N x N), token maps (text positions, h, w)) of the given batch rows: the image
    block and the text columns of the joint softmax; the image padding is neither."""
    selfs = {name: [p[:, :, :n, :n] for p in calls] for name, calls in book.items()}
    texts = {name: [p[:, :, :n, n + pad :] for p in calls] for name, calls in book.items()}
    layers = [(name, 1) for name in book]
    return dense_self(selfs, layers, grid, grid, rows), dense_cross(texts, layers, grid, grid, rows)


def word_positions(tok, ids: list[int], word: str) -> list[int]:
    """Positions of ``word``'s tokens in the ids the encoder received (the first whole-word match)."""
    for i in range(len(ids)):
        for j in range(i + 1, min(len(ids), i + 6) + 1):
            head = tok.decode(ids[i : i + 1])
            if (
                tok.decode(ids[i:j]).strip() == word
                and head.strip()
                and (i == 0 or head[:1] == " " or tok.decode(ids[i - 1 : i])[-1:].isspace())
            ):
                return list(range(i, j))
    raise AssertionError(f"{word!r} not among the received ids")


def received(ids, call_idx: int, item: int) -> list[int]:
    """The ids of one item of one encoder call, padding dropped (as the pipeline drops it)."""
    input_ids, mask = ids[call_idx]
    return input_ids[item][mask[item].bool()].tolist()


def check(pipe, trc, book, ids, image_idx, word, rows, encoder_call=0, prompt_item=None):
    """Every query of image ``image_idx`` against the dense reference of batch ``rows``; the word's
    columns are where the encoder received its ids."""
    gen = trc.last_generation
    assert gen.grid_size == GRID and gen.image_size == (64, 80)
    self_ref, maps_ref = dense(book, rows)
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    check_region_queries(ghm, self_ref, GRID, gen.image_size, assert_close, [0, 7, N // 2, N - 1], (1, 2, 7, 4))
    got = received(ids, encoder_call, image_idx if prompt_item is None else prompt_item)
    pos = word_positions(pipe.tokenizer, got, word)
    assert pipe.tokenizer.decode([got[p] for p in pos]).strip() == word
    word_ref = maps_ref[pos].mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, GRID))
    return ghm, self_ref, word_ref


def test_sites_are_the_main_layers(zimage):
    trc = daami2i.trace(zimage)
    assert trc.adapter.name == "zimage"
    assert trc.attention_layers == {"layers.0.attention": ("joint", 1), "layers.1.attention": ("joint", 1)}


def test_every_query_matches_the_recorded_attention(zimage):
    prompts = ["a red cat", "a blue dog sitting on a green mat"]
    trc, book, ids = run(zimage, prompts, negative_prompt=[LONG_NEGATIVE, "grey"])
    gen = trc.last_generation
    assert gen.cfg and gen.n_images == 2 and gen.steps_captured == [0, 1]
    p = next(iter(book.values()))[0]
    assert p.shape[0] == 4 and p.shape[-1] == N + PAD + 64  # the long negative prompt's caption: 64
    assert float(p[0, :, :, N + PAD + 32 :].max()) == 0.0  # the cond rows' padding past their 32 is masked
    for i, word in enumerate(["cat", "dog"]):
        check(zimage, trc, book, ids, i, word, rows=[i])  # [cond; uncond]: the cond rows come first
    # the words' labels come from the ids the encoder received: the chat template's tokens are skipped
    ghm = trc.compute_global_heat_map(image_idx=0)
    tok = zimage.tokenizer
    first = received(ids, 0, 0)
    start = word_positions(tok, first, "a")[0]
    assert gen.streams[0]["tokens"][0] == tok.convert_ids_to_tokens(first[start : start + 3])
    assert tok.decode(first[:start]).startswith("<|im_start|>user")
    # only the prompt's columns (and the end token after the longer prompt) are kept
    n_kept = len(tok("a blue dog sitting on a green mat", add_special_tokens=False).input_ids) + 1
    assert trc._text_columns.tolist() == list(range(start, start + n_kept))
    assert next(iter(gen.cross_attention.values())).sums.shape == (2, 1, N, n_kept)
    assert trc.estimate_nbytes(gen.latent_size, 2, n_kept)["total"] == gen.nbytes()
    assert ghm.words == ["a", "red", "cat"]
    assert trc.compute_global_heat_map(image_idx=1).words == ["a", "blue", "dog", "sitting", "on", "green", "mat"]


def test_the_conditional_half_is_the_prompt_not_the_negative_prompt(zimage):
    """Z-Image's batch is [cond; uncond]: halves='cond' is row 0 (the prompt), 'uncond' row 1, and
    they differ; 'both' is their mean."""
    negative = "a green dog on the grass"
    refs = {}
    for halves, rows in (("cond", [0]), ("uncond", [1]), ("both", [0, 1])):
        trc, book, ids = run(zimage, "a red cat", dict(halves=halves), negative_prompt=negative)
        assert trc.last_generation.cfg
        ghm, self_ref, word_ref = check(zimage, trc, book, ids, 0, "cat", rows=rows)
        refs[halves] = (self_ref, word_ref, ghm.compute_word_heat_map("cat").value)
        other = [1] if halves == "cond" else [0]
        if halves != "both":
            self_other, maps_other = dense(book, other)
            w = torch.zeros(N)
            w[3] = 1
            assert differ(self_ref, self_other)
            assert differ(ghm.compute_pixel_heat_map([3]).value, column_query(self_other, w, GRID))
            pos = word_positions(zimage.tokenizer, received(ids, 0, 0), "cat")
            assert differ(refs[halves][2], maps_other[pos].mean(0))
    # the negative prompt went to the encoder second, as the second half of the batch
    assert "green" in zimage.tokenizer.decode(received(ids, 1, 0))
    assert_close(refs["both"][0], (refs["cond"][0] + refs["uncond"][0]) / 2)


def test_without_guidance_the_batch_is_the_images(zimage):
    trc, book, ids = run(zimage, "a red cat", guidance_scale=0.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1 and next(iter(book.values()))[0].shape[0] == 1
    check(zimage, trc, book, ids, 0, "cat", rows=[0])
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(zimage, halves="uncond"):
            call(zimage, "a red cat", guidance_scale=0.0)


def test_a_square_grid_without_image_padding(zimage):
    """64x64 px: 8x8 = 64 tokens, a multiple of 32, so there is no image padding."""
    kw = dict(height=64, width=64)
    plain = call(zimage, "a red cat", **kw)
    with recording(zimage.transformer) as book, encoder_ids(zimage) as ids:
        call(zimage, "a red cat", **kw)
    with daami2i.trace(zimage) as trc:
        assert np.array_equal(call(zimage, "a red cat", **kw), plain)
    assert trc.last_generation.grid_size == (8, 8)
    self_ref, maps_ref = dense(dict(book), [0], n=64, pad=0, grid=(8, 8))
    ghm = trc.compute_global_heat_map()
    w = torch.zeros(64)
    w[[1, 40]] = 1
    assert_close(ghm.compute_pixel_heat_map([1, 40]).value, column_query(self_ref, w, (8, 8)))
    pos = word_positions(zimage.tokenizer, received(ids, 0, 0), "red")
    assert_close(ghm.compute_word_heat_map("red").value, maps_ref[pos].mean(0))


def test_img2img():
    pipe = tiny_zimage_pipeline("img2img")
    image = torch.rand(1, 3, 64, 80)
    trc, book, ids = run(pipe, "a red cat", image=image, strength=0.7, num_inference_steps=3)
    gen = trc.last_generation
    assert gen.steps_run == len(next(iter(book.values())))
    check(pipe, trc, book, ids, 0, "cat", rows=[0])


def _state(pipe):
    tr = pipe.transformer
    mod = sys.modules[type(tr).__module__]
    return (
        {n: m.processor for n, m in tr.named_modules() if hasattr(m, "set_processor")},
        vars(mod).get("dispatch_attention_fn"),
        len(tr._forward_pre_hooks),
        len(pipe.text_encoder._forward_pre_hooks),
        sorted(vars(pipe)),
        sorted(vars(pipe.image_processor)),
    )


def test_everything_is_restored_also_after_an_exception(zimage):
    before = _state(zimage)
    with daami2i.trace(zimage):
        assert _state(zimage) != before
        call(zimage, "a cat")
    assert _state(zimage) == before
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(zimage):
            call(zimage, "a cat")
            raise RuntimeError("boom")
    assert _state(zimage) == before
    from diffusers.models import attention_dispatch

    assert sys.modules[type(zimage.transformer).__module__].dispatch_attention_fn is (
        attention_dispatch.dispatch_attention_fn
    )


def test_cfg_truncation_is_refused_clearly(zimage):
    """cfg_truncation < 1 drops the unconditional half part-way: a clear error, nothing left patched."""
    before = _state(zimage)
    with pytest.raises(daami2i.TraceError, match="cfg_truncation"):
        with daami2i.trace(zimage):
            call(zimage, "a red cat", cfg_truncation=0.3, num_inference_steps=4)
    assert _state(zimage) == before


def test_real_image_attribution(zimage):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    with encoder_ids(zimage) as ids:
        trc = daami2i.trace_image(zimage, image, "a red cat", timesteps=(300, 600), generator=g)
    gen = trc.last_generation
    assert gen.image_size == (64, 80) and gen.steps_captured == [0, 1] and gen.n_images == 1
    vae = zimage.vae
    with torch.no_grad(), recording(zimage.transformer) as book:
        pixels = zimage.image_processor.preprocess(image)
        lat = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        emb, _ = zimage.encode_prompt("a red cat", do_classifier_free_guidance=False)
        g = torch.Generator().manual_seed(0)
        for t in (300, 600):
            s = t / 1000
            noisy = (1 - s) * lat + s * torch.randn(lat.shape, generator=g)
            zimage.transformer(list(noisy.unsqueeze(2).unbind(0)), torch.tensor([1 - s]), emb)
    check(zimage, trc, dict(book), ids, 0, "cat", rows=[0])


def test_experiment_round_trip(zimage, tmp_path):
    with daami2i.trace(zimage) as trc:
        call(zimage, "a red cat and a blue dog")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    back = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)
    assert not torch.equal(ghm.compute_word_heat_map("red").value, ghm.compute_word_heat_map("dog").value)


def test_cli_generate_and_show(zimage, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    zimage.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "80"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.image_size == (64, 80)
    assert exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cat.png").is_file()


def test_bad_input_is_a_daami2i_error(zimage):
    """The omni pipeline's layout ([text, image, SigLIP] per item) is refused, as are calls the
    adapter cannot read."""

    class ZImageOmniPipeline:  # stands in for diffusers' class of that name, around the same transformer
        transformer, unet = zimage.transformer, None

    with pytest.raises(daami2i.UnsupportedPipelineError, match="Z-Image"):
        daami2i.trace(ZImageOmniPipeline())
    adapter = daami2i.trace(zimage).adapter
    x, cap = torch.zeros(4, 1, 16, 20), torch.zeros(7, 32)
    with pytest.raises(daami2i.TraceError, match="omni mode"):
        adapter.read_call(([[x]], torch.zeros(1), [[cap]]), {})
    with pytest.raises(daami2i.TraceError, match="one latent and one caption"):
        adapter.read_call((x, torch.zeros(1), cap), {})
    call = adapter.read_call(([x, x], torch.tensor([0.25, 0.25]), [cap, torch.zeros(40, 32)]), {})
    assert call.sample.shape == (2, 4, 16, 20) and call.context.shape == (2, 64, 32) and call.timestep == 0.25
    assert adapter.reference_tokens(call, (8, 10)) == 16 and adapter.reference_tokens(call, (8, 8)) == 0

"""Sana: separate layers, linear (relu) self-attention and softmax cross-attention to Gemma-2 behind a
long instruction prefix. Every query equals a dense reference built, in a separate identical run,
from attention weights written out here from the formulas (relu(q) relu(k)^T row-normalised, and
softmax with the padding mask); labels are checked against the ids Gemma received; guidance is the
batch's conditional half."""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import daami2i
from daami2i.storage.recorder import probs_chunks
from daami2i.testing import tiny_sana_pipeline
from reference import (
    batch_rows,
    check_region_queries,
    column_query,
    dense_cross,
    dense_self,
)

KW = dict(max_sequence_length=32, use_resolution_binning=False, height=256, width=384)
L = KW["max_sequence_length"]
GRID = (8, 12)


@pytest.fixture(scope="module")
def sana():
    return tiny_sana_pipeline()


@pytest.fixture(scope="module")
def sprint():
    return tiny_sana_pipeline(kind="sprint")


class SanaRecorder:
    """Writes out each layer's attention weights in float64 from its own projections and norms, then
    lets the original processor compute the output (so a recorded run is bit-identical to a plain one).
    Self-attention (linear): relu(q) relu(k)^T / (row sum + 1e-15); cross-attention: softmax(q k^T /
    sqrt(d) + the additive padding bias)."""

    def __init__(self, name, book, original):
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        with torch.no_grad():
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q, k = attn.to_q(hidden_states), attn.to_k(ctx)
            if attn.norm_q is not None:  # Sana's norms act on all heads at once, before the split
                q, k = attn.norm_q(q), attn.norm_k(k)
            b, h = q.shape[0], attn.heads
            q = q.view(b, q.shape[1], h, -1).transpose(1, 2).double()  # (B, H, N, d)
            k = k.view(b, k.shape[1], h, -1).transpose(1, 2).double()  # (B, H, T, d)
            if encoder_hidden_states is None:
                s = q.clamp(min=0) @ k.clamp(min=0).transpose(-1, -2)
                p = s / (s.sum(-1, keepdim=True) + 1e-15)
            else:
                s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                if attention_mask is not None:  # (B, 1, T) bias: 0 kept, -10000 padding
                    s = s + attention_mask.double().view(b, 1, 1, -1)
                p = torch.softmax(s, dim=-1)
            self.book[self.name].append(p)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


@contextmanager
def recording(transformer):
    book = defaultdict(list)
    originals = transformer.attn_processors
    transformer.set_attn_processor({n: SanaRecorder(n[: -len(".processor")], book, p) for n, p in originals.items()})
    try:
        yield book
    finally:
        transformer.set_attn_processor(dict(originals))


@contextmanager
def received_ids(pipe):
    """The (B, L) input ids of every text-encoder call, hooked by the test itself."""
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0] if args else kwargs["input_ids"]).clone()), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


def call(pipe, prompt, **kw):
    kw = {**KW, "num_inference_steps": 2, **kw}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer) as book:
        recorded = call(pipe, prompt, **kw)
    with received_ids(pipe) as ids, daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book), ids


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-9, f"max error {err:.3g} (map max {float(ref.abs().max()):.3g})"


def prompt_row(ids, prompt, tok):
    """The received id row holding the (lowercased) prompt after the instruction (the longest rows)."""
    for batch in ids:
        for row in batch.tolist():
            if len(row) > L and tok.decode(row, skip_special_tokens=True).endswith(prompt.lower()):
                return row
    raise AssertionError(f"no encoder row holds {prompt!r}")


def word_columns(row, word, tok):
    """Key columns of ``word``'s tokens: its positions in the received row, where the pipeline keeps
    position 0 and the last L - 1 positions (column c >= 1 is position len(row) - L + c)."""
    tokens = [t.lstrip("\u2581") for t in tok.convert_ids_to_tokens(row)]
    pieces = [t.lstrip("\u2581") for t in tok.tokenize(" " + word.lower())]
    n = len(pieces)
    spots = [i for i in range(len(row) - n + 1) if tokens[i : i + n] == pieces and i >= len(row) - L + 1]
    assert spots, (word, tokens[-L:])
    return [spots[0] + j - (len(row) - L) for j in range(n)]


def check(trc, book, image_idx, word, row, halves="cond", steps=None):
    gen = trc.last_generation
    grid = gen.grid_size
    rows = batch_rows(gen.n_images, gen.cfg, halves, image_idx)
    selfs = [(s.name, 1) for s in trc.sites if s.name in trc._self_names]
    cross = [(s.name, 1) for s in trc.sites if s.name in trc._cross_names]
    self_ref = dense_self(book, selfs, grid, grid, rows, steps)
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    n = grid[0] * grid[1]
    check_region_queries(ghm, self_ref, grid, gen.image_size, assert_close, [0, 7, n // 2, n - 1], (2, 1, 5, 3))
    if word is None:
        return ghm, self_ref
    maps = dense_cross(book, cross, grid, grid, rows, steps)  # (all L key columns, h, w)
    word_ref = maps[word_columns(row, word, trc.pipe.tokenizer)].mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, grid))
    return ghm, self_ref


def test_relu_linear_kernel_equals_the_explicit_weights():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    q[0, 1, 4] = -1.0  # relu(q) = 0: this query weighs nothing
    s = q.double().clamp(min=0) @ k.double().clamp(min=0).transpose(-1, -2)
    ref = s / (s.sum(-1, keepdim=True) + 1e-15)
    for chunk in (10**9, 3 * 7 * 4 * 2 * 3):  # one chunk, and chunks of 3 query rows
        got = torch.cat([p.clone() for _, _, p in probs_chunks(q, k, 0.5, None, chunk, kernel="relu_linear")], 2)
        assert (got.double() - ref).abs().max() < 1e-6
    assert float(got[0, 1, 4].abs().sum()) == 0.0
    soft = torch.cat([p.clone() for _, _, p in probs_chunks(q, k, 0.5, None, 10**9)], 2)
    assert (soft.double() - ref).abs().max() > 0.01  # the kernels differ: the test can fail
    with pytest.raises(daami2i.TraceError, match="no mask"):
        next(probs_chunks(q, k, 0.5, torch.zeros(1, 1, 1, 7), 10**9, kernel="relu_linear"))


def test_sites_and_kernels(sana):
    trc = daami2i.trace(sana)
    kinds = {s.name: (s.kind, s.kernel) for s in trc.sites}
    assert kinds == {
        f"transformer_blocks.{i}.attn{j}": (("self", "relu_linear") if j == 1 else ("cross", "softmax"))
        for i in range(2)
        for j in (1, 2)
    }


def test_every_query_matches_the_recorded_attention(sana):
    prompts = ["A Red cat on a chair", "a blue dog"]  # the pipeline lowercases them for Gemma
    trc, book, ids = run(sana, prompts)
    gen = trc.last_generation
    assert gen.cfg and gen.n_images == 2 and gen.grid_size == GRID and gen.image_size == (256, 384)
    for i, (prompt, word) in enumerate(zip(prompts, ["Cat", "dog"], strict=True)):
        check(trc, book, i, word, prompt_row(ids, prompt, sana.tokenizer))
    ghm = trc.compute_global_heat_map(image_idx=0)
    assert ghm.words == ["a", "red", "cat", "on", "chair"]
    # linear weights: a row sums to one, or to zero where relu(q) is zero (no softmax would)
    sums = book["transformer_blocks.0.attn1"][0].sum(-1)
    assert bool(((sums - 1).abs() < 1e-9).logical_or(sums == 0).all())
    # only the prompt's Gemma columns are kept (the longest prompt's tokens and the one after), and they
    # are the reference's key columns: the store is the recorded weights summed over the steps
    store = gen.cross_attention["transformer_blocks.1.attn2"]
    cols = trc._text_columns.tolist()
    first = word_columns(prompt_row(ids, prompts[0], sana.tokenizer), "a red", sana.tokenizer)[0]
    assert cols == list(range(first, first + store.sums.shape[-1]))
    rec = sum(p[batch_rows(2, True, "cond", 0)] for p in book["transformer_blocks.1.attn2"])[0]
    assert_close(store.sums[0], rec[..., cols].float())
    assert trc.estimate_nbytes(gen.latent_size, 2, len(cols))["total"] == gen.nbytes()


def test_labels_are_the_ids_gemma_received(sana):
    prompt = "A red cat on a green chair"
    trc, book, ids = run(sana, prompt)
    row = prompt_row(ids, prompt, sana.tokenizer)
    gen = trc.last_generation
    stream = gen.streams[0]
    dropped = len(row) - L  # the instruction's tokens the pipeline's selection leaves out
    assert dropped > 100  # the default complex human instruction is there
    cols = trc._text_columns.tolist()
    received = sana.tokenizer.convert_ids_to_tokens([row[c + dropped] for c in cols])
    tokens = stream["tokens"][0]
    assert received[: len(tokens)] == tokens  # the prompt's tokens, as Gemma got them ("▁a", not "a")
    assert received[len(tokens)] == "<pad>"  # the column after the prompt
    # the same prompt without the instruction: no dropped positions, the same words
    trc2, book2, ids2 = run(sana, prompt, complex_human_instruction=None)
    row2 = next(r for b in ids2 for r in b.tolist() if len(r) == L and r[1] != sana.tokenizer.pad_token_id)
    assert trc2.compute_global_heat_map().words == trc.compute_global_heat_map().words
    check(trc2, book2, 0, "green", row2)
    check(trc, book, 0, "green", row)


@pytest.mark.parametrize("halves", ["uncond", "both"])
def test_guidance_halves(sana, halves):
    trc, book, ids = run(sana, "a red cat", dict(halves=halves), negative_prompt="a green tree")
    assert trc.last_generation.cfg
    check(trc, book, 0, "cat", prompt_row(ids, "a red cat", sana.tokenizer), halves=halves)


def test_the_conditional_half_is_never_the_negative_prompt(sana):
    trc, book, ids = run(sana, "a red cat", negative_prompt="a green tree")
    ghm, self_ref = check(trc, book, 0, "cat", prompt_row(ids, "a red cat", sana.tokenizer))
    selfs = [(s.name, 1) for s in trc.sites if s.name in trc._self_names]
    uncond = dense_self(book, selfs, GRID, GRID, batch_rows(1, True, "uncond", 0))
    w = torch.zeros(96)
    w[[0, 50]] = 1
    ours = ghm.compute_pixel_heat_map([0, 50]).value.double()
    assert (ours - column_query(uncond, w, GRID).double()).abs().max() > 1e-3


def test_without_guidance_the_batch_is_the_images(sana):
    trc, book, ids = run(sana, "a red cat", guidance_scale=1.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1
    check(trc, book, 0, "cat", prompt_row(ids, "a red cat", sana.tokenizer))
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(sana, halves="uncond"):
            call(sana, "a red cat", guidance_scale=1.0)


def test_sprint_qk_norm_across_heads(sprint):
    """Sana Sprint: QK-norm over all heads before the split, embedded guidance, one batch of images."""
    trc, book, ids = run(sprint, "a red cat", guidance_scale=4.5)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1 and gen.grid_size == GRID
    assert type(sprint.transformer.transformer_blocks[0].attn1.norm_q).__name__ == "RMSNorm"
    check(trc, book, 0, "cat", prompt_row(ids, "a red cat", sprint.tokenizer))
    with pytest.raises(daami2i.TraceError, match="Sana Sprint"):
        daami2i.trace_image(sprint, np.zeros((256, 384, 3), dtype=np.uint8), "a cat", timesteps=(300,))


def _state(pipe):
    import diffusers.models.attention_processor as ap
    import diffusers.models.transformers.sana_transformer as st

    return (
        {n: id(p) for n, p in pipe.transformer.attn_processors.items()},
        len(pipe.transformer._forward_pre_hooks),
        len(pipe.text_encoder._forward_pre_hooks),
        sorted(k for k in vars(pipe) if k in ("check_inputs", "encode_prompt", "__call__")),
        ap.F is F,
        st.F is F,
    )


def test_everything_is_restored_also_after_an_exception(sana):
    before = _state(sana)
    assert before[-2:] == (True, True)
    with daami2i.trace(sana):
        call(sana, "a red cat")
    assert _state(sana) == before
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(sana):

            def stop(*_a, **_k):
                raise RuntimeError("boom")

            call(sana, "a red cat", callback_on_step_end=stop)
    assert _state(sana) == before


def test_a_replaced_linear_processor_is_refused(sana):
    from diffusers.models.attention_processor import AttnProcessor2_0

    trc = daami2i.trace(sana)
    attn = sana.transformer.transformer_blocks[0].attn1
    original = attn.get_processor()
    attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(daami2i.TraceError, match="linear attention"):
            with trc:
                pass
    finally:
        attn.set_processor(original)
    assert _state(sana)[0] == {n: id(p) for n, p in sana.transformer.attn_processors.items()}


def test_real_image_attribution(sana):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (256, 384, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    with received_ids(sana) as ids:
        trc = daami2i.trace_image(sana, image, "a red cat", timesteps=(300, 600), generator=g, max_sequence_length=L)
    gen = trc.last_generation
    assert gen.image_size == (256, 384) and gen.steps_captured == [0, 1] and gen.n_images == 1
    vae, n_train = sana.vae, sana.scheduler.config.num_train_timesteps
    instruction = __import__("inspect").signature(sana.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad(), recording(sana.transformer) as book:
        lat = vae.encode(sana.image_processor.preprocess(image)).latent * vae.config.scaling_factor
        emb, mask, _, _ = sana.encode_prompt(
            "a red cat", do_classifier_free_guidance=False, max_sequence_length=L, complex_human_instruction=instruction
        )
        g = torch.Generator().manual_seed(0)
        for t in (300, 600):
            eps = torch.randn(lat.shape, generator=g)
            noisy = (1 - t / n_train) * lat + t / n_train * eps
            sana.transformer(noisy, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([t]))
    check(trc, dict(book), 0, "cat", prompt_row(ids, "a red cat", sana.tokenizer))


def test_experiment_round_trip(sana, tmp_path):
    with daami2i.trace(sana) as trc:
        call(sana, "a red cat and a blue dog")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    back = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    assert back.words == ghm.words == ["a", "red", "cat", "and", "blue", "dog"]
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)


def test_cli_generate_and_show(sana, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    sana.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "96"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output

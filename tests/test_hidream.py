"""HiDream-I1: joint attention over ``[image, image padding, T5, Llama last layer, Llama layer of the
block]``, guidance in one batch ``[uncond; cond]``. Every query equals a dense reference built from
probabilities recorded explicitly (the layer's own projections and RMS norms, the padding's keys
zeroed as the model zeroes them, the rotary formula written out) in a separate, identical run; word
labels are checked against the ids the T5 and Llama encoders received."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_hidream_pipeline
from reference import check_region_queries, column_query, dense_cross, dense_self

L = 16  # max_sequence_length: T5 and each Llama segment have 16 positions, the text part 48
KW = dict(height=64, width=96, num_inference_steps=2, max_sequence_length=L)
GRID, N, PAD = (4, 6), 24, 1  # 64x96 px -> 8x12 latent -> 4x6 tokens, padded to max_seq = 25
STREAM_OFFSET = {"t5": 0, "llama": L, "llama_block": 2 * L}  # each stream's first text column


@pytest.fixture(scope="module")
def hidream():
    return tiny_hidream_pipeline()


def rotate(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, S, H, D), each pair (x0, x1) turned by the angle whose cos and sin are
    in the model's (B, S, 1, D/2, 2, 2) rotation matrices, written out from the formula."""
    cos, sin = emb[..., 0, 0].double(), emb[..., 1, 0].double()  # (B, S, 1, D/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


class HRecorder:
    """Records a layer's full softmax probabilities (B, H, S, S) in float64, then lets the original
    processor compute the output (the recorded run is bit-identical to a plain one)."""

    def __init__(self, name: str, book: dict, original) -> None:
        self.name, self.book, self.original = name, book, original

    def __call__(
        self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None, image_rotary_emb=None
    ):
        with torch.no_grad():
            b = hidden_states.shape[0]

            def heads(x):
                return x.view(b, x.shape[1], attn.heads, -1).double()  # (B, S, H, D)

            q = heads(attn.q_rms_norm(attn.to_q(hidden_states)))
            k = heads(attn.k_rms_norm(attn.to_k(hidden_states)))
            if hidden_states_masks is not None:  # the padding's keys are zeroed, not masked
                k = k * hidden_states_masks.view(b, -1, 1, 1).double()
            if not attn.single:
                q = torch.cat([q, heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)))], dim=1)
                k = torch.cat([k, heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)))], dim=1)
            q, k = rotate(q, image_rotary_emb).transpose(1, 2), rotate(k, image_rotary_emb).transpose(1, 2)
            self.book[self.name].append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1))
        return self.original(
            attn,
            hidden_states=hidden_states,
            hidden_states_masks=hidden_states_masks,
            encoder_hidden_states=encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
        )


def attn_modules(transformer) -> dict:
    return {n: m for n, m in transformer.named_modules() if n.endswith(".attn1")}


@contextmanager
def recording(transformer):
    """{layer: [probs per call]} while every block's attention records."""
    book: dict = defaultdict(list)
    mods = attn_modules(transformer)
    originals = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(HRecorder(n, book, originals[n]))
    try:
        yield book
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


@contextmanager
def encoder_ids(pipe):
    """{encoder attribute: [input ids per call]} of the T5 and Llama encoders."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for attr in ("text_encoder_3", "text_encoder_4"):

        def keep(_m, args, kwargs, attr=attr):
            seen[attr].append((args[0] if args else kwargs["input_ids"]).clone())

        handles.append(getattr(pipe, attr).register_forward_pre_hook(keep, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def call(pipe, prompt, **kw):
    kw = {**KW, **kw}
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
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-9, f"max error {err:.3g} (map max {float(ref.abs().max()):.3g})"


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.double() - b.double()).abs().max()) > 1e-3 * float(b.abs().max())


def dense(book, rows, n=N, pad=PAD, grid=GRID):
    """(self-attention (N x N), token maps (every text position, h, w)) of the given batch rows: the
    image block and the text columns of the joint softmax; the image padding is neither."""
    selfs = {name: [p[:, :, :n, :n] for p in calls] for name, calls in book.items()}
    texts = {name: [p[:, :, :n, n + pad :] for p in calls] for name, calls in book.items()}
    layers = [(name, 1) for name in book]
    return dense_self(selfs, layers, grid, grid, rows), dense_cross(texts, layers, grid, grid, rows)


def positions(tok, ids: list[int], word: str) -> list[int]:
    """Positions of every occurrence of ``word``'s tokens among the ids an encoder received (as the
    first word, or after a space); a bare ``▁`` (SentencePiece's space before a split word, "▁", "R",
    "ed") holds none of the word's characters and is not one of its tokens."""
    tokens = tok.convert_ids_to_tokens(ids)
    found: set[int] = set()
    for pieces in (tok.tokenize(word), tok.tokenize(" " + word)):
        n = len(pieces)
        found.update(i + j for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pieces for j in range(n))
    found = {i for i in found if tokens[i] != "▁"}
    assert found, f"{word!r} not among the received ids {tokens}"
    return sorted(found)


def word_rows(pipe, ids, item: int, word: str, call_idx: int = 0, length: int = L) -> dict[str, list[int]]:
    """Per stream, the text positions (of the whole text part) of ``word``, found in the ids the T5 and
    the Llama encoders received for batch item ``item`` of their ``call_idx``-th call."""
    t5 = positions(pipe.tokenizer_3, ids["text_encoder_3"][call_idx][item].tolist(), word)
    llama = positions(pipe.tokenizer_4, ids["text_encoder_4"][call_idx][item].tolist(), word)
    return {"t5": t5, "llama": [length + p for p in llama], "llama_block": [2 * length + p for p in llama]}


def check(pipe, trc, book, ids, image_idx, word, rows, call_idx=0, item=None, grid=GRID, pad=PAD):
    """Every query of image ``image_idx`` against the dense reference of batch ``rows``; the word's
    columns are where the encoders received its ids."""
    gen = trc.last_generation
    assert gen.grid_size == grid
    n = grid[0] * grid[1]
    self_ref, maps_ref = dense(book, rows, n, pad, grid)
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    check_region_queries(ghm, self_ref, grid, gen.image_size, assert_close, [0, 7, n // 2, n - 1], (1, 1, 3, 2))
    per_stream = {
        name: maps_ref[r].mean(0)
        for name, r in word_rows(pipe, ids, image_idx if item is None else item, word, call_idx).items()
    }
    for name, ref in per_stream.items():
        assert_close(ghm.compute_word_heat_map(word, stream=name).value, ref)
    word_ref = torch.stack(list(per_stream.values())).mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, grid))
    return ghm, self_ref, word_ref


def test_sites_are_every_blocks_joint_attention(hidream):
    trc = daami2i.trace(hidream)
    assert trc.adapter.name == "hidream"
    assert trc.attention_layers == {
        "double_stream_blocks.0.block.attn1": ("joint", 1),
        "single_stream_blocks.0.block.attn1": ("joint", 1),
    }


def test_every_query_matches_the_recorded_attention(hidream):
    prompts = ["a red cat", "a blue dog sitting on a green mat"]
    trc, book, ids = run(hidream, prompts, negative_prompt="grey")
    gen = trc.last_generation
    assert gen.cfg and gen.n_images == 2 and gen.steps_captured == [0, 1] and gen.image_size == (64, 96)
    for p in (calls[0] for calls in book.values()):  # [image, padding, T5, Llama, Llama of the block]
        assert p.shape == (4, 2, N + PAD + 3 * L, N + PAD + 3 * L)
        assert float(p[:, :, :N, N : N + PAD].min()) > 0  # the padding's zeroed keys are in the softmax
    for i, word in enumerate(["cat", "dog"]):
        check(hidream, trc, book, ids, i, word, rows=[2 + i])  # [uncond; cond]: the cond rows come second
        check(hidream, trc, book, ids, i, "a", rows=[2 + i])
    ghm = trc.compute_global_heat_map(image_idx=0)
    assert ghm.words == ["a", "red", "cat"]
    assert [s.name for s in ghm.streams] == ["t5", "llama", "llama_block"]
    assert trc.compute_global_heat_map(image_idx=1).words == ["a", "blue", "dog", "sitting", "on", "green", "mat"]
    # the kept columns: each stream's prompt tokens (of the longer prompt) and the end token after them
    n_t5 = len(hidream.tokenizer_3("a blue dog sitting on a green mat").input_ids)  # with </s>
    n_ll = len(hidream.tokenizer_4("a blue dog sitting on a green mat", add_special_tokens=False).input_ids) + 1
    expected = list(range(n_t5)) + list(range(L + 1, L + 1 + n_ll)) + list(range(2 * L + 1, 2 * L + 1 + n_ll))
    assert trc._text_columns.tolist() == expected
    kept = n_t5 + 2 * n_ll
    assert next(iter(gen.cross_attention.values())).sums.shape == (2, 1, N, kept)
    assert trc.estimate_nbytes(gen.latent_size, 2, kept)["total"] == gen.nbytes()


def test_labels_are_the_ids_the_encoders_received(hidream):
    """The tokens each stream labels its key rows with are the ids its encoder was given, at the
    stream's columns: T5 from position 0, both Llama streams after ``<|begin_of_text|>``."""
    trc, book, ids = run(hidream, "A Red cat on the café chair")
    gen = trc.last_generation
    t5_ids = ids["text_encoder_3"][0][0].tolist()
    llama_ids = ids["text_encoder_4"][0][0].tolist()
    assert llama_ids[0] == hidream.tokenizer_4.bos_token_id
    names = [s["name"] for s in gen.streams]
    assert names == ["t5", "llama", "llama_block"]
    cols = trc._text_columns.tolist()
    for spec in gen.streams:
        toks = spec["tokens"][0]
        tok = getattr(hidream, spec["tokenizer"])
        got = t5_ids if spec["name"] == "t5" else llama_ids
        start = 0 if spec["name"] == "t5" else 1
        assert toks == tok.convert_ids_to_tokens(got[start : start + len(toks)])
        stream_cols = cols[spec["first_row"] : spec["stop_row"]]
        assert stream_cols == list(
            range(STREAM_OFFSET[spec["name"]] + start, STREAM_OFFSET[spec["name"]] + start + len(stream_cols))
        )
    for word in ("Red", "chair"):
        check(hidream, trc, book, ids, 0, word, rows=[1])
    # a word map of the Llama stream is not the T5 one's nor the other Llama layer's
    ghm = trc.compute_global_heat_map()
    maps = [ghm.compute_word_heat_map("chair", stream=s).value for s in names]
    assert differ(maps[0], maps[1]) and differ(maps[1], maps[2])


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_the_conditional_half_is_the_prompt_not_the_negative_prompt(hidream, halves):
    """The batch is [uncond; cond]: halves='cond' is row 1 (the prompt), 'uncond' row 0, 'both' their
    mean; the negative prompt went to the encoders second."""
    negative = "a green cat on the grass"
    rows = {"cond": [1], "uncond": [0], "both": [0, 1]}[halves]
    trc, book, ids = run(hidream, "a red cat", dict(halves=halves), negative_prompt=negative)
    assert trc.last_generation.cfg
    # the word's columns are the prompt's (encoder call 0), whichever rows are kept
    ghm, self_ref, word_ref = check(hidream, trc, book, ids, 0, "cat", rows=rows)
    if halves != "both":
        other = [0] if halves == "cond" else [1]
        self_other, _ = dense(book, other)
        assert differ(self_ref, self_other)
        w = torch.zeros(N)
        w[3] = 1
        assert differ(ghm.compute_pixel_heat_map([3]).value, column_query(self_other, w, GRID))
    else:
        cond, _ = dense(book, [1])
        uncond, _ = dense(book, [0])
        assert_close(self_ref, (cond + uncond) / 2)
    tok = hidream.tokenizer_4
    assert "green" in tok.decode(ids["text_encoder_4"][1][0].tolist())  # the negative prompt: the second call


def test_without_guidance_the_batch_is_the_images(hidream):
    trc, book, ids = run(hidream, "a red cat", guidance_scale=1.0)
    gen = trc.last_generation
    assert not gen.cfg and gen.n_images == 1 and next(iter(book.values()))[0].shape[0] == 1
    check(hidream, trc, book, ids, 0, "cat", rows=[0])
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(hidream, halves="uncond"):
            call(hidream, "a red cat", guidance_scale=1.0)


def test_a_square_grid_has_no_padding(hidream):
    """64x64 px is rescaled by the pipeline to its 80x80 area: a 5x5 grid, square, so not padded."""
    trc, book, ids = run(hidream, "a red cat", height=64, width=64)
    gen = trc.last_generation
    assert gen.image_size == (80, 80) and gen.grid_size == (5, 5)
    assert next(iter(book.values()))[0].shape[-1] == 25 + 3 * L
    check(hidream, trc, book, ids, 0, "red", rows=[1], grid=(5, 5), pad=0)


def test_more_padding_never_becomes_a_pixel(hidream):
    """48x112 px: a 3x7 grid of 21 tokens and 4 padding tokens (keys with logit 0, which take a share
    of every row): the maps are the image block's, the padding columns no pixel's."""
    trc, book, ids = run(hidream, "a red cat", height=48, width=112)
    gen = trc.last_generation
    assert gen.image_size == (48, 112) and gen.grid_size == (3, 7)
    p = next(iter(book.values()))[0]
    assert p.shape[-1] == 25 + 3 * L and float(p[:, :, :21, 21:25].sum(-1).min()) > 1e-3
    ghm, self_ref, _ = check(hidream, trc, book, ids, 0, "cat", rows=[1], grid=(3, 7), pad=4)
    assert ghm.compute_pixel_heat_map([20]).value.shape == (3, 7)


def _state(pipe):
    tr = pipe.transformer
    mod = sys.modules[type(tr).__module__]
    return (
        {n: m.processor for n, m in tr.named_modules() if hasattr(m, "set_processor")},
        vars(mod).get("F"),
        len(tr._forward_pre_hooks),
        [len(getattr(pipe, f"text_encoder{s}")._forward_pre_hooks) for s in ("", "_2", "_3", "_4")],
        sorted(vars(pipe)),
    )


def test_everything_is_restored_also_after_an_exception(hidream):
    before = _state(hidream)
    with daami2i.trace(hidream):
        assert _state(hidream) != before
        call(hidream, "a cat")
    assert _state(hidream) == before
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(hidream):
            call(hidream, "a cat")
            raise RuntimeError("boom")
    assert _state(hidream) == before
    assert sys.modules[type(hidream.transformer).__module__].F is torch.nn.functional


def test_real_image_attribution(hidream):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    with encoder_ids(hidream) as ids:
        trc = daami2i.trace_image(hidream, image, "a red cat", timesteps=(300, 600), generator=g, max_sequence_length=L)
    gen = trc.last_generation
    assert gen.image_size == (64, 96) and gen.steps_captured == [0, 1] and gen.n_images == 1
    vae = hidream.vae
    with torch.no_grad(), recording(hidream.transformer) as book:
        pixels = hidream.image_processor.preprocess(image)
        lat = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        t5, _, llama, _, pooled, _ = hidream.encode_prompt(
            "a red cat", do_classifier_free_guidance=False, max_sequence_length=L
        )
        g = torch.Generator().manual_seed(0)
        for t in (300, 600):
            s = t / 1000
            noisy = (1 - s) * lat + s * torch.randn(lat.shape, generator=g)
            hidream.transformer(noisy, torch.tensor([float(t)]), t5, llama, pooled, return_dict=False)
    check(hidream, trc, dict(book), ids, 0, "cat", rows=[0])


def test_experiment_round_trip(hidream, tmp_path):
    with daami2i.trace(hidream) as trc:
        call(hidream, "a red cat and a blue dog")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    back = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
        assert torch.equal(
            back.compute_word_heat_map(word, stream="llama_block").value,
            ghm.compute_word_heat_map(word, stream="llama_block").value,
        )
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)
    assert not torch.equal(ghm.compute_word_heat_map("red").value, ghm.compute_word_heat_map("dog").value)


def test_cli_generate_and_show(hidream, tmp_path):
    """A pipeline reloaded from disk has the class's default area again (1024x1024 px: a 64x64 grid),
    which the pipeline keeps whatever --height / --width ask; square, and one pass (--guidance 1)."""
    from typer.testing import CliRunner

    from daami2i.cli import app

    hidream.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "1", "--guidance", "1"]
    res = CliRunner().invoke(app, [*args, "--height", "64", "--width", "64", "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.image_size == (1024, 1024)
    assert exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cat.png").is_file()


def test_bad_input_is_a_daami2i_error(hidream):
    adapter = daami2i.trace(hidream).adapter
    x = torch.zeros(2, 4, 8, 12)
    t5, llama = torch.zeros(2, 7, 16), torch.zeros(2, 2, 5, 24)
    with pytest.raises(daami2i.TraceError, match="T5 states"):
        adapter.read_call((x, torch.zeros(2)), {})
    with pytest.raises(daami2i.TraceError, match="Llama states"):
        adapter.read_call((x, torch.zeros(2), t5, torch.zeros(2, 5, 24)), {})
    c = adapter.read_call((x,), {"timesteps": torch.tensor([250.0, 250.0]), "encoder_hidden_states_t5": t5,
                               "encoder_hidden_states_llama3": llama})  # fmt: skip
    assert c.context.shape == (2, 17, 0) and c.timestep == 250.0
    with pytest.raises(daami2i.TraceError, match="after the adapter's geometry"):
        adapter.reference_tokens(c, (4, 6))
    assert adapter.geometry(hidream.transformer, c, {}, 1) == ((4, 6), (8, 12))
    assert adapter.reference_tokens(c, (4, 6)) == 1
    big = adapter.read_call((torch.zeros(1, 4, 8, 16), None, t5[:1], llama[:, :1]), {})
    with pytest.raises(daami2i.TraceError, match="more than the 25"):
        adapter.geometry(hidream.transformer, big, {}, 1)
    with pytest.raises(daami2i.TraceError, match="patches"):
        adapter.geometry(
            hidream.transformer, adapter.read_call((torch.zeros(1, 4, 7, 7), None, t5[:1], llama[:, :1]), {}), {}, 1
        )
    with pytest.raises(daami2i.TraceError, match="no T5 length plus two Llama lengths"):
        adapter.text_streams(hidream, 7 + 2 * 5)  # the 7-token T5 states above: not one max_sequence_length
    # a transformer call with prompt embeds of other lengths is refused before the model runs
    with pytest.raises(daami2i.TraceError, match="no T5 length"):
        with daami2i.trace(hidream):
            hidream.transformer(x[:1], torch.tensor([500.0]), t5[:1], llama[:, :1], torch.zeros(1, 32))


def test_a_prompt_longer_than_the_window_keeps_what_the_encoders_saw(hidream):
    """max_sequence_length=8: T5 sees 7 pieces and its end token, Llama its start token and 7 pieces;
    each stream is labelled with the prefix its encoder received, warned about, and a word past the
    window of every stream is a QueryError."""
    prompt = "a red cat on a blue chair near the old green door"
    with pytest.warns(UserWarning, match="window"):
        trc, book, ids = run(hidream, prompt, max_sequence_length=8)
    gen = trc.last_generation
    t5_ids, llama_ids = ids["text_encoder_3"][0][0].tolist(), ids["text_encoder_4"][0][0].tolist()
    assert len(t5_ids) == len(llama_ids) == 8 and t5_ids[-1] == hidream.tokenizer_3.eos_token_id
    t5_spec, llama_spec = gen.streams[:2]  # tokens: the whole prompt's; rows: the 7 the encoders saw
    assert t5_spec["tokens"][0][:7] == hidream.tokenizer_3.convert_ids_to_tokens(t5_ids[:7])
    assert llama_spec["tokens"][0][:7] == hidream.tokenizer_4.convert_ids_to_tokens(llama_ids[1:])
    assert [s["stop_row"] - s["first_row"] for s in gen.streams] == [7, 7, 7]
    assert trc._text_columns.tolist() == [*range(7), *range(9, 16), *range(17, 24)]
    ghm = trc.compute_global_heat_map()
    assert "cat" in ghm.words and "door" not in ghm.words
    _, maps_ref = dense(book, [1])
    for name, rows in word_rows(hidream, ids, 0, "cat", length=8).items():  # the streams' offsets at 8
        assert_close(ghm.compute_word_heat_map("cat", stream=name).value, maps_ref[rows].mean(0))
    with pytest.raises(daami2i.QueryError):
        ghm.compute_word_heat_map("door")

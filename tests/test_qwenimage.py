"""Qwen-Image: joint attention ``[text, image]`` of double-stream blocks. Every query equals a dense
reference built from the joint probabilities recorded in a separate, identical run by explicit
attention (the layers' own projections and QK norms, the rotary formula, the text padding mask);
the word maps' tokens are the ids the text encoder received (after the template's dropped prefix);
true CFG's negative prompt is a second call per step, captured alone or never."""

from __future__ import annotations

import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_qwenimage_pipeline
from reference import check_region_queries, column_query, rotary

ATOL = 1e-5
RTOL = 1e-4
KW = dict(height=64, width=96, num_inference_steps=2)
NEG = dict(negative_prompt="a blurry photo of many things", true_cfg_scale=2.0)  # a longer text than the prompt
QWEN_MODULE = "diffusers.models.transformers.transformer_qwenimage"


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= ATOL and err <= RTOL * max(scale, 1e-12) + 1e-9, f"max error {err:.3g} (map max {scale:.3g})"


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwenimage_pipeline()


class QwenRecorder:
    """Records the joint probabilities (B, H, S, S) of every call, in float64, computed from the
    layer's own projections and norms, the rotary formula (``reference.rotary`` on the complex
    frequencies' real and imaginary parts) and the text mask; the original processor then computes
    the layer's output, so a recorded run is bit-identical to a plain one."""

    def __init__(self, name, book, original):
        self.name, self.book, self.original = name, book, original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
        attention_mask=None, image_rotary_emb=None,
    ):  # fmt: skip
        with torch.no_grad():

            def split(x):
                return x.view(x.shape[0], x.shape[1], attn.heads, -1)  # (B, S, H, D)

            q, k = attn.norm_q(split(attn.to_q(hidden_states))), attn.norm_k(split(attn.to_k(hidden_states)))
            cq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            img_f, txt_f = image_rotary_emb  # complex (S, D / 2)

            def rope(x, f):
                cos, sin = f.real.repeat_interleave(2, -1), f.imag.repeat_interleave(2, -1)
                return rotary(x.double(), cos.double(), sin.double())

            q = torch.cat([rope(cq, txt_f), rope(q, img_f)], dim=1).transpose(1, 2)  # (B, H, S, D): [text, image]
            k = torch.cat([rope(ck, txt_f), rope(k, img_f)], dim=1).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            if encoder_hidden_states_mask is not None:
                n_img = hidden_states.shape[1]
                keys = torch.cat(
                    [encoder_hidden_states_mask.bool(), torch.ones_like(scores[:, 0, 0, :n_img]).bool()], 1
                )
                scores = scores.masked_fill(~keys[:, None, None, :], -torch.inf)
            self.book[self.name].append(torch.softmax(scores, dim=-1))
        return self.original(
            attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask, image_rotary_emb
        )


@contextmanager
def recording(transformer):
    book = defaultdict(list)
    originals = transformer.attn_processors
    transformer.set_attn_processor({n: QwenRecorder(n[: -len(".processor")], book, p) for n, p in originals.items()})
    try:
        yield book
    finally:
        transformer.set_attn_processor(dict(originals))


@contextmanager
def received_ids(pipe):
    """The input ids the text encoder receives, per call (the test's own hook)."""
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(kwargs.get("input_ids", args[0] if args else None).clone()),
        with_kwargs=True,
    )
    try:
        yield calls
    finally:
        handle.remove()


def call(pipe, prompt, **kw):
    kw = {**KW, **kw}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


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


def dense(trc, book, image, calls, n_cols=None):
    """Dense references of the layers the trace selected, from the recorded calls ``calls``: the self
    matrix (N x N) and the maps of the first ``n_cols`` text keys of each call (T, h, w); a call with
    fewer text keys adds nothing past them."""
    h, w = trc.last_generation.grid_size
    n = h * w
    self_names = [s.name for s in trc.sites if s.name in trc._self_names]
    cross_names = [s.name for s in trc.sites if s.name in trc._cross_names]
    total_self = torch.zeros(n, n, dtype=torch.float64)
    maps = []
    for name in dict.fromkeys(self_names + cross_names):
        acc_text = None
        for i, p in enumerate(book[name]):
            if i not in calls:
                continue
            t = p.shape[-1] - n  # this call's text length
            p = p[image].mean(0)  # (S, S), the head mean
            if name in self_names:
                total_self += p[t:, t:]
            cols = n_cols if n_cols is not None else t
            text = torch.zeros(n, cols, dtype=torch.float64)
            text[:, : min(t, cols)] = p[t:, : min(t, cols)]
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


def check_queries(trc, self_ref, word_ref, image_idx, word):
    gen = trc.last_generation
    grid = gen.grid_size
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    check_region_queries(ghm, self_ref, grid, gen.image_size, assert_close)
    if word is None:
        return ghm
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, grid))
    return ghm


def test_every_query_matches_the_joint_softmax(qwen):
    prompts = ["a red cat on a mat", "a blue dog"]  # different lengths: the shorter one's padding is masked
    trc, book, ids = run(qwen, prompts)
    gen = trc.last_generation
    assert gen.grid_size == (8, 12) and gen.image_size == (64, 96) and gen.n_images == 2 and not gen.cfg
    assert gen.steps_captured == [0, 1] and len(ids) == 1
    for i, (prompt, word) in enumerate(zip(prompts, ["red", "dog"], strict=True)):
        self_ref, maps_ref = dense(trc, book, i, {0, 1})
        rows = key_positions(qwen, ids[0][i], prompt, word)
        check_queries(trc, self_ref, maps_ref[rows].mean(0), i, word)
    # the mask is real: the short prompt's padded keys get no probability; and word maps are the text
    # columns of the joint softmax, not a softmax over the text alone
    p = book[trc._cross_sites[0].name][0]
    t = p.shape[-1] - 96
    n_short = len(qwen.tokenizer(qwen.prompt_template_encode.format(prompts[1])).input_ids)
    n_short -= qwen.prompt_template_encode_start_idx
    assert n_short < t and float(p[1, :, :, n_short:t].abs().max()) == 0.0
    text_mass = p[0, :, t:, :t].sum(-1)
    assert 0.01 < text_mass.mean().item() < 0.99


def test_word_tokens_are_the_ids_the_encoder_received(qwen):
    """The stream's tokens are the ids the text encoder received at the key columns the word maps use,
    also when the pipeline's template drops fewer positions than its system prefix."""
    prompt = "a red cat on a mat"
    for template, drop in (
        (None, None),
        ("<|im_start|>system\nPaint it:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n", 3),
    ):
        saved = qwen.prompt_template_encode, qwen.prompt_template_encode_start_idx
        if template is not None:
            qwen.prompt_template_encode, qwen.prompt_template_encode_start_idx = template, drop
        try:
            trc, book, ids = run(qwen, prompt)
        finally:
            qwen.prompt_template_encode, qwen.prompt_template_encode_start_idx = saved
        drop = drop if drop is not None else qwen.prompt_template_encode_start_idx
        gen = trc.last_generation
        (st,) = gen.streams
        received = ids[0][0].tolist()
        tokens = st["tokens"][0]
        columns = trc._text_columns.tolist()
        # the kept key columns hold the prompt's ids, then the template's end (<|im_end|>)
        assert [received[c + drop] for c in columns[: len(tokens)]] == qwen.tokenizer.convert_tokens_to_ids(tokens)
        assert qwen.tokenizer.decode(received[columns[0] + drop : columns[len(tokens) - 1] + drop + 1]) == prompt
        assert received[columns[len(tokens)] + drop] == qwen.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert (columns[0] > 0) == (template is not None)  # the undropped part of the system prefix comes first
        self_ref, maps_ref = dense(trc, book, 0, {0, 1})
        for word in ("red", "mat"):
            rows = [r for r in key_positions_with(qwen.tokenizer, received, prompt, word, drop)]
            check_queries(trc, self_ref, maps_ref[rows].mean(0), 0, word)


def key_positions_with(tok, row, prompt, word, drop):
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    start = next(i for i in range(len(row)) if row[i : i + len(p_ids)] == p_ids)
    w_ids = tok(" " + word, add_special_tokens=False).input_ids
    at = [start + j for j in range(len(p_ids)) if p_ids[j : j + len(w_ids)] == w_ids]
    assert at
    return [a + j - drop for a in at for j in range(len(w_ids))]


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_true_cfg_passes_are_captured_apart(qwen, halves):
    """True CFG calls the transformer twice per step (prompt, then the negative prompt, whose text is
    longer here): "cond" is the prompt's calls alone, "uncond" the negative prompt's, "both" their mean."""
    prompt = "a red cat"
    trc, book, ids = run(qwen, prompt, dict(halves=halves), **NEG)
    gen = trc.last_generation
    assert gen.steps_captured == [0, 1] and gen.steps_run == 2 and not gen.cfg and len(ids) == 2
    calls = {"cond": {0, 2}, "uncond": {1, 3}, "both": {0, 1, 2, 3}}[halves]
    lengths = {book[trc._cross_sites[0].name][i].shape[-1] - 96 for i in calls}
    assert len({book[trc._cross_sites[0].name][i].shape[-1] for i in range(4)}) == 2  # two text lengths
    n_cols = len(trc._text_columns)
    self_ref, maps_ref = dense(trc, book, 0, calls, n_cols=max(trc._text_columns.tolist()) + 1)
    if halves == "both":  # the two passes' mean, as a batch's halves are averaged
        self_ref, maps_ref = self_ref / 2, maps_ref / 2
    rows = key_positions(qwen, ids[0][0], prompt, "cat")  # the prompt's columns, in every kept pass
    ghm = check_queries(trc, self_ref, maps_ref[rows].mean(0), 0, "cat")
    assert len(lengths) == (2 if halves == "both" else 1) and n_cols == 4
    if halves == "cond":  # never the negative prompt's: its calls give another map
        _, neg_maps = dense(trc, book, 0, {1, 3}, n_cols=n_cols)
        assert float((neg_maps[rows].mean(0) - ghm.compute_word_heat_map("cat").value).abs().max()) > 1e-3


def test_a_shorter_negative_prompt_reads_zero_past_its_text(qwen):
    """halves="uncond" with a negative prompt shorter than the prompt: the prompt's columns past the
    negative prompt's text have no keys in its calls, and read as zero."""
    prompt = "a red cat on a mat by the door"
    trc, book, ids = run(qwen, prompt, dict(halves="uncond"), negative_prompt="dark", true_cfg_scale=2.0)
    t_neg = book[trc._cross_sites[0].name][1].shape[-1] - 96
    cols = trc._text_columns.tolist()
    assert max(cols) >= t_neg
    self_ref, maps_ref = dense(trc, book, 0, {1, 3}, n_cols=max(cols) + 1)
    rows = key_positions(qwen, ids[0][0], prompt, "door")
    assert min(rows) >= t_neg
    ghm = check_queries(trc, self_ref, None, 0, None)
    assert_close(ghm.compute_word_heat_map("door").value, maps_ref[rows].mean(0))
    assert float(ghm.compute_word_heat_map("door").value.abs().max()) == 0.0
    red = key_positions(qwen, ids[0][0], prompt, "red")  # within the negative prompt's text: its keys there
    assert max(red) < t_neg and float(maps_ref[red].abs().max()) > 0
    assert_close(ghm.compute_word_heat_map("red").value, maps_ref[red].mean(0))


def test_uncond_without_a_negative_prompt_is_an_error(qwen):
    with pytest.raises(daami2i.TraceError, match="qwenimage ran step 0 without a second"):
        with daami2i.trace(qwen, halves="uncond"):
            call(qwen, "a red cat")


def test_every_patch_is_undone_also_after_an_exception(qwen):
    before = dict(qwen.transformer.attn_processors)
    dispatch = vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"]
    hooks = (len(qwen.transformer._forward_pre_hooks), len(qwen.text_encoder._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(qwen):
            call(qwen, "a cat", **NEG)
            assert all(type(p).__name__ == "JointCapturingProcessor" for p in qwen.transformer.attn_processors.values())
            assert vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"] is not dispatch
            raise RuntimeError("boom")
    assert qwen.transformer.attn_processors == before
    assert vars(sys.modules[QWEN_MODULE])["dispatch_attention_fn"] is dispatch
    assert (len(qwen.transformer._forward_pre_hooks), len(qwen.text_encoder._forward_pre_hooks)) == hooks
    assert "check_inputs" not in vars(qwen) and "postprocess" not in vars(qwen.image_processor)


def test_store_size_is_estimated_exactly(qwen):
    with daami2i.trace(qwen, max_store_mb=100) as trc:
        call(qwen, "a red cat", **NEG)
    gen = trc.last_generation
    n_text = next(iter(gen.cross_attention.values())).sums.shape[-1]
    est = trc.estimate_nbytes(gen.latent_size, 1, n_text)
    assert est["total"] == gen.nbytes() == 96 * 96 * 4 + len(trc._cross_sites) * 96 * n_text * 4
    with pytest.raises(daami2i.TraceError, match="over max_store_mb"):
        with daami2i.trace(qwen, max_store_mb=0.01):
            call(qwen, "a red cat")


def test_real_image_attribution(qwen):
    """trace_image equals the recorded joint softmax of the same transformer calls, made by hand here."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    with received_ids(qwen) as ids:
        trc = daami2i.trace_image(qwen, image, "a red cat", timesteps=(300, 600), generator=g)
    gen = trc.last_generation
    assert gen.image_size == (64, 96) and gen.steps_captured == [0, 1] and gen.n_images == 1
    vae = qwen.vae
    with torch.no_grad(), recording(qwen.transformer) as book:
        x = vae.encode(qwen.image_processor.preprocess(image)[:, :, None]).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        x = (x - mean) / std
        emb, mask = qwen.encode_prompt("a red cat")
        g = torch.Generator().manual_seed(0)
        for t in (300, 600):
            noisy = (1 - t / 1000) * x + t / 1000 * torch.randn(x.shape, generator=g)
            packed = noisy.view(1, 4, 8, 2, 12, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 96, 16)
            qwen.transformer(
                hidden_states=packed, timestep=torch.tensor([t / 1000]), encoder_hidden_states=emb,
                encoder_hidden_states_mask=mask, img_shapes=[[(1, 8, 12)]],
            )  # fmt: skip
    self_ref, maps_ref = dense(trc, dict(book), 0, {0, 1})
    check_queries(trc, self_ref, maps_ref[key_positions(qwen, ids[0][0], "a red cat", "cat")].mean(0), 0, "cat")


def test_experiment_round_trip(qwen, tmp_path):
    with daami2i.trace(qwen) as trc:
        call(qwen, "a red cat and a blue dog")
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")
    back = exp.compute_global_heat_map()
    assert [s.name for s in back.streams] == ["qwen"]
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)


def test_cli_generate_and_show(qwen, tmp_path):
    """A saved pipeline reloads with the real pipeline's 34 dropped positions (this tiny tokenizer's
    system prefix is longer): the labels still come from the ids the encoder received."""
    from typer.testing import CliRunner

    from daami2i.cli import app

    qwen.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "96"]
    res = runner.invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "words" / "cat.png").is_file()
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.image_size == (64, 96) and exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = runner.invoke(app, ["show", str(out / "experiment"), "--word", "red", "-o", str(tmp_path / "red.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "red.png").is_file()


def test_a_negative_pass_on_a_fresh_but_equal_input_is_still_a_pass():
    """Edit concatenates the latents and the reference image's tokens anew for each call: the
    negative prompt's call is told from the next step by its equal input at the same timestep."""
    from daami2i.tracing.families import DenoiserCall, QwenImageAdapter

    tracker = QwenImageAdapter().new_pass_tracker()
    latents, ref = torch.randn(1, 96, 16), torch.randn(1, 40, 16)
    seen = []
    for t in (1.0, 0.5):
        for _ in ("cond", "uncond"):
            seen.append(tracker.is_repeat(DenoiserCall(torch.cat([latents, ref], 1), None, t), bool(seen)))
        latents = latents - 0.1  # the scheduler's step
    assert seen == [False, True, False, True]
    assert not tracker.is_repeat(DenoiserCall(torch.cat([latents, ref], 1), None, 0.25), True)
    assert not tracker.is_repeat(DenoiserCall(torch.cat([latents + 1, ref], 1), None, 0.25), True)  # same t, new input


def test_steps_are_counted_once_per_step_with_true_cfg(qwen):
    with daami2i.trace(qwen, steps=[1, 2]) as trc:
        call(qwen, "a red cat", num_inference_steps=3, **NEG)
    gen = trc.last_generation
    assert gen.steps_run == 3 and gen.steps_captured == [1, 2]

"""Flux.2 Klein: every query equals a dense reference built from the joint attention probabilities,
recorded in a separate, identical run by explicit attention computed from the layers' own
projections (the single-stream blocks' fused one included), QK norms and the rotary formula. The
word labels are the ids the text encoder received (the prompt wrapped in Qwen's chat template); the
guidance pass (the empty prompt) is a second transformer call, captured alone or not at all."""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import daami2i
from daami2i.testing import tiny_flux2_pipeline
from reference import (
    check_region_queries,
    column_query,
    diffused_reference,
    rotary,
)

ATOL = 1e-5
RTOL = 1e-4
FLUX2_MODULE = "diffusers.models.transformers.transformer_flux2"


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= ATOL and err <= RTOL * max(scale, 1e-12) + 1e-9, f"max error {err:.3g} (map max {scale:.3g})"


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_pipeline()


# -- the dense reference ------------------------------------------------------------------------------
def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))  # (B, S, H, D)


def _probs(q: torch.Tensor, k: torch.Tensor, rope, kv: dict, n_text: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float64 after the rotary formula; q, k (B, S, H, D) -> (B, H, S, S).

    ``kv`` holds the processor's KV-cache arguments (``Flux2KleinKVPipeline`` with a reference image).
    There the image queries attend to the keys ``[text, reference, image]``: the reference tokens sit
    between text and image in the first step (their keys are then cached) and come from the cache in
    the others. Those probabilities are returned in Kontext's layout ``[text, image, reference]``,
    their image-query rows only (the rest is zero)."""
    cos, sin = (t.double() for t in rope)
    q, k = rotary(q.double(), cos, sin).transpose(1, 2), rotary(k.double(), cos, sin).transpose(1, 2)
    mode, n_ref = kv.get("kv_cache_mode"), int(kv.get("num_ref_tokens") or 0)
    t = n_text
    if mode == "extract" and n_ref:  # [text, reference, image]
        q_img, keys = q[:, :, t + n_ref :], k
    elif mode == "cached" and kv.get("kv_cache") is not None:  # [text, image]; cached reference keys
        k_ref = kv["kv_cache"].get()[0].double().transpose(1, 2)
        n_ref = k_ref.shape[2]
        q_img, keys = q[:, :, t:], torch.cat([k[:, :, :t], k_ref, k[:, :, t:]], dim=2)
    else:
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    p = torch.softmax(q_img @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, N, T + R + N)
    p = torch.cat([p[..., :t], p[..., t + n_ref :], p[..., t : t + n_ref]], dim=-1)  # keys [text, image, ref]
    n = q_img.shape[2]
    out = p.new_zeros(*p.shape[:2], t + n + n_ref, t + n + n_ref)
    out[:, :, t : t + n] = p
    return out


class DoubleRecorder:
    """A double-stream layer: image q / k from ``to_q`` / ``to_k``, text from ``add_*_proj``, [text, image]."""

    def __init__(self, name, book, original):
        self.name, self.book, self.original = name, book, original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kv
    ):
        with torch.no_grad():
            q = attn.norm_q(_heads(attn, attn.to_q(hidden_states)))
            k = attn.norm_k(_heads(attn, attn.to_k(hidden_states)))
            cq = attn.norm_added_q(_heads(attn, attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(_heads(attn, attn.add_k_proj(encoder_hidden_states)))
            p = _probs(torch.cat([cq, q], 1), torch.cat([ck, k], 1), image_rotary_emb, kv, cq.shape[1])
            self.book[self.name].append(p)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kv)


class SingleRecorder:
    """A single-stream layer: q and k are the first two thirds of the fused projection's QKV part."""

    def __init__(self, name, book, original):
        self.name, self.book, self.original = name, book, original

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **kv):
        with torch.no_grad():
            fused = attn.to_qkv_mlp_proj(hidden_states)[..., : 3 * attn.inner_dim]
            q, k, _ = fused.chunk(3, dim=-1)
            q, k = attn.norm_q(_heads(attn, q)), attn.norm_k(_heads(attn, k))
            self.book[self.name].append(_probs(q, k, image_rotary_emb, kv, int(kv.get("num_txt_tokens") or 0)))
        return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kv)


def _kv_signature(cls, original):
    """A recorder class whose ``__call__`` declares the KV-cache arguments the original takes, so that
    diffusers (which drops the arguments a processor does not declare) still hands them over."""
    import inspect

    names = set(inspect.signature(original.__call__).parameters) & {
        "kv_cache", "kv_cache_mode", "num_ref_tokens", "num_txt_tokens"
    }  # fmt: skip
    if not names:
        return cls
    base = inspect.signature(cls.__call__)
    params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in sorted(names)]

    def __call__(self, *args, **kw):
        return cls.__call__(self, *args, **kw)

    __call__.__signature__ = base.replace(parameters=params)
    return type(cls.__name__, (cls,), {"__call__": __call__})


@contextmanager
def recording(transformer):
    """Record every layer's joint probabilities; yields {layer: [(B, H, S, S) per call]}."""
    book: dict = defaultdict(list)
    originals = transformer.attn_processors
    procs = {}
    for n, p in originals.items():
        name = n[: -len(".processor")]
        cls = SingleRecorder if name.startswith("single_transformer_blocks.") else DoubleRecorder
        procs[n] = _kv_signature(cls, p)(name, book, p)
    transformer.set_attn_processor(procs)
    try:
        yield book
    finally:
        transformer.set_attn_processor(dict(originals))


@contextmanager
def encoder_ids(pipe):
    """The input ids of every text-encoder call: [(B, L) per call]."""
    seen: list[torch.Tensor] = []

    def keep(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.detach().clone())

    handle = pipe.text_encoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def call(pipe, prompt, **kw):
    kw = {"height": 64, "width": 96, "num_inference_steps": 2, **kw}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def run(pipe, prompt, trace_kwargs=None, **kw):
    """(trace, recorded probabilities, ids the encoder received in the traced run, traced == plain)."""
    plain = call(pipe, prompt, **kw)
    with recording(pipe.transformer) as book:
        recorded = call(pipe, prompt, **kw)
    with encoder_ids(pipe) as ids, daami2i.trace(pipe, **(trace_kwargs or {})) as trc:
        traced = call(pipe, prompt, **kw)
    assert np.array_equal(plain, recorded), "the reference recorder changed the images"
    assert np.array_equal(plain, traced), "tracing changed the images"
    return trc, dict(book), ids


def dense(trc, book, rows, calls=None, n_text=None):
    """(self (N x N), token maps over the whole text sequence (T, h, w)) of the layers the trace
    selected, summed over the chosen calls, mean over layers; [text, image (, reference)]."""
    h, w = trc.last_generation.grid_size
    n = h * w
    self_names = [s.name for s in trc.sites if s.name in trc._self_names]
    cross_names = [s.name for s in trc.sites if s.name in trc._cross_names]
    total_self = torch.zeros(n, n, dtype=torch.float64)
    maps = []
    for name in dict.fromkeys(self_names + cross_names):
        acc_self, acc_text = 0, 0
        for i, p in enumerate(book[name]):
            if calls is not None and i not in calls:
                continue
            t = p.shape[-1] - n if n_text is None else n_text
            p = p[rows].mean(dim=(0, 1))  # (S, S)
            acc_self = acc_self + p[t : t + n, t : t + n]
            acc_text = acc_text + p[t : t + n, :t]
        if name in self_names:
            total_self += acc_self
        if name in cross_names:
            maps.append(acc_text.T.reshape(-1, h, w))
    return (total_self / len(self_names)).float(), torch.stack(maps).mean(0).float()


def prompt_positions(tokenizer, received: torch.Tensor, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s pieces in the ids the encoder received: the prompt's ids are found in
    them (after the chat template's prefix) and the word's pieces by their character spans."""
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids, spans = enc.input_ids, enc.offset_mapping
    seq = received.tolist()
    starts = [i for i in range(len(seq) - len(ids) + 1) if seq[i : i + len(ids)] == ids]
    assert len(starts) == 1, f"the prompt's ids occur {len(starts)} times in what the encoder received"
    found = [m.span() for m in re.finditer(rf"\b{re.escape(word.lower())}\b", prompt.lower())]  # every occurrence
    pieces = [j for j, (a, b) in enumerate(spans) if any(a < hi and b > lo for lo, hi in found)]
    return [starts[0] + j for j in pieces]


def check_queries(pipe, trc, self_ref, maps_ref, image_idx, received, prompt, word):
    """Every query of image ``image_idx`` against the dense reference; the word's rows are located
    in the ids the encoder received for that image."""
    gen = trc.last_generation
    grid = gen.grid_size
    ghm = trc.compute_global_heat_map(image_idx=image_idx)
    check_region_queries(ghm, self_ref, grid, gen.image_size, assert_close)
    rows = prompt_positions(pipe.tokenizer, received, prompt, word)
    assert rows and min(rows) > 0  # after the chat template's "<|im_start|>user\n"
    word_ref = maps_ref[rows].mean(0)
    wm = ghm.compute_word_heat_map(word)
    assert_close(wm.value, word_ref)
    assert_close(ghm.compute_guided_heat_map(wm).value, column_query(self_ref, word_ref, grid))
    ours_at = lambda k: ghm.compute_grown_heat_map(wm, iterations=k, threshold=0.4).value  # noqa: E731
    query = lambda g: column_query(self_ref, g, grid)  # noqa: E731
    m, near, cut = diffused_reference(query, word_ref, 3, 0.4, assert_close, ours_at)
    assert_close(ours_at(3), m)
    assert near <= 0.02 * cut, (near, cut)
    return ghm


# -- the tests ------------------------------------------------------------------------------------------
def test_every_query_matches_the_joint_softmax(klein):
    """Two prompts, the pipeline's default 512 padded (unmasked) Qwen3 tokens, guidance on: the
    conditional passes (the first call of each step) against the recorded joint softmax."""
    prompts = ["a red cat", "a blue dog sitting on a green mat"]
    trc, book, ids = run(klein, prompts)
    gen = trc.last_generation
    assert gen.grid_size == (8, 12) and gen.image_size == (64, 96) and gen.latent_size == (16, 24)
    assert gen.n_images == 2 and not gen.cfg and gen.steps_captured == [0, 1]
    assert [tuple(i.shape) for i in ids] == [(2, 512), (2, 512)]  # the prompts, then the empty negative prompt
    first = book["transformer_blocks.0.attn"][0]
    assert first.shape[-1] == 512 + 96 and len(book["transformer_blocks.0.attn"]) == 4  # 2 steps x 2 passes
    for i, (prompt, word) in enumerate(zip(prompts, ["red", "dog"], strict=True)):
        self_ref, maps_ref = dense(trc, book, [i], calls={0, 2})
        check_queries(klein, trc, self_ref, maps_ref, i, ids[0][i], prompt, word)
    # word maps are text columns of the joint softmax over 512 text and 96 image keys, not a softmax of their own
    p = book["single_transformer_blocks.1.attn"][0][0]
    text_mass = p[:, 512:, :512].sum(-1)
    assert 0.01 < text_mass.mean().item() < 0.99


def test_labels_are_the_ids_the_encoder_received(klein):
    """The chat template puts "<|im_start|>user\\n" before the prompt and the assistant's turn after
    it: the word maps' text columns are the positions of the prompt's ids in what the encoder got."""
    prompt = "a red cat and a blue dog"
    trc, book, ids = run(klein, prompt, max_sequence_length=48)
    received = ids[0][0]
    tok = klein.tokenizer
    template = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert received.tolist()[: len(tok(template).input_ids)] == tok(template).input_ids
    ghm = trc.compute_global_heat_map()
    assert ghm.words == ["a", "red", "cat", "and", "blue", "dog"]
    _, maps_ref = dense(trc, book, [0], calls={0, 2})
    for word in ("a", "red", "cat", "blue", "dog"):
        rows = prompt_positions(tok, received, prompt, word)
        assert len(rows) == (2 if word == "a" else 1)  # "a" occurs twice: both occurrences are merged
        assert {t.lstrip("Ġ") for t in tok.convert_ids_to_tokens(received[rows].tolist())} == {word}
        assert_close(ghm.compute_word_heat_map(word).value, maps_ref[rows].mean(0))
    # a map of template tokens is not any word's: "user" (position 1) differs from the prompt's first word
    assert not torch.allclose(maps_ref[1], ghm.compute_word_heat_map("a").value)


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_guidance_passes_are_never_averaged(klein, halves):
    """With guidance the transformer runs twice per step, the prompt first (cache_context "cond"),
    then the empty prompt ("uncond"): each pass is captured alone, or both with halves="both" (their mean)."""
    trc, book, ids = run(klein, "a red cat", dict(halves=halves), max_sequence_length=32)
    gen = trc.last_generation
    assert gen.steps_captured == [0, 1] and gen.steps_run == 2 and not gen.cfg
    empty = klein.tokenizer(_template(klein, "")).input_ids  # the second encoder call: the empty prompt
    assert ids[1][0].tolist()[: len(empty)] == empty and ids[0][0].tolist()[: len(empty)] != empty
    calls = {"cond": {0, 2}, "uncond": {1, 3}, "both": {0, 1, 2, 3}}[halves]
    self_ref, maps_ref = dense(trc, book, [0], calls=calls)
    if halves == "both":  # the two passes' mean, as a batch's halves are averaged
        self_ref, maps_ref = self_ref / 2, maps_ref / 2
    ghm = trc.compute_global_heat_map()
    wp = torch.zeros(96)
    wp[[3, 40]] = 1
    ours = ghm.compute_pixel_heat_map([3, 40]).value
    assert_close(ours, column_query(self_ref, wp, (8, 12)))
    other, _ = dense(trc, book, [0], calls={0, 2} if halves != "cond" else {1, 3})
    assert not torch.allclose(ours, column_query(other, wp, (8, 12)), atol=1e-4)
    if halves == "cond":
        check_queries(klein, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")


def _template(pipe, prompt):
    return pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def test_without_guidance_there_is_one_pass(klein):
    trc, book, ids = run(klein, "a red cat", guidance_scale=1.0, max_sequence_length=32)
    assert len(ids) == 1 and len(book["transformer_blocks.0.attn"]) == 2
    self_ref, maps_ref = dense(trc, book, [0])
    check_queries(klein, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")
    with pytest.raises(daami2i.TraceError, match="flux2 ran step 0 without a second"):
        with daami2i.trace(klein, halves="uncond"):
            call(klein, "a red cat", guidance_scale=1.0, max_sequence_length=32)


def test_a_distilled_model_has_no_guidance_pass():
    pipe = tiny_flux2_pipeline(distilled=True)
    trc, book, ids = run(pipe, "a red cat", guidance_scale=4.0, max_sequence_length=32)
    assert len(book["transformer_blocks.0.attn"]) == 2 and trc.last_generation.steps_captured == [0, 1]
    self_ref, maps_ref = dense(trc, book, [0])
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")
    with pytest.raises(daami2i.TraceError, match="is_distilled"):
        with daami2i.trace(pipe, halves="uncond"):
            call(pipe, "a red cat", max_sequence_length=32)


def test_reference_image_tokens_are_keys_not_output(klein):
    """Klein's editing input: the reference image's tokens follow the output's (position ids t = 10)
    and take part in every softmax, but the grid, the self-attention and the word maps are the output's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    trc, book, ids = run(klein, "a red cat", image=reference, max_sequence_length=32)
    gen = trc.last_generation
    assert gen.grid_size == (8, 12) and gen.steps_captured == [0, 1]
    first = book["transformer_blocks.0.attn"][0]
    assert first.shape[-1] == 32 + 2 * 96
    self_ref, maps_ref = dense(trc, book, [0], calls={0, 2}, n_text=32)
    check_queries(klein, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")


def test_inpaint_is_traced_as_klein():
    from PIL import Image

    pipe = tiny_flux2_pipeline(kind="inpaint")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (20, 10, 60, 50))
    trc, book, ids = run(pipe, "a red cat", image=image, mask_image=mask, max_sequence_length=32, strength=0.9)
    gen = trc.last_generation
    assert gen.grid_size == (8, 12)
    n_calls = len(book["transformer_blocks.0.attn"])
    cond = set(range(0, n_calls, 2))  # guidance on: the prompt's pass first in each step
    self_ref, maps_ref = dense(trc, book, [0], calls=cond, n_text=32)
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")


def test_kv_pipeline_with_and_without_a_reference_image():
    """Flux2KleinKVPipeline: without a reference image it runs plain attention; with one, the first
    step puts the reference tokens between text and image (their keys then cached, their own
    attention a separate call) and later steps inject the cached keys there. Either way the image
    queries' softmax over text, image and reference keys is what the maps are made of."""
    from PIL import Image

    pipe = tiny_flux2_pipeline(kind="kv")
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {
        "Flux2KVAttnProcessor",
        "Flux2KVParallelSelfAttnProcessor",
    }
    trc, book, ids = run(pipe, "a red cat", max_sequence_length=32)
    self_ref, maps_ref = dense(trc, book, [0])
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")
    rng = np.random.default_rng(1)
    reference = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    trc, book, ids = run(pipe, "a red cat", image=reference, max_sequence_length=32, num_inference_steps=3)
    gen = trc.last_generation
    assert gen.grid_size == (8, 12) and gen.steps_captured == [0, 1, 2]
    assert [p.shape[-1] for p in book["single_transformer_blocks.0.attn"]] == [32 + 2 * 96] * 3
    self_ref, maps_ref = dense(trc, book, [0], n_text=32)
    check_queries(pipe, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")
    # the reference image matters: its keys take a share of every image query's attention
    p = book["transformer_blocks.0.attn"][1][0, :, 32:128]
    assert 0.01 < p[..., 128:].sum(-1).mean().item() < 0.99


def test_hooks_are_removed_also_after_an_exception(klein):
    before = dict(klein.transformer.attn_processors)
    module = sys.modules[FLUX2_MODULE]
    fn = module.dispatch_attention_fn
    hooks = (len(klein.transformer._forward_pre_hooks), len(klein.text_encoder._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with daami2i.trace(klein):
            call(klein, "a cat", max_sequence_length=32)
            assert all(
                type(p).__name__ == "JointCapturingProcessor" for p in klein.transformer.attn_processors.values()
            )
            assert module.dispatch_attention_fn is not fn
            raise RuntimeError("boom")
    assert klein.transformer.attn_processors == before
    assert module.dispatch_attention_fn is fn
    assert (len(klein.transformer._forward_pre_hooks), len(klein.text_encoder._forward_pre_hooks)) == hooks
    assert not {"check_inputs", "encode_prompt"} & set(vars(klein))
    assert "postprocess" not in vars(klein.image_processor)


def test_store_size_is_estimated(klein):
    with daami2i.trace(klein, max_store_mb=100) as trc:
        call(klein, ["a red cat", "a dog"], max_sequence_length=40)
    gen = trc.last_generation
    n_text = next(iter(gen.cross_attention.values())).sums.shape[-1]
    est = trc.estimate_nbytes(gen.latent_size, 2, n_text)
    assert est["total"] == gen.nbytes() == 2 * (96 * 96 * 4 + 3 * 96 * n_text * 4)
    with pytest.raises(daami2i.TraceError, match="over max_store_mb"):
        with daami2i.trace(klein, max_store_mb=0.01):
            call(klein, "a red cat", max_sequence_length=32)


def test_real_image_attribution(klein):
    """trace_image on Klein equals the recorded joint softmax of the same transformer calls, written
    out here: the VAE's mode, 2x2 patches, the batch-norm statistics, rectified-flow noise, t / 1000."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    kw = dict(timesteps=(300, 700), draws=2, generator=torch.Generator().manual_seed(0), max_sequence_length=32)
    with encoder_ids(klein) as ids:
        trc = daami2i.trace_image(klein, image, "a red cat", **kw)
    gen = trc.last_generation
    assert gen.image_size == (64, 96) and gen.grid_size == (8, 12) and gen.steps_captured == [0, 1, 2, 3]
    vae = klein.vae
    with torch.no_grad(), recording(klein.transformer) as book:
        x = klein.image_processor.preprocess(image)
        lat = vae.encode(x).latent_dist.mode()  # (1, 4, 16, 24)
        lat = lat.view(1, 4, 8, 2, 12, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 16, 8, 12)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        lat = (lat - mean) / std
        emb, txt_ids = klein.encode_prompt("a red cat", max_sequence_length=32)
        img_ids = torch.zeros(8, 12, 4, dtype=torch.long)
        img_ids[..., 1] += torch.arange(8)[:, None]
        img_ids[..., 2] += torch.arange(12)[None, :]
        g = torch.Generator().manual_seed(0)
        for t in (300, 700):
            for _ in range(2):
                s = t / 1000
                noisy = (1 - s) * lat + s * torch.randn(lat.shape, generator=g)
                klein.transformer(
                    hidden_states=noisy.reshape(1, 16, 96).transpose(1, 2), timestep=torch.tensor([s]),
                    encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids.view(1, 96, 4),
                )  # fmt: skip
    self_ref, maps_ref = dense(trc, dict(book), [0])
    check_queries(klein, trc, self_ref, maps_ref, 0, ids[0][0], "a red cat", "cat")


def test_experiment_round_trip(klein, tmp_path):
    with daami2i.trace(klein) as trc:
        call(klein, "a red cat and a blue dog", max_sequence_length=32)
        ghm = trc.compute_global_heat_map()
        trc.to_experiment(tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")
    back = exp.compute_global_heat_map()
    assert back.words == ghm.words == ["a", "red", "cat", "and", "blue", "dog"]
    for word in ("red", "dog"):
        assert torch.equal(back.compute_word_heat_map(word).value, ghm.compute_word_heat_map(word).value)
    assert torch.equal(back.compute_pixel_heat_map([7]).value, ghm.compute_pixel_heat_map([7]).value)


def test_cli_generate_and_show(klein, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    klein.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a red cat", "-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "96"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "words" / "cat.png").is_file()
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.generation.image_size == (64, 96) and exp.compute_global_heat_map().words == ["a", "red", "cat"]
    res = CliRunner().invoke(app, ["show", str(out / "experiment"), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cat.png").is_file()


def test_bad_calls_are_trace_errors(klein):
    emb, txt_ids = klein.encode_prompt("a cat", max_sequence_length=32)
    with torch.no_grad(), daami2i.trace(klein):
        with pytest.raises(daami2i.TraceError, match="img_ids"):
            klein.transformer(
                hidden_states=torch.randn(1, 96, 16), timestep=torch.tensor([0.5]), encoder_hidden_states=emb,
                txt_ids=txt_ids, img_ids=None,
            )  # fmt: skip


def test_flux2_pipeline_with_mistral_is_not_claimed(klein):
    """Flux2Pipeline's text encoder is Mistral 3 behind a processor and a system prompt: another
    text stream than Klein's, refused with the list of what is supported rather than mislabelled."""
    import types

    class Mistral3ForConditionalGeneration(torch.nn.Module):
        pass

    pipe = types.SimpleNamespace(
        transformer=klein.transformer, unet=None, text_encoder=Mistral3ForConditionalGeneration(),
        check_inputs=lambda *a, **k: None,
    )  # fmt: skip
    with pytest.raises(daami2i.UnsupportedPipelineError, match="Flux.2 Klein"):
        daami2i.trace(pipe)

"""The family registry: each tiny pipeline is claimed by exactly its adapter, the adapters' geometry
agrees with what the pipelines actually run, and an unsupported pipeline's error lists them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image

import daami2i
from daami2i.testing import (
    tiny_animatediff_pipeline,
    tiny_chroma_pipeline,
    tiny_cogvideox_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_hidream_pipeline,
    tiny_hunyuanvideo15_pipeline,
    tiny_hunyuanvideo_pipeline,
    tiny_ltx_pipeline,
    tiny_lumina2_pipeline,
    tiny_pixart_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_wan_pipeline,
    tiny_zimage_pipeline,
)
from daami2i.testing.hunyuanvideo import prompt_template as hunyuan_template
from daami2i.tracing.families import ADAPTERS, adapter_for


@dataclass(frozen=True)
class Family:
    """One family of the conformance suite: its tiny pipelines and what each generation passes
    besides prompt, steps and size. Adding a family to the suite is one line in FAMILIES."""

    makers: tuple[Callable[[], Any], ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    denoiser: str = "transformer"  # the pipeline attribute holding the denoiser
    explorer: bool = True  # exercised by the explorer test here (the UNet's is tested in test_explorer)
    per_maker: tuple[dict[str, Any], ...] = ()  # further options of the i-th maker's pipeline (an input image)
    frames: int = 1  # video: the latent frames of a generation, traced stacked top to bottom


T5_32 = {"max_sequence_length": 32}
FAMILIES: dict[str, Family] = {
    "unet": Family(
        (lambda: tiny_sd_pipeline("sd1"), lambda: tiny_sd_pipeline("sd2"), tiny_sdxl_pipeline), {}, "unet", False
    ),
    "sd3": Family((tiny_sd3_pipeline,)),
    "flux": Family((tiny_flux_pipeline,), T5_32),
    "flux2": Family((tiny_flux2_pipeline, lambda: tiny_flux2_pipeline(kind="kv")), T5_32),
    "chroma": Family((tiny_chroma_pipeline,), T5_32),
    # PixArt: generate at the size asked for (not at the nearest aspect-ratio bin), no caption cleaner
    "pixart": Family((tiny_pixart_pipeline,), {**T5_32, "use_resolution_binning": False, "clean_caption": False}),
    "zimage": Family((tiny_zimage_pipeline,)),
    "qwenimage": Family(
        (tiny_qwenimage_pipeline, lambda: tiny_qwenimage_pipeline(kind="edit")),
        per_maker=({}, {"image": Image.new("RGB", (64, 48), (200, 40, 40))}),  # Edit: the image to edit
    ),
    # the default text length: Lumina's system prompt alone takes about 60 tiny-Gemma tokens
    "lumina2": Family((tiny_lumina2_pipeline,)),
    "sana": Family((tiny_sana_pipeline,), {**T5_32, "use_resolution_binning": False}),
    # HiDream rescales every size to its area (the tiny pipeline's 80x80 px): 64x96 stays, 64x64 is 80x80
    "hidream": Family((tiny_hidream_pipeline,), T5_32),
    # video: 5 frames are 2 latent frames (the VAE's time compression 4), stacked
    "wan": Family(
        (tiny_wan_pipeline, lambda: tiny_wan_pipeline(boundary_ratio=0.9)),  # Wan 2.1; Wan 2.2's two experts
        {**T5_32, "num_frames": 5},
        explorer=False,
        frames=2,
    ),
    # CogVideoX 1.0 and 1.5 (the text length must be the transformer's: 16); 5 frames are 2 latent frames
    # AnimateDiff: frames are a batch of the spatial layers; motion modules attend across them
    "animatediff": Family((tiny_animatediff_pipeline,), {"num_frames": 4}, "unet", explorer=False, frames=4),
    "cogvideox": Family(
        (tiny_cogvideox_pipeline, lambda: tiny_cogvideox_pipeline(patch_size_t=2)),
        {"max_sequence_length": 16, "num_frames": 5},
        explorer=False,
        frames=2,
    ),
    # LTX-Video 0.9 and the 0.9.5 VAE layout; 9 frames are 2 latent frames (time by 8)
    "ltx": Family(
        (tiny_ltx_pipeline, lambda: tiny_ltx_pipeline(version="0.9.5")),
        {"max_sequence_length": 16, "num_frames": 9},
        explorer=False,
        frames=2,
    ),
    # HunyuanVideo 1.0 (the template's crop_start for the tiny tokenizer); 5 frames are 2 latent frames
    "hunyuanvideo": Family(
        (tiny_hunyuanvideo_pipeline,),
        {"max_sequence_length": 16, "num_frames": 5, "prompt_template": hunyuan_template()},
        explorer=False,
        frames=2,
    ),
    # HunyuanVideo 1.5 (the guider's two calls per step; the tiny Qwen / ByT5 lengths); 5 frames: 2 latent frames
    "hunyuanvideo15": Family((tiny_hunyuanvideo15_pipeline,), {"num_frames": 5}, explorer=False, frames=2),
}
NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def pipes():
    return {name: [make() for make in fam.makers] for name, fam in FAMILIES.items()}


def processors(denoiser: Any) -> dict[str, Any]:
    """Every attention layer's processor (not every denoiser class has ``attn_processors``)."""
    return {n: m.processor for n, m in denoiser.named_modules() if callable(getattr(m, "set_processor", None))}


def generation_kwargs(family: str, maker: int = 0, **kw: Any) -> dict[str, Any]:
    fam = FAMILIES[family]
    extra = fam.per_maker[maker] if maker < len(fam.per_maker) else {}
    return {**fam.kwargs, **extra, **kw}


def test_each_pipeline_is_claimed_by_its_own_adapter(pipes):
    for name, group in pipes.items():
        for pipe in group:
            claims = [a.name for a in ADAPTERS if a.denoiser_of(pipe) is not None]
            assert claims == [name], (type(pipe).__name__, claims)
            denoiser, adapter = adapter_for(pipe)
            assert adapter.name == name
            assert denoiser is getattr(pipe, FAMILIES[name].denoiser)
    assert sorted(pipes) == sorted(a.name for a in ADAPTERS)  # every registered family is exercised here


def test_unsupported_pipeline_lists_every_family():
    class Other:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(daami2i.UnsupportedPipelineError) as err:
        daami2i.trace(Other())
    message = str(err.value)
    assert "its transformer is a Linear" in message
    for adapter in ADAPTERS:
        assert adapter.pipelines in message


@pytest.mark.parametrize("family", NAMES)
def test_geometry_is_what_the_denoiser_ran(pipes, family):
    """The adapter's token grid times the tokens per layer call equals the query length each
    captured layer saw, and its latent size is the pipeline's latent."""
    pipe = pipes[family][0]
    kw = generation_kwargs(family, num_inference_steps=1, height=64, width=96)
    with daami2i.trace(pipe) as trc:
        out = pipe(prompt="a red cat", **kw)
    gen = trc.last_generation
    frames = FAMILIES[family].frames
    assert gen.image_size == (64 * frames, 96)
    scale = (  # video pipelines: spatial (LTX-Video: its spatial compression ratio)
        getattr(pipe, "vae_scale_factor", None)
        or getattr(pipe, "vae_scale_factor_spatial", None)
        or pipe.vae_spatial_compression_ratio
    )
    assert gen.latent_size == (64 // scale * frames, 96 // scale)
    h, w = gen.grid_size
    assert trc.latent_hw == h * w
    for store in gen.self_attention.values():  # the stores were sized from the same geometry
        blocks = store.sums.shape[1] * store.sums.shape[2] if store.blocks else store.sums.shape[1]  # frames' blocks
        assert blocks == store.size[0] * store.size[1]
    if frames > 1:  # a video: its frame layout splits the stacked grid, and says where every video frame is from
        assert gen.frames is not None and gen.frames.token_frames * gen.frames.rows == h
        assert gen.frames.video_frames == len(out.frames[0])  # what the VAE decoded (CogVideoX: 5 -> 8)
    else:
        assert gen.frames is None
    need = trc.estimate_nbytes(
        gen.latent_size,
        gen.n_images,
        n_tokens=next(iter(gen.cross_attention.values())).sums.shape[-1],
        frames=gen.frames.token_frames if gen.frames is not None else 1,
    )
    assert need["self"] == gen.nbytes("self") and need["cross"] == gen.nbytes("cross")


def test_readme_table_is_what_the_benchmark_prints():
    """The README's supported-models table is benchmarks/families.py's output (store sizes are exact
    integer arithmetic on the real configurations, so any change to the stores shows here)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "families.py")], capture_output=True, text=True, check=True
    ).stdout
    names = "|".join(a.name for a in ADAPTERS)
    printed = [line for line in out.splitlines() if re.match(rf"^\| ({names}) \|", line)]
    readme = (root / "README.md").read_text()
    assert printed and all(line in readme for line in printed), "README table is stale: run benchmarks/families.py"
    assert {line.split("|")[1].strip() for line in printed} == {a.name for a in ADAPTERS}


@pytest.mark.parametrize("family", [n for n in NAMES if FAMILIES[n].explorer])
def test_the_explorer_runs_every_family(pipes, family):
    """The explorer's own functions (generate, a point click, a word, real-image attribution, reopening
    the saved experiment) on each transformer family: the maps come back at the image's size."""
    from daami2i import explore

    pipe = pipes[family][0]
    state = explore.generate(pipe, explore.Session(), "a red cat", 0, 2, 3.0, 64, 96)
    assert state.image is not None and state.image.size == (96, 64)
    state = explore.click(state, "point", 40.0, 20.0)
    assert state.last_map is not None and state.last_map.shape == (64, 96)
    raw, refined, _ = explore.word(state, "cat", 1, 0.4)
    assert raw.shape[:2] == refined.shape[:2] == (64, 96)
    reopened = explore.open_experiment(state.experiment_dir)
    assert explore.word_chips(reopened) == ["a", "red", "cat"]
    real = explore.attribute(pipe, state.image, "a red cat")
    assert explore.click(real, "point", 10.0, 10.0).last_map.shape == (64, 96)


@pytest.mark.parametrize("family", NAMES)
def test_word_labels_are_the_ids_the_encoder_received(pipes, family):
    """The tokens daami2i labels a stream's key rows with are the ids that stream's text encoder was
    given (hooked here), at the positions the stream declares: a template, a dropped prefix, a
    lowercasing or a truncation the pipeline applies cannot shift them unnoticed."""
    for i, pipe in enumerate(pipes[family]):
        seen: dict[str, list[int]] = {}
        handles = []

        def recorder(attr: str, seen: dict[str, list[int]] = seen):
            def keep(_module, args, kwargs):
                ids = args[0] if args else kwargs.get("input_ids")
                seen.setdefault(attr, ids[0].tolist())  # the first call encodes the prompt

            return keep

        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
            encoder = getattr(pipe, attr, None)
            if encoder is None:
                continue
            handles.append(encoder.register_forward_pre_hook(recorder(attr), with_kwargs=True))
        kw = generation_kwargs(family, i, num_inference_steps=1, height=64, width=64)
        try:
            with daami2i.trace(pipe) as trc:
                pipe(prompt="A Red cat on the café chair", **kw)
        finally:
            for h in handles:
                h.remove()
        ghm = trc.compute_global_heat_map()
        checked = 0
        for st, spec in zip(ghm.streams, trc.last_generation.streams or [{"tokenizer": "tokenizer"}], strict=True):
            attr = spec["tokenizer"].replace("tokenizer", "text_encoder")
            tok = getattr(pipe, spec["tokenizer"])
            ids = seen[attr]
            n = len(st.tokens)
            starts = [i for i in range(len(ids) - n + 1) if tok.convert_ids_to_tokens(ids[i : i + n]) == st.tokens]
            assert starts, (family, st.name, tok.convert_ids_to_tokens(ids), st.tokens)
            if st.name in ("clip", "t5"):  # these encoders see the prompt right after their start token
                assert starts[0] == (1 if st.name == "clip" else 0), (family, st.name, starts)
            assert st.tokens, family
            checked += 1
            if family in ("unet", "sd3") and st.name == "clip" and getattr(pipe, "text_encoder_2", None) is not None:
                second = pipe.tokenizer_2.convert_ids_to_tokens(seen["text_encoder_2"][1 : 1 + len(st.tokens)])
                assert second == st.tokens  # both CLIP encoders saw the same tokens
        assert checked == len(ghm.streams)
        assert {"red", "chair"} <= {w.lower() for w in ghm.words}


@pytest.mark.parametrize("family", NAMES)
def test_every_family_leaves_images_and_pipeline_as_they_were(pipes, family):
    """Traced images equal untraced ones bit for bit; after a trace, also one left by an exception,
    the processors, hooks, patched pipeline methods and attention-function wrappers are the originals."""
    import sys

    import diffusers.models.attention_processor as attention_processor
    import numpy as np

    watched = [attention_processor] + [
        m for n, m in sys.modules.items() if n.startswith("diffusers.models.transformers.") and m is not None
    ]
    names = ("F", "dispatch_attention_fn")
    for i, pipe in enumerate(pipes[family]):
        denoiser = getattr(pipe, FAMILIES[family].denoiser)
        kw = generation_kwargs(family, i, num_inference_steps=2, height=64, width=96, output_type="np")
        before = processors(denoiser)
        globals_before = [{a: vars(m).get(a) for a in names} for m in watched]
        hooks = len(denoiser._forward_pre_hooks)
        out = "frames" if FAMILIES[family].frames > 1 else "images"
        plain = getattr(pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **kw), out)
        with daami2i.trace(pipe):
            traced = getattr(pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **kw), out)
        assert np.array_equal(plain, traced), family
        with pytest.raises(RuntimeError, match="boom"):
            with daami2i.trace(pipe):
                pipe(prompt="a red cat", **{**kw, "num_inference_steps": 1})
                raise RuntimeError("boom")
        assert processors(denoiser) == before
        assert [{a: vars(m).get(a) for a in names} for m in watched] == globals_before
        assert attention_processor.F is torch.nn.functional
        assert len(denoiser._forward_pre_hooks) == hooks
        assert "check_inputs" not in vars(pipe) and "encode_prompt" not in vars(pipe)


def test_labels_follow_a_template_the_adapter_does_not_know(pipes):
    """Streams labelled from the encoder's received ids: when something before the encoder puts three
    template tokens in front of the prompt (as a chat template does), every word's rows move with
    them, and the word map equals the dense reference at the shifted columns."""
    from test_dit import call, dense, joint_recording, token_positions

    pipe = pipes["chroma"][0]
    template = [5, 6, 7]

    def shift(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        moved = torch.cat([torch.tensor([template] * ids.shape[0]), ids[:, : -len(template)]], dim=1)
        return ((moved, *args[1:]), kwargs) if args else (args, {**kwargs, "input_ids": moved})

    handle = pipe.text_encoder.register_forward_pre_hook(shift, with_kwargs=True)
    prompt = "a red cat"
    try:
        with joint_recording(pipe.transformer, True) as book:
            call(pipe, prompt)
        with daami2i.trace(pipe) as trc:
            call(pipe, prompt)
    finally:
        handle.remove()
    _, maps_ref = dense(pipe, trc, dict(book), [0])
    ghm = trc.compute_global_heat_map()
    tok = pipe.tokenizer
    for word in ("red", "cat"):
        rows = [len(template) + r for r in token_positions(tok.tokenize(prompt), tok.tokenize(word))]
        torch.testing.assert_close(ghm.compute_word_heat_map(word).value, maps_ref[rows].mean(0), atol=1e-6, rtol=1e-4)
    unshifted = [r for r in token_positions(tok.tokenize(prompt), tok.tokenize("cat"))]
    assert not torch.allclose(maps_ref[unshifted].mean(0), maps_ref[[len(template) + r for r in unshifted]].mean(0))


def test_a_prompt_the_encoder_never_saw_is_not_labelled(pipes):
    """If the encoder received other ids than the prompt's (a rewritten prompt), the stream is kept
    whole and unlabelled, with a warning, rather than labelled at a guessed position."""
    pipe = pipes["chroma"][0]
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: ((torch.full_like(args[0], 9), *args[1:]), kwargs) if args else None,
        with_kwargs=True,
    )
    try:
        with pytest.warns(UserWarning, match="did not receive the prompt's tokens"):
            with daami2i.trace(pipe) as trc:
                kw = dict(num_inference_steps=1, height=64, width=64, max_sequence_length=32, guidance_scale=1.0)
                pipe(prompt="a red cat", **kw)
    finally:
        handle.remove()
    ghm = trc.compute_global_heat_map()
    with pytest.raises(daami2i.QueryError):
        ghm.compute_word_heat_map("cat")
    assert trc.last_generation.streams[0]["tokens"] == [None]
    assert trc.last_generation.nbytes("cross") > 0


@pytest.mark.parametrize("family", NAMES)
def test_text_relations_on_every_joint_family(pipes, family):
    """Every family with joint layers keeps the text-query relations when asked (their values are
    checked against the recorded softmax in test_relations.py): probabilities that, over the image
    keys and the kept text keys, sum to at most one per query, sized as estimated; a family without
    joint layers refuses them."""
    pipe = pipes[family][0]
    denoiser, adapter = adapter_for(pipe)
    joint = any(s.kind == "joint" for s in adapter.find_sites(denoiser))
    relations = ["image->text", "image->image", "text->image", "text->text"]
    if not joint:
        with pytest.raises(daami2i.ConfigError, match="joint"):
            daami2i.trace(pipe, relations=relations)
        return
    with daami2i.trace(pipe, relations=relations) as trc:
        pipe(prompt="a red cat", **generation_kwargs(family, num_inference_steps=1, height=64, width=64))
    gen = trc.last_generation
    stores = list(gen.cross_attention.values())
    assert stores and all(s.text_image is not None and s.text_text is not None for s in stores)
    for s in stores:
        mass = s.text_image.sum(-1) + s.text_text.sum(-1)  # (n_images, tokens): one step, head means
        assert float(s.text_image.min()) >= 0 and float(mass.max()) <= 1 + 1e-5, family
        assert float(mass.max()) > 0, family
    ghm = trc.compute_global_heat_map()
    assert float(ghm.compute_text_query_heat_map("cat").value.max()) > 0
    tokens, matrix = ghm.text_to_text()
    assert matrix.shape == (len(tokens), len(tokens)) and tokens
    need = trc.estimate_nbytes(gen.latent_size, gen.n_images, n_tokens=stores[0].sums.shape[-1])
    assert need["text"] == gen.nbytes("text") > 0


def test_a_generation_from_embeddings_alone_is_a_generation_of_its_own(pipes):
    """Z-Image skips its prompt method (encode_prompt) when given prompt_embeds alone: the trace then
    sees the new generation where the pipeline sets its timesteps, so two such calls in one trace
    are two generations, not one summed into the other."""
    pipe = pipes["zimage"][0]
    pos, neg = pipe.encode_prompt(prompt="a red cat", negative_prompt="", device="cpu")
    kw = generation_kwargs("zimage", num_inference_steps=1, height=64, width=64)
    with daami2i.trace(pipe, keep="all") as trc:
        pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **kw)
        for _ in range(2):
            pipe(prompt_embeds=pos, negative_prompt_embeds=neg, generator=torch.Generator().manual_seed(0), **kw)
    assert [g.steps_run for g in trc.generations] == [1, 1, 1]
    first, second, third = (g.self_attention[1].sums for g in trc.generations)
    torch.testing.assert_close(second, first)  # the same prompt's states: the same maps, not a sum
    torch.testing.assert_close(third, first)
    assert trc.generations[1].image_prompts == [None]


# videos whose frames share one self-attention store (AnimateDiff keeps one block per frame, not pooled)
VIDEO = [name for name in NAMES if FAMILIES[name].frames > 1 and name != "animatediff"]


def cell_matrix(grid: tuple[int, int], frames: int, pool: int) -> torch.Tensor:
    """The (tokens x cells) membership of p x p cells of each frame of a stacked grid, by loops."""
    rows, cols = grid[0] // frames, grid[1]
    hc, wc = -(-rows // pool), -(-cols // pool)
    m = torch.zeros(grid[0] * cols, frames * hc * wc, dtype=torch.float64)
    for f in range(frames):
        for y in range(rows):
            for x in range(cols):
                m[(f * rows + y) * cols + x, (f * hc + y // pool) * wc + x // pool] = 1
    return m


@pytest.mark.parametrize("family", VIDEO)
def test_every_video_family_pools_into_exact_cell_means(pipes, family):
    """self_pool=2 on every video family (uneven cells included): the store equals D^-1 P S P^T D^-1
    of the full store S of an identical run (S itself is checked against recorded attention in each
    family's own tests), and normalize=True weighs each query cell's row by its key cells' sizes."""
    for maker, pipe in enumerate(pipes[family]):
        kw = generation_kwargs(family, maker, num_inference_steps=1, height=64, width=96)
        stores = {}
        for pool in (1, 2):
            with daami2i.trace(pipe, self_pool=pool) as trc:
                pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **kw)
            stores[pool] = trc.last_generation
        gen = stores[2]
        full = stores[1].self_attention[1].sums[0].double()
        pooled = gen.self_attention[1]
        assert pooled.pool == 2
        pt = cell_matrix(gen.grid_size, gen.frames.token_frames, 2)
        d_inv = torch.diag(1 / pt.sum(0))
        torch.testing.assert_close(pooled.sums[0].double(), d_inv @ pt.T @ full @ pt @ d_inv, atol=1e-7, rtol=1e-5)
        (level,) = gen.self_levels(0, normalize=True)  # every query cell's mass is the layer count, as dense rows'
        mass = (level.sums.double() * pt.sum(0)).sum(1)
        torch.testing.assert_close(mass, torch.full_like(mass, float(len(pooled.layers))), atol=1e-5, rtol=0)

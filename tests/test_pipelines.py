"""Every supported pipeline family and variant, checked against the dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from daami2i.testing import tiny_sd_pipeline
from reference import batch_rows, column_query, dense_cross, dense_self, recording
from test_dense_reference import assert_close, check_all_queries, run_traced, selected_layers


def _init_image(h, w):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(h, w):
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint(family, kind, sd2, sdxl):
    base = sd2 if family == "sd" else sdxl
    cls = {
        ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
        ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
        ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
        ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    }[(family, kind)]
    import diffusers

    pipe = getattr(diffusers, cls)(**base.components)
    pipe.set_progress_bar_config(disable=True)
    h, w = (64, 96) if family == "sd" else (128, 96)
    call = dict(image=_init_image(h, w), height=h, width=w, strength=0.75)
    if kind == "inpaint":
        call["mask_image"] = _mask(h, w)
    trc, book, images = run_traced(pipe, "a red cat", steps=4, **call)
    gen = trc.last_generation
    assert gen.steps_run == 3  # strength 0.75 of 4 steps
    assert images[0].size == (w, h)
    check_all_queries(pipe, trc, book, 0)


def test_sd2_v_layout_with_96x96_latent():
    pipe = tiny_sd_pipeline("sd2-v", sample_size=96)
    probe = daami2i.trace(pipe)
    only = {s.name for s in probe.selected if s.kind == "self"}
    with recording(pipe.unet, only=only) as book:
        with daami2i.trace(pipe) as trc:
            image = pipe("a red cat", num_inference_steps=1, guidance_scale=1.0).images[0]
    gen = trc.last_generation
    assert image.size == (768, 768) and gen.latent_size == (96, 96) and gen.grid_size == (96, 96)
    assert gen.nbytes("self") == 96**4 * 4  # one 9216 x 9216 float32 matrix
    ghm = trc.compute_global_heat_map()
    dense = dense_self(book, selected_layers(pipe, trc, "self"), gen.latent_size, gen.grid_size, [0])
    wb = torch.zeros(96, 96)
    wb[10:31, 40:91] = 1  # inclusive corners
    assert_close(ghm.compute_bbox_heat_map(40, 10, 90, 30).value, column_query(dense, wb, (96, 96)))
    assert ghm.compute_word_heat_map("cat").value.shape == (96, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines_accumulate_in_float32(dtype):
    pipe = tiny_sd_pipeline("sd1", dtype=dtype)
    trc, book, _ = run_traced(pipe, "a red cat", height=64, width=64)
    gen = trc.last_generation
    assert all(s.sums.dtype == torch.float32 for s in gen.self_attention.values())
    assert all(s.sums.dtype == torch.float32 for s in gen.cross_attention.values())
    ghm = trc.compute_global_heat_map()
    grid = gen.grid_size
    dense = dense_self(book, selected_layers(pipe, trc, "self"), gen.latent_size, grid, batch_rows(1, True, "cond", 0))
    w = torch.zeros(grid[0] * grid[1])
    w[[0, 5, 9]] = 1
    assert_close(ghm.compute_pixel_heat_map([0, 5, 9]).value, column_query(dense, w, grid))
    cross = dense_cross(
        book, selected_layers(pipe, trc, "cross"), gen.latent_size, grid, batch_rows(1, True, "cond", 0)
    )
    assert_close(ghm.compute_word_heat_map("cat").value, cross[3])


def test_sdxl_grid_is_half_the_latent(sdxl):
    with daami2i.trace(sdxl) as trc:
        sdxl("a cat", num_inference_steps=1, height=128, width=192)
    gen = trc.last_generation
    assert gen.latent_size == (16, 24) and gen.grid_size == (8, 12)
    assert {f for f in gen.self_attention} == {2}
    assert {s.factor for s in gen.cross_attention.values()} == {2, 4}

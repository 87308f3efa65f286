"""Real-image attribution: the denoiser run on a given image under the trace, checked densely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from reference import batch_rows, column_query, dense_cross, dense_self, recording
from test_dense_reference import assert_close, selected_layers


def _image(h, w):
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_real_image_maps_match_dense_reference(style, request):
    pipe = request.getfixturevalue(style)
    h, w = (64, 96) if style == "sd1" else (128, 96)
    image = _image(h, w)
    with recording(pipe.unet) as book:
        trc = daami2i.trace_image(
            pipe, image, "a red cat", timesteps=(100, 500), draws=2, generator=torch.Generator().manual_seed(0)
        )
    book = dict(book)
    gen = trc.last_generation
    assert gen.steps_run == 4 and not gen.cfg and gen.n_images == 1
    assert gen.image_size == (h, w) and gen.images == [image]
    ghm = trc.compute_global_heat_map()
    rows = batch_rows(1, False, "cond", 0)
    dense = dense_self(book, selected_layers(pipe, trc, "self"), gen.latent_size, gen.grid_size, rows)
    wt = torch.zeros(gen.grid_size[0] * gen.grid_size[1])
    wt[[1, 2, 3]] = 1
    assert_close(ghm.compute_pixel_heat_map([1, 2, 3]).value, column_query(dense, wt, gen.grid_size))
    cross = dense_cross(book, selected_layers(pipe, trc, "cross"), gen.latent_size, gen.grid_size, rows)
    assert_close(ghm.compute_word_heat_map("cat").value, cross[3])
    # hooks are gone afterwards
    assert not any(type(p).__name__ == "CapturingProcessor" for p in pipe.unet.attn_processors.values())


def test_real_image_noise_is_seeded(sd1):
    image = _image(64, 64)
    maps = [
        daami2i.trace_image(sd1, image, "a cat", timesteps=(400,), generator=torch.Generator().manual_seed(s))
        .compute_global_heat_map()
        .compute_word_heat_map("cat")
        .value
        for s in (0, 0, 1)
    ]
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[0], maps[2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), "non-empty caption"),
        (dict(timesteps=(1000,)), r"\[0, 999\]"),
        (dict(timesteps=()), "non-empty"),
        (dict(draws=0), "draws"),
        (dict(halves="both"), "conditional pass"),
    ],
)
def test_real_image_bad_input(sd1, kwargs, match):
    args = dict(prompt="a cat", timesteps=(100,))
    args.update(kwargs)
    with pytest.raises(daami2i.Daami2iError, match=match):
        daami2i.trace_image(sd1, _image(64, 64), **args)

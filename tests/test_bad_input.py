"""Bad input gets a clear error: what was expected, what was received."""

from __future__ import annotations

import pytest
import torch

import daami2i
from daami2i import QueryError


@pytest.fixture(scope="module")
def ghm(sd2):
    with daami2i.trace(sd2) as trc:
        sd2("a red cat and a dog", num_inference_steps=1, height=64, width=96)
    return trc.compute_global_heat_map()  # grid 8 x 12, image 64 x 96


@pytest.mark.parametrize(
    "ids, match",
    [
        ([], "empty"),
        ([0, 96], r"\[0, 95\].*96"),
        ([-1], "out-of-range"),
        (["a"], "integers"),
    ],
)
def test_pixel_ids(ghm, ids, match):
    with pytest.raises(QueryError, match=match):
        ghm.compute_pixel_heat_map(ids)


@pytest.mark.parametrize(
    "box",
    [
        (5, 0, 3, 4),  # x2 < x1
        (0, 4, 3, 3),  # y2 < y1
        (0, 0, 13, 4),  # two past the last column (12 columns: 0-11, 12 is clipped)
        (0, 0, 4, 9),  # two past the last row
        (12, 0, 12, 4),  # x1 one past the last column: nothing left
        (0, 8, 3, 8),
        (-1, 0, 2, 2),
        (0.5, 0, 2, 2),
        (True, 0, 2, 2),
        ("1", 0, 2, 2),
    ],
)
def test_boxes(ghm, box):
    with pytest.raises(QueryError, match="box|integer"):
        ghm.compute_bbox_heat_map(*box)


def test_box_message_says_the_convention(ghm):
    with pytest.raises(QueryError, match=r"0 <= x1 <= x2 <= 11 and 0 <= y1 <= y2 <= 7.*inclusive.*half_open=True"):
        ghm.compute_bbox_heat_map(0, 0, 13, 4)
    with pytest.raises(QueryError, match=r"0 <= x1 < x2 <= 12 and 0 <= y1 < y2 <= 8.*exclusive"):
        ghm.compute_bbox_heat_map(0, 0, 13, 4, half_open=True)


@pytest.mark.parametrize(
    "contour, match",
    [
        ([[0, 0], [10, 10]], "at least 3"),
        ([[0, 0], [10, 10], [0, 0]], "at least 3"),
        ([[0, 0], [97, 10], [5, 50]], "outside"),
        ([[0, 0], [10, -1], [5, 50]], "outside"),
        ([0, 1, 2], r"shape \(n, 2\)"),
        ([[0, 0], [10, float("nan")], [5, 50]], "non-finite"),
    ],
)
def test_contours(ghm, contour, match):
    with pytest.raises(QueryError, match=match):
        ghm.compute_contour_heat_map(contour, 64, 96)


def test_segmentation_needs_a_list(ghm):
    with pytest.raises(QueryError, match="non-empty list of contours"):
        ghm.compute_segmentation_heat_map([], 64, 96)


@pytest.mark.parametrize(
    "guide, match",
    [
        (torch.ones(12, 8), r"\(8, 12\).*\(12, 8\)"),
        (torch.ones(64, 96), "expanded image-size map"),
        (-torch.ones(8, 12), "non-negative"),
        (torch.zeros(8, 12), "sum to zero"),
        (torch.full((8, 12), float("nan")), "NaN"),
        ("cat", "guide"),
    ],
)
def test_guides(ghm, guide, match):
    with pytest.raises(QueryError, match=match):
        ghm.compute_guided_heat_map(guide)


def test_guide_zero_inside_contour(ghm):
    guide = torch.zeros(8, 12)
    guide[0, 0] = 1
    with pytest.raises(QueryError, match="zero everywhere inside"):
        ghm.compute_contour_heat_map([[50, 30], [90, 30], [90, 60]], 64, 96, guide_heatmap=guide)


def test_unknown_word_lists_tokens(ghm):
    with pytest.raises(QueryError, match=r"'horse'.*not in the prompt.*\['a', 'red', 'cat', 'and', 'a', 'dog'\]"):
        ghm.compute_word_heat_map("horse")
    with pytest.raises(ValueError):  # DAAM raised ValueError: still caught
        ghm.compute_word_heat_map("horse")


def test_bad_word_idx_and_direction(ghm):
    with pytest.raises(QueryError, match="word_idx"):
        ghm.compute_word_heat_map("cat", word_idx=6)
    with pytest.raises(QueryError, match="direction"):
        ghm.compute_pixel_heat_map([0], direction="columns")


def test_bad_diffusion_parameters(ghm):
    with pytest.raises(QueryError, match="iterations"):
        ghm.compute_pixel_grown_heat_map([0], iterations=0)
    with pytest.raises(QueryError, match="threshold"):
        ghm.compute_pixel_grown_heat_map([0], threshold=1.5)


def test_query_before_generation(sd2):
    with daami2i.trace(sd2) as trc:
        with pytest.raises(daami2i.TraceError, match="nothing has been captured yet"):
            trc.compute_global_heat_map()


def test_image_idx_out_of_range(sd2):
    with daami2i.trace(sd2) as trc:
        sd2("a cat", num_inference_steps=1, height=64, width=64)
    with pytest.raises(QueryError, match=r"image_idx must be in \[0, 0\]"):
        trc.compute_global_heat_map(image_idx=1)


def test_expand_as_rejects_unknown_images(ghm):
    with pytest.raises(QueryError, match="PIL image"):
        ghm.compute_pixel_heat_map([0]).expand_as("image.png")


def test_unsupported_pipeline():
    class NotAPipeline:
        transformer = object()

    match = "UNet2DConditionModel.*transformer is a object.*SD3Transformer2DModel.*FluxTransformer2DModel"
    with pytest.raises(daami2i.UnsupportedPipelineError, match=match):
        daami2i.trace(NotAPipeline())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(halves="neg"), "halves"),
        (dict(self_factors=(3,)), r"no layers at factor\(s\) \[3\]"),
        (dict(self_factors="daam"), "self_factors must be"),
        (dict(cross_layers=["nope"]), "unknown cross-attention layer"),
        (dict(self_attention=False, cross_attention=False), "nothing to capture"),
        (dict(direction="up"), "direction"),
        (dict(chunk_mb=0), "chunk_mb"),
    ],
)
def test_bad_trace_options(sd2, kwargs, match):
    with pytest.raises(daami2i.Daami2iError, match=match):
        daami2i.trace(sd2, **kwargs)


def test_uncond_without_guidance(sd2):
    with pytest.raises(daami2i.TraceError, match="no unconditional half"):
        with daami2i.trace(sd2, halves="uncond"):
            sd2("a cat", num_inference_steps=1, height=64, width=64, guidance_scale=1.0)


def test_a_processor_that_hides_q_and_k_is_an_error(sd2):
    """A processor that neither calls an attention function daami2i reads nor the to_q / to_k
    projections (fused QKV projections are read at the attention function: tests/test_hooks.py)."""

    class Opaque:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return hidden_states * 1.0

    name = next(n for n in sd2.unet.attn_processors if "attn1" in n)
    before = dict(sd2.unet.attn_processors)
    sd2.unet.set_attn_processor({n: Opaque() if n == name else p for n, p in before.items()})
    try:
        with pytest.raises(daami2i.TraceError, match="called no attention function daami2i reads"):
            with daami2i.trace(sd2, self_factors="all"):
                sd2("a cat", num_inference_steps=1, height=64, width=64)
    finally:
        sd2.unet.set_attn_processor(before)

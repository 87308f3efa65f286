"""The seed README's code, run as written, with a tiny offline pipeline standing in for SD-2-base."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import pyplot as plt
from PIL import Image

import daami2i
from daami2i.testing import tiny_sd_pipeline


def test_seed_readme_runs_as_written():
    model = tiny_sd_pipeline("sd2", sample_size=64)  # stands in for 'stabilityai/stable-diffusion-2-base'
    model = model.to("cpu")
    prompt = "Dinner table with chairs and flower pot"

    with daami2i.trace(model) as trc:
        output_image = model(prompt, num_inference_steps=2).images
        global_heat_map = trc.compute_global_heat_map()

    assert isinstance(output_image[0], Image.Image) and output_image[0].size == (512, 512)
    assert global_heat_map.grid_size == (64, 64)
    # the self-attention store of a 512 x 512 SD-2-base-shaped image: one 4096 x 4096 float32 matrix
    assert trc.last_generation.nbytes("self") == 4096 * 4096 * 4 <= 90e6

    maps = {
        "pixel": global_heat_map.compute_pixel_heat_map(list(range(1024))),
        "bbox": global_heat_map.compute_bbox_heat_map(0, 10, 25, 64),
        "contour": global_heat_map.compute_contour_heat_map(
            [[0, 300], [256, 100], [512, 300], [512, 400], [0, 400], [0, 300]], 512, 512
        ),
        "segmentation": global_heat_map.compute_segmentation_heat_map(
            [[[0, 300], [256, 100], [512, 300], [512, 400], [0, 400], [0, 300]], [[10, 10], [100, 10], [100, 90]]],
            512,
            512,
        ),
        "guided": global_heat_map.compute_guided_heat_map(global_heat_map.compute_word_heat_map("table")),
        "grown": global_heat_map.compute_grown_heat_map(global_heat_map.compute_word_heat_map("chairs")),
        "pixel-grown": global_heat_map.compute_pixel_grown_heat_map(list(range(64, 128))),
        "word": global_heat_map.compute_word_heat_map("flower pot"),
    }
    fig, axes = plt.subplots(1, len(maps))
    try:
        for ax, (name, hm) in zip(axes, maps.items(), strict=False):
            pixel_heatmap = hm.expand_as(output_image[0]).numpy()
            assert pixel_heatmap.shape == (512, 512), name
            assert pixel_heatmap.min() >= 0.0 and pixel_heatmap.max() <= 1.0, name
            assert pixel_heatmap.max() > 0.99 and pixel_heatmap.min() < 0.01, name  # min-max normalised
            heatmap = np.array(pixel_heatmap * 255, dtype=np.uint8)
            ax.imshow(heatmap)
    finally:
        plt.close(fig)
    # the box example covers columns 0..25 and rows 10..63 of the latent grid (daam-i2i's inclusive corners)
    assert torch.equal(maps["bbox"].weights[10:, :26], torch.ones(54, 26))
    assert maps["bbox"].weights.sum() == 54 * 26

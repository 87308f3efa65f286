"""Quickstart: trace a (tiny, offline, random-weight) Stable Diffusion pipeline and plot heat maps.

    python examples/quickstart.py [--out outputs/quickstart.png] [--steps 4]

The pipeline is built from configs by ``daami2i.testing`` with the real diffusers / transformers
classes and the real CLIP tokenizer, shaped like stable-diffusion-2-base (512 x 512 image, 64 x 64
latent). Its weights are random, so the image is noise; the code is exactly what you run on a real
model (replace the pipeline by ``StableDiffusionPipeline.from_pretrained(...)``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from matplotlib.figure import Figure

import daami2i
from daami2i.testing import tiny_sd_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart.png"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt", default="Dinner table with chairs and flower pot")
    args = parser.parse_args()

    pipe = tiny_sd_pipeline("sd2", sample_size=64)
    start = time.perf_counter()
    with daami2i.trace(pipe) as trc:
        image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]
        ghm = trc.compute_global_heat_map()
    elapsed = time.perf_counter() - start

    table = ghm.compute_word_heat_map("table")
    panels = {
        "image": None,
        "pixels 0..1023": ghm.compute_pixel_heat_map(list(range(1024))),
        "box (0, 10, 25, 64)": ghm.compute_bbox_heat_map(0, 10, 25, 64),
        "contour": ghm.compute_contour_heat_map([[0, 300], [256, 100], [512, 300], [512, 400], [0, 400]], 512, 512),
        "word 'table'": table,
        "'table' guided by self-attn": ghm.compute_guided_heat_map(table),
    }
    fig = Figure(figsize=(3 * len(panels), 3.4))
    for ax, (title, hm) in zip(fig.subplots(1, len(panels)), panels.items(), strict=False):
        if hm is None:
            ax.imshow(image)
            ax.set_title(title)
            ax.axis("off")
        else:
            hm.plot_overlay(image, ax=ax, title=title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    gen = trc.last_generation
    print(
        f"traced {gen.steps_run} steps of a {gen.image_size[0]}x{gen.image_size[1]} image in {elapsed:.1f}s; "
        f"self-attention store {gen.nbytes('self') / 2**20:.0f} MiB, "
        f"cross-attention {gen.nbytes('cross') / 2**20:.1f} MiB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

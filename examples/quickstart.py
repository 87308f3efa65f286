"""Quickstart: trace the embedded shapes model offline and plot its heat maps.

    python examples/quickstart.py [--prompt "a red circle and a blue square"] [--out outputs/quickstart.png]

The embedded model (shipped inside daami2i, trained by ``python -m daami2i.shapes.train``) draws
coloured circles, squares and triangles at 64x64. The code is exactly what you run on a real
Stable Diffusion model: replace ``load_pipeline()`` by ``StableDiffusionPipeline.from_pretrained(...)``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers says on every load that torchvision is missing and it falls back to PIL (it does so
# itself; nothing to act on): keep its messages to errors, before it is imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from diffusers.utils import logging as diffusers_logging
from matplotlib.figure import Figure
from transformers.utils import logging as transformers_logging

import daami2i
from daami2i.shapes.model import DEFAULTS, load_pipeline

# the embedded model loads in a second: no per-component progress bars
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart.png"))
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = load_pipeline()
    start = time.perf_counter()
    with daami2i.trace(pipe) as trc:
        image = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **DEFAULTS).images[0]
        ghm = trc.compute_global_heat_map()
    elapsed = time.perf_counter() - start

    words = [w for w in ghm.words if w not in ("a", "and")]
    panels: dict[str, daami2i.HeatMap | None] = {"image": None}
    for word in words:
        panels[f"'{word}'"] = ghm.compute_word_heat_map(word)
    last = ghm.compute_word_heat_map(words[-1])
    panels[f"'{words[-1]}' refined by self-attn"] = ghm.compute_guided_heat_map(last)
    peak = int(last.value.argmax())  # the latent pixel where the last word acts most
    panels[f"pixel {peak % ghm.grid_size[1]},{peak // ghm.grid_size[1]} (self-attn)"] = ghm.compute_pixel_heat_map(
        [peak]
    )
    fig = Figure(figsize=(2.6 * len(panels), 3))
    for ax, (title, hm) in zip(fig.subplots(1, len(panels)), panels.items(), strict=True):
        if hm is None:
            ax.imshow(image)
            ax.set_title(args.prompt, fontsize=8)
            ax.axis("off")
        else:
            hm.plot_overlay(image, ax=ax, title=title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    gen = trc.last_generation
    print(
        f"traced {gen.steps_run} steps of a {gen.image_size[0]}x{gen.image_size[1]} image in {elapsed:.1f}s "
        f"(stores: self {gen.nbytes('self') / 2**20:.2f} MiB, cross {gen.nbytes('cross') / 2**20:.2f} MiB)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

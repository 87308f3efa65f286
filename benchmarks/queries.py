"""Query latency on a 64x64 latent grid (SD-2-base at 512 px): median over repeated calls.

    python benchmarks/queries.py [--repeats 50] [--json outputs/bench-queries.json]

The trace comes from the tiny SD-2-shaped pipeline at 512 x 512 (its self-attention store has the
same 4096 x 4096 shape as the real model's); every query kind of the seed plus word maps is timed.

The diffused maps of all 4096 pixels at once (20 iterations each; dense, 1.4 TFLOP) are timed on
two self-attention matrices: the tiny pipeline's (random weights: attention is spread over the whole
image, so the thresholded maps are dense, the worst case) and a stand-in for Stable Diffusion's
local self-attention (softmax over -d^2 / (2 * 3^2) in latent pixels, plus 2 for keys in the same
of four rectangular segments), where the thresholds make the maps sparse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import daami2i
from daami2i.heatmaps.selfattn import SelfAttentionLevel, diffuse_all
from daami2i.testing import tiny_sd_pipeline


def local_attention_levels(grid: tuple[int, int]) -> list[SelfAttentionLevel]:
    """Local self-attention with segments, standing in for a real model's (see the docstring)."""
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    seg = torch.zeros(h, w, dtype=torch.long)
    seg[h // 6 : h // 2, w // 8 : w // 2] = 1
    seg[h // 2 + 3 : h - 4, w // 2 : w - 6] = 2
    seg[4 : h // 3, 5 * w // 8 : w - 4] = 3
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    same = (seg.flatten()[:, None] == seg.flatten()[None, :]).float()
    probs = (-(torch.cdist(pos, pos) ** 2) / (2 * 3.0**2) + 2.0 * same).softmax(-1)
    return [SelfAttentionLevel((h, w), probs, 1)]


def median_ms(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=Path("outputs/bench-queries.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    pipe = tiny_sd_pipeline("sd2", sample_size=64)
    with daami2i.trace(pipe) as trc:
        pipe("Dinner table with chairs and flower pot", num_inference_steps=2)
    ghm = trc.compute_global_heat_map()
    word = ghm.compute_word_heat_map("table")
    contour = [[0, 300], [256, 100], [512, 300], [512, 400], [0, 400]]
    queries = {
        "pixel list (1024 ids)": lambda: ghm.compute_pixel_heat_map(list(range(1024))),
        "box": lambda: ghm.compute_bbox_heat_map(0, 10, 25, 64),
        "contour": lambda: ghm.compute_contour_heat_map(contour, 512, 512),
        "multi-contour": lambda: ghm.compute_segmentation_heat_map(
            [contour, [[10, 10], [100, 10], [100, 90]]], 512, 512
        ),
        "guided (word map)": lambda: ghm.compute_guided_heat_map(word),
        "diffused (20 iterations)": lambda: ghm.compute_grown_heat_map(word, iterations=20),
        "word map (cached)": lambda: ghm.compute_word_heat_map("chairs"),
        "word map (first, new global map)": lambda: trc.compute_global_heat_map().compute_word_heat_map("chairs"),
    }
    out = {name: median_ms(fn, args.repeats) for name, fn in queries.items()}
    out["diffused, every pixel (random tiny)"] = median_ms(ghm.compute_all_grown_heat_maps, 2, warmup=False)
    local = local_attention_levels(ghm.grid_size)
    out["diffused, every pixel (local stand-in)"] = median_ms(
        lambda: diffuse_all(local, ghm.grid_size, iterations=20, threshold=0.4), 2, warmup=False
    )
    print(f"grid {ghm.grid_size}, {torch.get_num_threads()} threads, median of {args.repeats} calls")
    for name, ms in out.items():
        print(f"  {name:40} {ms:9.2f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"grid": ghm.grid_size, "threads": torch.get_num_threads(), "ms": out}, indent=2))


if __name__ == "__main__":
    main()

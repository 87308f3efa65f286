"""Query latency on a 64x64 latent grid (SD-2-base at 512 px): median over repeated calls.

    python benchmarks/queries.py [--repeats 50] [--json outputs/bench-queries.json]

The trace comes from the tiny SD-2-shaped pipeline at 512 x 512 (its self-attention store has the
same 4096 x 4096 shape as the real model's); every query kind of the seed plus word maps is timed.
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
from daami2i.testing import tiny_sd_pipeline


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
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
        "diffused (20 iterations)": lambda: ghm.compute_diffused_heat_map(word, iterations=20),
        "word map": lambda: ghm.compute_word_heat_map("chairs"),
    }
    out = {name: median_ms(fn, args.repeats) for name, fn in queries.items()}
    print(f"grid {ghm.grid_size}, {torch.get_num_threads()} threads, median of {args.repeats} calls")
    for name, ms in out.items():
        print(f"  {name:26} {ms:9.2f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"grid": ghm.grid_size, "threads": torch.get_num_threads(), "ms": out}, indent=2))


if __name__ == "__main__":
    main()

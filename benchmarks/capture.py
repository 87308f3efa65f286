"""Capture overhead: one generation untraced vs traced, alternating, medians over repeats.

    python benchmarks/capture.py [--cases tiny,sd2] [--repeats 3] [--json outputs/bench-capture.json]

Cases:
  tiny  the tiny SD-2-style test pipeline at 512 x 512 (64 x 64 latent), 4 steps;
  sd2   a UNet with the real stable-diffusion-2-base sizes (865M parameters, random weights) and
        a tiny VAE / text encoder; by default a 256 x 256 image (32 x 32 latent) and 2 steps so that
        one generation takes seconds on 2 CPU cores (--sd2-size 512 for the real 64 x 64 latent).
Variants: untraced; traced with the default capture (self-attention at the highest resolution,
DAAM cross-attention); traced with everything (self-attention at every resolution).
Peak memory is the largest resident-set growth over the process's level before the run, sampled
every 2 ms from /proc (CPU runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import daami2i
from daami2i.testing import tiny_sd_pipeline

# The tiny pipeline is almost all attention, so materialising its 4096 x 4096 probabilities costs
# about 3.2x (docs/benchmarks.md); a guard against accidental quadratic copies, not a timing test.
SMOKE_BOUND = 8.0


def sd2_sized_pipeline(sample_size: int = 32):
    """A UNet with stable-diffusion-2-base's sizes (random weights) inside the tiny VAE / text encoder."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        cross_attention_dim=1024,
        layers_per_block=2,
    ).eval()
    return tiny_sd_pipeline("sd2", unet=unet, text_width=1024)  # tiny VAE and text encoder around it


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = rss()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def run_once(pipe, variant: str, call: dict) -> tuple[float, int, int]:
    opts = {"default": {}, "everything": {"self_factors": "all", "cross_factors": "all"}}.get(variant)
    with PeakRSS() as mem:
        start = time.perf_counter()
        if opts is None:
            pipe(**call, generator=torch.Generator().manual_seed(0))
            store = 0
        else:
            with daami2i.trace(pipe, **opts) as trc:
                pipe(**call, generator=torch.Generator().manual_seed(0))
            store = trc.last_generation.nbytes()
        elapsed = time.perf_counter() - start
    del opts
    return elapsed, mem.delta, store


def bench(name: str, pipe, call: dict, repeats: int) -> dict:
    variants = ["untraced", "default", "everything"]
    run_once(pipe, "untraced", call)  # warm-up
    runs: dict[str, list] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:  # alternate the variants
            runs[v].append(run_once(pipe, v, call))
    out = {"case": name, "call": {k: v for k, v in call.items() if k != "prompt"}}
    base_t = statistics.median(r[0] for r in runs["untraced"])
    base_m = statistics.median(r[1] for r in runs["untraced"])
    for v in variants:
        t = statistics.median(r[0] for r in runs[v])
        m = statistics.median(r[1] for r in runs[v])
        out[v] = {
            "seconds": t,
            "ratio": t / base_t,
            "peak_rss_delta_mib": m / 2**20,
            "peak_over_untraced_mib": (m - base_m) / 2**20,
            "store_mib": runs[v][0][2] / 2**20,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="daami2i capture overhead benchmark")
    p.add_argument("--cases", default="tiny,sd2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sd2-size", type=int, default=256, help="image side of the sd2 case (latent = size / 8)")
    p.add_argument("--sd2-steps", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("outputs/bench-capture.json"))
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"CI guard: tiny case only, 3 repeats; exit 1 if the default capture costs more than {SMOKE_BOUND}x",
    )
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.smoke:
        args.cases, args.repeats = "tiny", 3
    results = []
    for case in args.cases.split(","):
        if case == "tiny":
            pipe = tiny_sd_pipeline("sd2", sample_size=64)
            call = dict(prompt="a red cat on a table", num_inference_steps=4)
        elif case == "sd2":
            pipe = sd2_sized_pipeline()
            size = args.sd2_size
            call = dict(prompt="a red cat on a table", num_inference_steps=args.sd2_steps, height=size, width=size)
        else:
            raise SystemExit(f"unknown case {case!r}; choose from tiny, sd2")
        with torch.no_grad():
            results.append(bench(case, pipe, call, args.repeats))
        del pipe
    print(f"{'case':6} {'variant':11} {'seconds':>8} {'ratio':>6} {'peak+MiB':>9} {'vs untraced':>11} {'store MiB':>9}")
    for r in results:
        for v in ("untraced", "default", "everything"):
            x = r[v]
            print(
                f"{r['case']:6} {v:11} {x['seconds']:8.2f} {x['ratio']:6.2f} {x['peak_rss_delta_mib']:9.0f} "
                f"{x['peak_over_untraced_mib']:11.0f} {x['store_mib']:9.1f}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {args.json}")
    if args.smoke:
        ratio = results[0]["default"]["ratio"]
        if ratio > SMOKE_BOUND:
            raise SystemExit(
                f"capture smoke test FAILED: traced/untraced = {ratio:.2f}x on the tiny pipeline, bound {SMOKE_BOUND}x "
                "(measured about 3.2x when written): look for an accidental O(N^2) copy or a lost chunking"
            )
        print(f"capture smoke test passed: {ratio:.2f}x <= {SMOKE_BOUND}x")


if __name__ == "__main__":
    main()

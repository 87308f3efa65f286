"""Video (Wan 2.1): capture overhead on CPU and the store, dense vs pooled.

    python benchmarks/video.py [--sizes 9x160x288,17x160x288] [--repeats 2] [--json outputs/bench-video.json]

A ``WanTransformer3DModel`` with Wan 2.1 1.3B's attention width (12 heads of 128, FFN 8960) but 2
blocks, random weights, inside the tiny UMT5 encoder and Wan VAE of ``daami2i.testing.wan`` (time by
4, space by 8, patch 2, like the real ones), guidance on (two transformer calls per step), 2 steps.
Per size: untraced, traced with the default store (``self_pool="auto"``: dense at these sizes) and
traced with ``self_pool=2``, alternating, medians; peak resident-set growth; the stores' bytes.
The real model's 32,760 tokens (480x832, 81 frames) are beyond a CPU; its store is in the README's
table (``benchmarks/families.py``, meta device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import daami2i

sys.path.insert(0, str(Path(__file__).parent))
from capture import PeakRSS


def wan_sized_pipeline():
    """Tiny Wan pipeline around a transformer of Wan 2.1 1.3B's attention width, 2 blocks."""
    from diffusers import WanTransformer3DModel

    from daami2i.testing.wan import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    torch.manual_seed(0)
    pipe.transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=16,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=2,
    ).eval()
    return pipe


def run_once(pipe, trace_kwargs: dict | None, call: dict) -> tuple[float, int, int]:
    """(seconds, peak RSS growth, store bytes) of one generation, traced when ``trace_kwargs`` is given."""
    gen = torch.Generator().manual_seed(0)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        if trace_kwargs is None:
            pipe(generator=gen, **call)
            store = 0
        else:
            with daami2i.trace(pipe, **trace_kwargs) as trc:
                pipe(generator=gen, **call)
            store = trc.last_generation.nbytes()
        dt = time.perf_counter() - t0
    return dt, peak.delta, store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="9x160x288,17x160x288", help="frames x height x width, comma-separated")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("outputs/bench-video.json"))
    args = p.parse_args()
    torch.set_grad_enabled(False)
    pipe = wan_sized_pipeline()
    variants = {"untraced": None, "traced (auto)": {}, "traced (self_pool=2)": {"self_pool": 2}}
    rows = []
    for spec in args.sizes.split(","):
        frames, height, width = (int(v) for v in spec.split("x"))
        call = dict(
            prompt="a red fox runs on snow",
            negative_prompt="a blurry dog",
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=2,
            max_sequence_length=32,
            output_type="latent",
        )
        latent_frames = (frames - 1) // 4 + 1
        tokens = latent_frames * (height // 16) * (width // 16)
        run_once(pipe, None, call)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in variants}
        peaks: dict[str, int] = {}
        stores: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, kw in variants.items():
                dt, peak, store = run_once(pipe, kw, call)
                times[name].append(dt)
                peaks[name] = max(peaks.get(name, 0), peak)
                stores[name] = store
        base = statistics.median(times["untraced"])
        row = {"size": spec, "tokens": tokens, "untraced_s": base}
        for name in variants:
            med = statistics.median(times[name])
            row[name] = {
                "s": med,
                "ratio": med / base,
                "peak_mib": peaks[name] / 2**20,
                "store_mib": stores[name] / 2**20,
            }
        rows.append(row)
        print(f"{spec} ({tokens} video tokens): untraced {base:.2f} s")
        for name in variants:
            r = row[name]
            print(
                f"  {name:22s} {r['s']:.2f} s  x{r['ratio']:.2f}  peak +{r['peak_mib']:.0f} MiB  "
                f"store {r['store_mib']:.1f} MiB"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""daami2i against its predecessors, side by side, on a UNet with stable-diffusion-2-base's sizes.

    make bench-deps                      # once: daam 0.2.0 from PyPI into .bench/daam (--no-deps)
    python benchmarks/predecessors.py [--size 512] [--steps 2] [--repeats 2] [--json outputs/bench-predecessors.json]

Variants, alternated in one run (medians over repeats), on the same pipeline and prompt:

* ``untraced``;
* ``daami2i default``: self-attention at the highest resolution + DAAM cross-attention;
* ``daami2i self only`` (``cross_attention=False``) beside the daam-i2i baseline;
* ``daami2i cross only`` (``self_attention=False``) beside daam 0.2.0;
* ``daam-i2i (baseline)``: daam-i2i is not on PyPI and pins 2023 diffusers, so its documented
  method is implemented here on current diffusers: every self-attention layer whose keys are the
  full-resolution latent gets an explicit-attention processor (``get_attention_scores``: baddbmm +
  softmax in the model's dtype, then ``bmm`` with the values); each (layer, batch x head) map of
  shape (keys, h, w) is added to a time sum kept on the device until the end; a query bicubically
  resizes and averages every stored map, then reads the pixel's rows. The original unravels the
  probabilities with a Python loop over the 4096 keys; here that is one ``permute``, so the
  baseline is never slower than the original;
* ``daam 0.2.0``: the real package (its unused spaCy import is satisfied by an empty module).

Reported: generation time (ratio to untraced), peak resident-memory growth, what the trace
stores, and query time (a pixel map for daami2i vs daam-i2i; a word map for daami2i vs daam,
each from the finished trace, including building the global heat map).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from capture import PeakRSS, sd2_sized_pipeline

import daami2i

PROMPT = "Dinner table with chairs and flower pot"


class DaamI2IBaseline:
    """daam-i2i's self-attention capture (see the module docstring), as a context manager."""

    def __init__(self, pipe, latent_hw: int) -> None:
        self.unet = pipe.unet
        self.latent_hw = latent_hw
        self.maps: dict[tuple[int, int], torch.Tensor] = {}  # (layer, batch*head) -> (keys, h, w) time sum

    def _processor(self, layer: int):
        def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(hidden_states))
            v = attn.head_to_batch_dim(attn.to_v(hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # (batch*heads, queries, keys)
            if probs.shape[-1] == self.latent_hw:
                side = int(self.latent_hw**0.5)
                maps = probs.permute(0, 2, 1).reshape(probs.shape[0], probs.shape[2], side, side)
                for bh in range(maps.shape[0]):
                    key = (layer, bh)
                    self.maps[key] = self.maps[key] + maps[bh] if key in self.maps else maps[bh].clone()
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
            return attn.to_out[1](attn.to_out[0](out))

        return call

    def __enter__(self):
        self.saved = dict(self.unet.attn_processors)
        procs = {}
        for i, name in enumerate(self.saved):
            procs[name] = self._processor(i) if name.endswith("attn1.processor") else self.saved[name]
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self.saved)

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps.values())

    def pixel_map(self, pixels: list[int]) -> torch.Tensor:
        side = int(self.latent_hw**0.5)
        total = None
        for m in self.maps.values():  # daam-i2i's compute_global_heat_map: resize, clamp, average
            r = F.interpolate(m.unsqueeze(1), size=(side, side), mode="bicubic").clamp_(min=0)
            total = r if total is None else total + r
        maps = (total / len(self.maps))[:, 0]  # (keys, h, w)
        return maps[pixels].mean(0)


def import_daam(path: Path):
    if not (path / "daam").is_dir():
        raise SystemExit(f"daam 0.2.0 is not in {path}: run `make bench-deps` first")
    spacy = types.ModuleType("spacy")  # daam imports spaCy for word parsing we do not use
    spacy.tokens = types.ModuleType("spacy.tokens")
    spacy.tokens.Token = object
    sys.modules.setdefault("spacy", spacy)
    sys.modules.setdefault("spacy.tokens", spacy.tokens)
    sys.path.insert(0, str(path))
    import daam

    return daam


def pixels(call: dict) -> list[int]:
    """Two latent pixels for the pixel-map query: one near the top left, one near the centre."""
    h, w = call["height"] // 8, call["width"] // 8
    return [w + 1, (h // 2) * w + w // 2]


def run_once(pipe, variant: str, call: dict, daam) -> dict:
    gen = torch.Generator().manual_seed(0)
    query_s = None
    with PeakRSS() as mem:
        start = time.perf_counter()
        if variant == "untraced":
            pipe(**call, generator=gen)
            store = 0
        elif variant.startswith("daami2i"):
            opts = {"daami2i default": {}, "daami2i self only": {"cross_attention": False}}.get(variant)
            opts = {"self_attention": False} if variant == "daami2i cross only" else opts
            with daami2i.trace(pipe, **opts) as trc:
                pipe(**call, generator=gen)
            elapsed = time.perf_counter() - start
            store = trc.last_generation.nbytes()
            q = time.perf_counter()
            ghm = trc.compute_global_heat_map()
            if variant == "daami2i cross only":
                ghm.compute_word_heat_map("table")
            else:
                ghm.compute_pixel_heat_map(pixels(call))
            query_s = time.perf_counter() - q
        elif variant == "daam-i2i (baseline)":
            with DaamI2IBaseline(pipe, latent_hw=(call["height"] // 8) * (call["width"] // 8)) as base:
                pipe(**call, generator=gen)
            elapsed = time.perf_counter() - start
            store = base.nbytes()
            q = time.perf_counter()
            base.pixel_map(pixels(call))
            query_s = time.perf_counter() - q
            del base
        elif variant == "daam 0.2.0":
            with daam.trace(pipe) as tc:
                pipe(**call, generator=gen)
                elapsed = time.perf_counter() - start
                store = sum(m.numel() * m.element_size() for m in tc.all_heat_maps.ids_to_heatmaps.values())
                q = time.perf_counter()
                tc.compute_global_heat_map().compute_word_heat_map("table")
                query_s = time.perf_counter() - q
        else:
            raise ValueError(variant)
        if variant == "untraced":
            elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak": mem.delta, "store": store, "query": query_s}


VARIANTS = [
    "untraced",
    "daami2i default",
    "daami2i self only",
    "daam-i2i (baseline)",
    "daami2i cross only",
    "daam 0.2.0",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="image side (daam 0.2.0 needs 512 for SD-2-base)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--daam-path", type=Path, default=Path(".bench/daam"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=Path("outputs/bench-predecessors.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    variants = args.variants.split(",")
    daam = import_daam(args.daam_path) if "daam 0.2.0" in variants else None
    pipe = sd2_sized_pipeline(sample_size=args.size // 8)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with torch.no_grad():
        run_once(pipe, "untraced", call, daam)  # warm-up
        for r in range(args.repeats):
            for v in variants:  # alternate the variants
                runs[v].append(run_once(pipe, v, call, daam))
                print(f"repeat {r + 1}: {v}: {runs[v][-1]['seconds']:.1f}s", flush=True)
    base = statistics.median(x["seconds"] for x in runs["untraced"])
    base_peak = statistics.median(x["peak"] for x in runs["untraced"])
    table = {}
    for v in variants:
        t = statistics.median(x["seconds"] for x in runs[v])
        peak = statistics.median(x["peak"] for x in runs[v])
        qs = [x["query"] for x in runs[v] if x["query"] is not None]
        table[v] = {
            "seconds": t,
            "ratio": t / base,
            "peak_over_untraced_mib": (peak - base_peak) / 2**20,
            "store_mib": runs[v][0]["store"] / 2**20,
            "query_ms": statistics.median(qs) * 1000 if qs else None,
        }
    print(f"SD-2-base-sized UNet, {args.size}x{args.size}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'variant':22} {'seconds':>8} {'ratio':>6} {'peak+ MiB':>10} {'store MiB':>10} {'query ms':>9}")
    for v, x in table.items():
        q = f"{x['query_ms']:9.1f}" if x["query_ms"] is not None else f"{'':9}"
        print(
            f"{v:22} {x['seconds']:8.2f} {x['ratio']:6.2f} {x['peak_over_untraced_mib']:10.0f} "
            f"{x['store_mib']:10.1f} {q}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"size": args.size, "steps": args.steps, "table": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""daami2i beside its peer attention-map-diffusers 1.0.0, on the same pipelines, in one run.

    make bench-deps       # once: attention-map-diffusers 1.0.0 from PyPI into .bench/amd (--no-deps)
    python benchmarks/peers.py [--cases sd2,sd3,flux] [--size 512] [--steps 2] [--repeats 2]
                               [--json outputs/bench-peers.json]
    python benchmarks/peers.py --smoke          # tiny pipelines, seconds

Both tools do the same work: every denoising step is captured, with the relations image -> text
(word maps) and image -> image (self-attention), on every attention layer the peer supports. The
peer runs as its README shows, ``AttentionCapture(pipe, relations=["image->text", "image->image"],
timesteps="all", offload="cpu", max_capture_bytes=None)`` (its default ``mode="fast"`` keeps each
layer's queries and keys during the generation and computes the maps in ``capture.compute()``,
which is timed as part of its traced run); daami2i runs ``daami2i.trace(pipe, ...)`` with the
layers named per case below.

Cases (random weights, offline; tiny text encoders and VAEs around the denoiser):

* ``sd2``: a UNet with stable-diffusion-2-base's sizes (865M parameters), 512 px (64 x 64 latent);
  variants ``daami2i default`` (self-attention at the highest resolution + DAAM's cross-attention
  layers: the issue's reference point) and ``daami2i all layers`` (``self_factors="all",
  cross_factors="all"``: every layer, the peer's work);
* ``sd3``: an SD3 transformer with SD3-medium's attention width (24 heads of 64) but 2 joint blocks
  and a VAE scaling by 8 (benchmarks/dit.py), 512 px = 32 x 32 image tokens; daami2i's default
  already captures every joint layer;
* ``flux``: a Flux transformer 1536 wide (12 heads of 128; FLUX.1 has 24), 2 double- and 2
  single-stream blocks, packed latents from a VAE scaling by 8 (512 px = 32 x 32 tokens),
  ``max_sequence_length=128``. The peer captures only the double-stream blocks (its Flux processor
  records nothing when the text arrives concatenated, as in single-stream blocks), so
  ``daami2i peer's layers`` restricts daami2i to the same blocks beside ``daami2i default``.

``--smoke`` runs the same three cases on daami2i's tiny test pipelines (128 / 64 px), one repeat.

Reported per variant: seconds (for the peer: generation + ``compute()``), the ratio to the
untraced generation, peak resident-memory growth over the untraced run's (RSS sampled every 2 ms
from /proc; tracemalloc would not see torch's allocations; the C heap is trimmed between runs), and
what each keeps (daami2i: ``Generation.nbytes()``, sums over steps; the peer: the bytes its
collector accounts, during the generation (queries and keys) and after ``compute()`` (one
head-mean map per layer, step and relation, both halves of the guidance batch)). A sanity check
compares both tools' word maps for one word (same layers, steps and guidance half): their Pearson
correlation and whether their maxima fall on the same cell. The definitions differ in details
(daami2i clamps each head's upsampled map before summing heads, the peer keeps only the head mean,
which is scaled back to a sum here; the rest of daami2i's recipe is applied to the peer's records),
so this is printed, not asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from capture import PeakRSS, sd2_sized_pipeline

import daami2i
from daami2i.testing import _dit_vae, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

PROMPT = "Dinner table with chairs and flower pot"
WORD = "table"
RELATIONS = ["image->text", "image->image"]
PEER = "attention-map-diffusers"


def import_peer(path: Path):
    if not (path / "attention_map_diffusers").is_dir():
        raise SystemExit(f"attention-map-diffusers 1.0.0 is not in {path}: run `make bench-deps` first")
    sys.path.insert(0, str(path))
    import attention_map_diffusers  # capture needs torch + diffusers only (torchvision: PNG saving; ftfy: unused)

    if attention_map_diffusers.__version__ != "1.0.0":
        raise SystemExit(f"{path} holds attention-map-diffusers {attention_map_diffusers.__version__}, not 1.0.0")
    return attention_map_diffusers


def trim_heap() -> None:
    """Return freed memory to the OS so that the next run's RSS baseline is not inflated."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def sd3_sized_pipeline():
    from dit import sd3_sized_pipeline as build

    return build()


def flux_sized_pipeline():
    """Flux blocks 1536 wide (12 heads of 128), 2 double + 2 single, with a VAE scaling by 8."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tiny = tiny_flux_pipeline()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=12, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=tiny.scheduler,
        vae=_dit_vae(1, 4, 4),
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
    )
    return pipe


def locate(tokenizer, text: str, word: str, offset: int = 0) -> list[int]:
    """Positions of ``word``'s tokens in the encoded ``text`` (special tokens included), shifted by offset."""
    ids = tokenizer(text).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return [offset + i + j for j in range(len(sub))]
    raise ValueError(f"{word!r} not found in the tokens of {text!r}")


def build_case(name: str, smoke: bool, size: int, steps: int) -> dict:
    """The pipeline, its call, daami2i's variants and the word's key columns in the peer's text block
    (one list per text stream: SD3 has the fused CLIP block, then T5)."""
    if name == "sd2":
        pipe = tiny_sd_pipeline("sd2", sample_size=16) if smoke else sd2_sized_pipeline(sample_size=size // 8)
        side = 128 if smoke else size
        call = dict(height=side, width=side)
        daami = {"daami2i default": {}, "daami2i all layers": {"self_factors": "all", "cross_factors": "all"}}
        compare = "daami2i all layers"
        columns = [locate(pipe.tokenizer, PROMPT, WORD)]
        label = "SD-2-base-sized UNet" if not smoke else "tiny SD-2 UNet"
    elif name == "sd3":
        pipe = tiny_sd3_pipeline(dual_attention_layers=()) if smoke else sd3_sized_pipeline()
        side = 64 if smoke else size
        call = dict(height=side, width=side)
        daami = {"daami2i default": {}}
        compare = "daami2i default"
        clip = pipe.tokenizer.model_max_length  # the peer's text block: 77 CLIP (fused) columns, then T5
        columns = [locate(pipe.tokenizer, PROMPT, WORD), locate(pipe.tokenizer_3, PROMPT, WORD, offset=clip)]
        label = "SD3-medium-width MMDiT, 2 joint blocks" if not smoke else "tiny SD3 MMDiT"
    elif name == "flux":
        pipe = tiny_flux_pipeline(num_layers=2) if smoke else flux_sized_pipeline()
        side = 64 if smoke else size
        call = dict(height=side, width=side, max_sequence_length=32 if smoke else 128)
        double = [n for n in daami2i.trace(pipe).attention_layers if n.startswith("transformer_blocks.")]
        daami = {"daami2i default": {}, "daami2i peer's layers": {"self_layers": double, "cross_layers": double}}
        compare = "daami2i peer's layers"
        columns = [locate(pipe.tokenizer_2, PROMPT, WORD)]
        label = "Flux, 1536 wide, 2 double + 2 single blocks" if not smoke else "tiny Flux, 2 double + 2 single"
    else:
        raise SystemExit(f"unknown case {name!r}; choose from sd2, sd3, flux")
    pipe.set_progress_bar_config(disable=True)
    call.update(prompt=PROMPT, num_inference_steps=steps)
    return {"name": name, "label": label, "pipe": pipe, "call": call, "daami": daami, "compare": compare,
            "columns": columns}  # fmt: skip


def peer_word_map(records, streams: list[list[int]], grid: tuple[int, int]) -> torch.Tensor:
    """daami2i's word-map recipe applied to the peer's image->text records: conditional half, the mean
    of the word's token columns (averaged over text streams), times the layer's head count (the peer
    keeps the head mean, DAAM sums heads), bicubically upsampled, clamped, summed over layers and steps."""
    total = torch.zeros(grid)
    for r in records:
        if r.relation != "image->text" or r.data is None:
            continue
        h, w = r.q_shape.height, r.q_shape.width
        row = r.data[-1, 0].float()  # last row of the batch: the conditional half
        m = sum(row[:, cols].mean(-1) for cols in streams) / len(streams) * r.heads
        m = m.reshape(1, 1, h, w)
        total += F.interpolate(m, size=grid, mode="bicubic").clamp_(min=0)[0, 0]
    return total


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.flatten().double(), b.flatten().double()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return {"pearson": corr, "same_argmax": int(a.argmax()) == int(b.argmax()), "cells": a.numel()}


def run_once(case: dict, variant: str, amd, keep_maps: bool) -> dict:
    pipe, call = case["pipe"], case["call"]
    trim_heap()
    out: dict = {"compute_s": 0.0}
    word_map = None
    with PeakRSS() as mem:
        start = time.perf_counter()
        if variant == "untraced":
            pipe(**call, generator=torch.Generator().manual_seed(0))
            out["gen_s"] = time.perf_counter() - start
            out["store"] = 0
        elif variant == PEER:
            with amd.AttentionCapture(
                pipe, relations=RELATIONS, timesteps="all", offload="cpu", max_capture_bytes=None
            ) as cap:
                pipe(**call, generator=torch.Generator().manual_seed(0))
            out["gen_s"] = time.perf_counter() - start
            out["during_store"] = cap.collector.capture_bytes  # queries and keys kept for compute()
            c = time.perf_counter()
            maps = cap.compute()
            out["compute_s"] = time.perf_counter() - c
            out["store"] = cap.collector.capture_bytes
            out["records"] = len(maps.records)
            if keep_maps:
                word_map = maps.records  # reduced below, outside the timing
            del cap
        else:
            with daami2i.trace(pipe, **case["daami"][variant]) as trc:
                pipe(**call, generator=torch.Generator().manual_seed(0))
            out["gen_s"] = time.perf_counter() - start
            out["store"] = trc.last_generation.nbytes()
            if keep_maps:
                word_map = trc.compute_global_heat_map().compute_word_heat_map(WORD).heatmap.float().cpu()
            del trc
    out["seconds"] = out["gen_s"] + out["compute_s"]
    out["peak"] = mem.delta
    if word_map is not None:
        out["word_map"] = word_map
    return out


def bench(case: dict, repeats: int, amd) -> dict:
    variants = ["untraced", *case["daami"], PEER]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with torch.no_grad():
        run_once(case, "untraced", amd, False)  # warm-up
        for r in range(repeats):
            for v in variants:  # alternate the variants
                runs[v].append(run_once(case, v, amd, keep_maps=r == 0 and v in (case["compare"], PEER)))
                print(f"  {case['name']} repeat {r + 1}: {v}: {runs[v][-1]['seconds']:.2f}s", flush=True)
    ours = runs[case["compare"]][0].pop("word_map")
    theirs = peer_word_map(runs[PEER][0].pop("word_map"), case["columns"], tuple(ours.shape))
    base = statistics.median(x["seconds"] for x in runs["untraced"])
    base_peak = statistics.median(x["peak"] for x in runs["untraced"])
    table = {}
    for v in variants:
        med = {k: statistics.median(x[k] for x in runs[v]) for k in ("seconds", "gen_s", "compute_s", "peak")}
        table[v] = {
            "seconds": med["seconds"],
            "generation_s": med["gen_s"],
            "compute_s": med["compute_s"],
            "ratio": med["seconds"] / base,
            "peak_rss_delta_mib": med["peak"] / 2**20,
            "peak_over_untraced_mib": (med["peak"] - base_peak) / 2**20,
            "store_mib": runs[v][0]["store"] / 2**20,
        }
        if v == PEER:
            table[v]["store_during_generation_mib"] = runs[v][0]["during_store"] / 2**20
            table[v]["records"] = runs[v][0]["records"]
    call = {k: v for k, v in case["call"].items() if k != "prompt"}
    return {"case": case["name"], "label": case["label"], "call": call, "table": table,
            "word_map": {"word": WORD, "daami2i_variant": case["compare"], **agreement(ours, theirs)}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="sd2,sd3,flux")
    p.add_argument("--size", type=int, default=512, help="image side (all cases)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--amd-path", type=Path, default=Path(".bench/amd"))
    p.add_argument("--json", type=Path, default=Path("outputs/bench-peers.json"))
    p.add_argument("--smoke", action="store_true", help="tiny pipelines, one repeat (seconds)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats = 1
    amd = import_peer(args.amd_path)
    load_before = os.getloadavg()
    results = []
    for name in args.cases.split(","):
        case = build_case(name, args.smoke, args.size, args.steps)
        print(f"{case['label']}: {case['call']['height']} px, {args.steps} steps", flush=True)
        results.append(bench(case, args.repeats, amd))
        del case
        trim_heap()
    load_after = os.getloadavg()
    print(
        f"\n{torch.get_num_threads()} threads, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after"
        f" on {os.cpu_count()} CPUs"
    )
    print(
        f"{'case':5} {'variant':23} {'seconds':>8} {'(compute)':>9} {'ratio':>6} {'peak+ MiB':>10} "
        f"{'store MiB':>10} {'kept during gen':>15}"
    )
    for r in results:
        for v, x in r["table"].items():
            during = f"{x['store_during_generation_mib']:15.1f}" if "store_during_generation_mib" in x else ""
            compute = f"{x['compute_s']:9.2f}" if x["compute_s"] else f"{'':9}"
            print(
                f"{r['case']:5} {v:23} {x['seconds']:8.2f} {compute} {x['ratio']:6.2f} "
                f"{x['peak_over_untraced_mib']:10.0f} {x['store_mib']:10.1f} {during}"
            )
        w = r["word_map"]
        print(
            f"{r['case']:5} word map {w['word']!r} ({w['daami2i_variant']} vs {PEER}): pearson {w['pearson']:.3f}, "
            f"same argmax: {w['same_argmax']} ({w['cells']} cells)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {"threads": torch.get_num_threads(), "load_average": [load_before, load_after], "smoke": args.smoke,
               "steps": args.steps, "peer": f"{PEER} {amd.__version__}", "results": results}  # fmt: skip
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

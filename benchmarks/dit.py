"""SD3 / Flux (joint attention): capture overhead and store sizes.

    python benchmarks/dit.py [--sizes 512,1024] [--repeats 2] [--json outputs/bench-dit.json]

Overhead: an SD3 transformer with SD3-medium's attention width (24 heads of 64) but 2 layers,
random weights, inside tiny text encoders and a tiny VAE that scales by 8 like the real one (so
1024 x 1024 gives SD3's 64 x 64 grid of 4096 image tokens); classifier-free guidance on; untraced vs
traced (default capture: every layer's image-to-image and image-to-text blocks), alternating,
medians.

Store sizes at 1024 x 1024: the real configurations of SD3-medium, SD3.5-medium, SD3.5-large and
FLUX.1-dev are built on the meta device (no weights) and :meth:`daami2i.Trace.estimate_nbytes`
gives the store for one image, next to what keeping every layer's and step's joint matrix
(fp16, all heads, 28 steps) would take.
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

import daami2i
from daami2i.testing import _dit_vae, tiny_sd3_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from capture import PeakRSS

REAL = {
    "SD3-medium": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        ),
    ),
    "SD3.5-medium": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        ),
    ),
    "SD3.5-large": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
        ),
    ),
    "FLUX.1-dev": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ),
    ),
}  # fmt: skip


def store_sizes(prompt_tokens: int = 20, steps: int = 28) -> list[dict]:
    import diffusers

    out = []
    for name, (cls, config) in REAL.items():
        with torch.device("meta"):
            transformer = getattr(diffusers, cls)(**config)
        pipe = types.SimpleNamespace(
            transformer=transformer, unet=None, check_inputs=lambda *a, **k: None, tokenizer_max_length=77
        )
        trc = daami2i.trace(pipe)
        flux = cls.startswith("Flux")
        full_text = 512 if flux else 77 + 256  # the pipelines' default max_sequence_length
        kept = prompt_tokens + 1 if flux else (prompt_tokens + 2) + (prompt_tokens + 1)  # + start / end tokens
        with_prompt = trc.estimate_nbytes((128, 128), 1, kept)
        without = trc.estimate_nbytes((128, 128), 1, full_text)
        joint = [s for s in trc.sites if s.kind == "joint"]
        s_len = 4096 + full_text
        heads = config["num_attention_heads"]
        dense = steps * (len(joint) * heads * s_len**2 + (len(trc.sites) - len(joint)) * heads * 4096**2) * 2
        out.append(
            {
                "model": name,
                "layers": len(trc.sites),
                "joint_layers": len(joint),
                "self_mib": with_prompt["self"] / 2**20,
                "cross_mib_prompt": with_prompt["cross"] / 2**20,
                "total_mib_prompt": with_prompt["total"] / 2**20,
                "total_mib_all_text": without["total"] / 2**20,
                "every_joint_matrix_gib": dense / 2**30,
            }
        )
    return out


def sd3_sized_pipeline():
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline(dual_attention_layers=(), qk_norm="rms_norm")
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=32, caption_projection_dim=1536, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=192, qk_norm="rms_norm",
    ).eval()  # fmt: skip
    pipe.vae = _dit_vae(1, 4, 4)  # scales by 8
    pipe.vae_scale_factor = 8
    pipe.image_processor.config.vae_scale_factor = 8
    return pipe


def run_once(pipe, traced: bool, call: dict) -> tuple[float, int, int]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        if traced:
            with daami2i.trace(pipe) as trc:
                pipe(**call, generator=torch.Generator().manual_seed(0))
            store = trc.last_generation.nbytes()
        else:
            pipe(**call, generator=torch.Generator().manual_seed(0))
            store = 0
        elapsed = time.perf_counter() - start
    return elapsed, mem.delta, store


def main() -> None:
    p = argparse.ArgumentParser(description="daami2i SD3 / Flux benchmark")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("outputs/bench-dit.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    sizes = store_sizes()
    print(
        f"{'model':13} {'layers':>6} {'self MiB':>9} {'words MiB':>9} {'total':>7} {'all text':>9} {'every matrix':>13}"
    )
    for r in sizes:
        print(
            f"{r['model']:13} {r['layers']:6} {r['self_mib']:9.1f} {r['cross_mib_prompt']:9.1f} "
            f"{r['total_mib_prompt']:7.1f} {r['total_mib_all_text']:9.1f} {r['every_joint_matrix_gib']:10.0f} GiB"
        )
    pipe = sd3_sized_pipeline()
    runs = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        call = dict(
            prompt="a red cat on a table", num_inference_steps=1 if size >= 1024 else 2, height=size, width=size
        )
        with torch.no_grad():
            run_once(pipe, False, call)  # warm-up
            res: dict[str, list] = {"untraced": [], "traced": []}
            for _ in range(args.repeats):
                res["untraced"].append(run_once(pipe, False, call))
                res["traced"].append(run_once(pipe, True, call))
        base = statistics.median(r[0] for r in res["untraced"])
        t = statistics.median(r[0] for r in res["traced"])
        row = {
            "size": size,
            "steps": call["num_inference_steps"],
            "untraced_s": base,
            "traced_s": t,
            "ratio": t / base,
            "peak_over_untraced_mib": (
                statistics.median(r[1] for r in res["traced"]) - statistics.median(r[1] for r in res["untraced"])
            )
            / 2**20,
            "store_mib": res["traced"][0][2] / 2**20,
        }
        runs.append(row)
        print(
            f"SD3-width, 2 layers, {size}x{size}, {row['steps']} step(s): untraced {base:.2f} s, traced {t:.2f} s "
            f"({row['ratio']:.2f}x), peak +{row['peak_over_untraced_mib']:.0f} MiB, store {row['store_mib']:.1f} MiB"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "stores": sizes, "overhead": runs}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

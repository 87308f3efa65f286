"""Heat-map quality against ground truth on the shapes world, and the model's own quality gate.

    python benchmarks/shapes_quality.py [--model PATH] [--n 100] [--json outputs/shapes-quality.json]

* quality gate: for N held-out captions, generate and check with the colour/shape checker whether
  every requested object is there in the requested colour and shape;
* generated mode: the same generations traced; each object's mask is found by colour-segmenting
  the generated image; the word maps of its shape word and its colour word are scored;
* real mode: held-out dataset images with exact masks, through real-image attribution;
* metrics: mIoU at DAAM's tau = 0.4 on min-max normalised maps; the best-threshold mIoU (one
  threshold for the whole set, the best of 0.05 .. 0.95); pointing accuracy (the map's maximum lies
  on the object); baselines: the whole image (uniform map) and a centred Gaussian prior;
* variants: raw word maps; guided by self-attention at the highest resolution; across all
  resolutions; repeated refinement (S^3 c); both CFG halves instead of the conditional one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import daami2i
from daami2i.shapes import make_scene
from daami2i.shapes.checker import check, mask_of_color
from daami2i.shapes.model import DEFAULTS, load_pipeline, model_path
from daami2i.shapes.train import HELD_OUT

THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)


def score(pred: np.ndarray, mask: np.ndarray) -> dict[str, float | list[float]]:
    """IoU at every threshold and pointing, for one min-max normalised map and one mask."""
    ious = []
    for t in THRESHOLDS:
        p = pred > t
        union = (p | mask).sum()
        ious.append(float((p & mask).sum() / union) if union else 0.0)
    return {"ious": ious, "point": float(mask.flat[int(pred.argmax())])}


def baselines(mask: np.ndarray) -> dict[str, dict]:
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    centre = np.exp(-(((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2) / (2 * (h / 4) ** 2)))
    uniform = {"ious": [float(mask.mean())] * len(THRESHOLDS), "point": float(mask.mean())}
    return {"baseline: uniform": uniform, "baseline: centre prior": score(centre / centre.max(), mask)}


def variants(ghm_all, ghm_high, word: str, size) -> dict[str, np.ndarray]:
    raw = ghm_high.compute_word_heat_map(word)
    out = {"raw word map": raw, "guided, highest res": ghm_high.compute_guided_heat_map(raw)}
    out["guided, all resolutions"] = ghm_all.compute_guided_heat_map(raw)
    rep = raw
    for _ in range(3):
        rep = ghm_high.compute_guided_heat_map(rep)
    out["repeated refinement S^3 c"] = rep
    return {k: v.expand_as(size).numpy() for k, v in out.items()}


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict]:
    table = {}
    for name, items in rows.items():
        ious = np.array([r["ious"] for r in items])  # (n, thresholds)
        mean = ious.mean(0)
        best = int(mean.argmax())
        table[name] = {
            "n": len(items),
            "miou@0.4": float(mean[list(THRESHOLDS).index(0.4)]),
            "best_miou": float(mean[best]),
            "best_threshold": float(THRESHOLDS[best]),
            "pointing": float(np.mean([r["point"] for r in items])),
        }
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=model_path())
    p.add_argument("--n", type=int, default=100, help="held-out prompts (and real images)")
    p.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    p.add_argument("--timesteps", default="200,400,600", help="real mode: noise levels")
    p.add_argument("--json", type=Path, default=Path("outputs/shapes-quality.json"))
    p.add_argument("--grid", type=Path, default=None, help="also save a grid of the first 32 samples")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from diffusers import StableDiffusionPipeline

    if args.model == model_path():
        pipe = load_pipeline()
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(args.model), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    gate = defaultdict(list)
    gen_rows: dict[str, list] = defaultdict(list)
    real_rows: dict[str, list] = defaultdict(list)
    samples = []
    for i in range(args.n):
        scene = make_scene(HELD_OUT + i)
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
        with daami2i.trace(pipe, self_factors="all") as trc:
            image = pipe(scene.caption, generator=torch.Generator().manual_seed(i), **call).images[0]
        with daami2i.trace(pipe, self_factors="all", halves="both") as trc_both:
            pipe(scene.caption, generator=torch.Generator().manual_seed(i), **call)
        samples.append((image, scene.caption))
        wanted = [(o.color, o.shape) for o in scene.objects]
        ok = check(image, wanted)
        gate["objects"] += ok
        gate["prompts"].append(all(ok))
        gate[f"prompts with {len(wanted)} object(s)"].append(all(ok))
        ghm_all = trc.compute_global_heat_map()
        ghm_high = trc.compute_global_heat_map(factors=[1])
        both = trc_both.compute_global_heat_map(factors=[1])
        for obj in scene.objects:
            mask = mask_of_color(image, obj.color)
            if mask is None:
                continue
            for kind, word in (("shape", obj.shape), ("colour", obj.color)):
                for name, pred in variants(ghm_all, ghm_high, word, (64, 64)).items():
                    gen_rows[f"{kind}: {name}"].append(score(pred, mask))
                raw_both = both.compute_word_heat_map(word)
                gen_rows[f"{kind}: raw, both CFG halves"].append(score(raw_both.expand_as((64, 64)).numpy(), mask))
                guided_both = both.compute_guided_heat_map(raw_both).expand_as((64, 64)).numpy()
                gen_rows[f"{kind}: guided, both CFG halves"].append(score(guided_both, mask))
            for name, b in baselines(mask).items():
                gen_rows[name].append(b)
        # real mode: the held-out scene itself, exact masks
        real = daami2i.trace_image(
            pipe,
            scene.image,
            scene.caption,
            self_factors="all",
            timesteps=[int(t) for t in args.timesteps.split(",")],
            generator=torch.Generator().manual_seed(i),
        )
        r_all = real.compute_global_heat_map()
        r_high = real.compute_global_heat_map(factors=[1])
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            for kind, word in (("shape", obj.shape), ("colour", obj.color)):
                for name, pred in variants(r_all, r_high, word, (64, 64)).items():
                    real_rows[f"{kind}: {name}"].append(score(pred, mask))
            for name, b in baselines(mask).items():
                real_rows[name].append(b)
    result = {
        "model": str(args.model),
        "n_prompts": args.n,
        "sampling": {"steps": args.steps, "guidance": args.guidance},
        "seconds": time.time() - t0,
        "quality_gate": {k: float(np.mean(v)) for k, v in gate.items()},
        "generated": summarise(gen_rows),
        "real": summarise(real_rows),
    }
    print(
        f"quality gate ({args.n} held-out prompts): "
        + ", ".join(f"{k} {v:.0%}" for k, v in result["quality_gate"].items())
    )
    for mode in ("generated", "real"):
        print(f"\n{mode} mode           {'mIoU@0.4':>9} {'best mIoU':>9} {'(thr)':>6} {'pointing':>8} {'n':>5}")
        for name, row in result[mode].items():
            print(
                f"  {name:34} {row['miou@0.4']:9.3f} {row['best_miou']:9.3f} {row['best_threshold']:6.2f} "
                f"{row['pointing']:8.2f} {row['n']:5d}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json} in {result['seconds']:.0f}s")
    if args.grid is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(16, 9))
        for ax, (im, cap) in zip(fig.subplots(4, 8).ravel(), samples[:32], strict=False):
            ax.imshow(im)
            ax.set_title(cap.replace(" and ", "\nand ").replace(", ", ",\n"), fontsize=6)
            ax.axis("off")
        fig.tight_layout()
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.grid, dpi=110)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()

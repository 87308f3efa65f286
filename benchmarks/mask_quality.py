"""Mask quality of each merging scheme on the shapes world, against exact ground-truth masks.

    python benchmarks/mask_quality.py [--n 100] [--json outputs/mask-quality.json]

For N held-out scenes (real images with exact masks, through real-image attribution with
self-attention at every resolution), each object's shape word gets a map under every scheme of
``daami2i.heatmaps.schemes`` (raw, guided, cascade, repeated, diffused); the map is resized to the
image, thresholded (DAAM's tau = 0.4, or Otsu after a blur of 1 px) and turned into instances
(fragments < 5 % of the largest dropped, overlapping boxes merged); the union of the word's
instances is scored by IoU against the object's mask. The multi-word ``label map`` (argmax of the
guided maps of the scene's shape words, background where every normalised map is <= 0.4) is scored
per object too. Reported: mean IoU per variant, and a whole-image baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from daami2i import trace_image
from daami2i.heatmaps import masks as M
from daami2i.heatmaps.maps import HeatMap
from daami2i.heatmaps.schemes import SCHEMES, word_map
from daami2i.shapes import make_scene
from daami2i.shapes.model import model_path
from daami2i.shapes.train import HELD_OUT


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def instance_mask(heat: torch.Tensor, size: tuple[int, int], method: str) -> np.ndarray:
    """The union of the instances found in a heat map resized to the image."""
    up = HeatMap(heat).expand_as(size)
    found = M.instances(M.binarize(up, method), min_fragment=0.05, merge_iou=0.3)
    out = np.zeros(size, dtype=bool)
    for inst in found:
        out |= inst.mask
    return out


def scene_scores(pipe, seed: int) -> dict[str, list[float]]:
    """IoU of every variant for every object of one held-out scene."""
    scene = make_scene(seed)
    trc = trace_image(
        pipe, scene.image, scene.caption, generator=torch.Generator().manual_seed(seed), self_factors="all"
    )
    ghm = trc.compute_global_heat_map()
    size = (scene.image.height, scene.image.width)
    out: dict[str, list[float]] = {}
    shapes = [o.shape for o in scene.objects]
    for obj, gt in zip(scene.objects, scene.masks, strict=True):
        for scheme in SCHEMES:
            heat = word_map(ghm, obj.shape, scheme)
            for method in ("tau", "otsu"):
                out.setdefault(f"{scheme} / {method}", []).append(iou(instance_mask(heat, size, method), gt))
        out.setdefault("baseline: whole image", []).append(float(gt.mean()))
    guided = torch.stack([HeatMap(word_map(ghm, s, "guided")).expand_as(size) for s in shapes])
    labels = M.label_map(guided, background=0.4)
    for j, gt in enumerate(scene.masks):
        out.setdefault("label map (guided) / argmax", []).append(iou(labels == j + 1, gt))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=model_path())
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--json", type=Path, default=Path("outputs/mask-quality.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    rows: dict[str, list[float]] = {}
    for i in range(args.n):
        for k, v in scene_scores(pipe, HELD_OUT + i).items():
            rows.setdefault(k, []).extend(v)
    table = {k: float(np.mean(v)) for k, v in rows.items()}
    n_obj = len(rows["baseline: whole image"])
    print(
        f"{args.n} held-out real images, {n_obj} objects, mean IoU of the shape word's mask ({time.time() - t0:.0f}s)"
    )
    for k, v in sorted(table.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32} {v:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n_images": args.n, "n_objects": n_obj, "mIoU": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

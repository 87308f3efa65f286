"""Which joint-attention layers carry the grounding? SD3-style word maps, layer by layer, on the shapes world.

    python -m daami2i.shapes.train_dit --work runs/shapes-dit --vae runs/shapes/vae --pool runs/shapes2
    python benchmarks/dit_layers.py --model runs/shapes-dit/pipeline [--n 100] [--json outputs/dit-layers.json]

Real mode (as in benchmarks/shapes_quality.py): held-out shapes scenes with exact masks go through
real-image attribution (noise levels 200, 400, 600 of 1000); for every object the map of its shape
word and of its colour word is scored with mIoU at tau = 0.4 on the min-max normalised map, the
best-threshold mIoU and pointing accuracy, next to the whole-image baseline. Variants: the word map
of each joint layer alone (``compute_global_heat_map(layers=[name])``), of every layer, guided by the
self-attention of every layer, and each layer's word map guided by that layer's own self-attention
(traced with ``self_layers=[name], cross_layers=[name]``). The model's quality gate (objects drawn
in the right colour and shape) is reported too, so that the maps are read next to how well the
model draws.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import daami2i
from daami2i.shapes import make_scene
from daami2i.shapes.checker import check
from daami2i.shapes.train import HELD_OUT
from daami2i.shapes.train_dit import CALL, MAX_TOKENS, load_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from shapes_quality import baselines, score, summarise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/shapes-dit/pipeline"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--timesteps", default="200,400,600")
    p.add_argument("--json", type=Path, default=Path("outputs/dit-layers.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pipe = load_pipeline(args.model)
    layers = [n for n, (kind, _) in daami2i.trace(pipe).attention_layers.items() if kind == "joint"]
    steps = [int(t) for t in args.timesteps.split(",")]
    t0 = time.time()
    rows: dict[str, list] = defaultdict(list)
    gate: dict[str, list] = defaultdict(list)
    for i in range(args.n):
        scene = make_scene(HELD_OUT + i)
        image = pipe(scene.caption, generator=torch.Generator().manual_seed(i), **CALL).images[0]
        ok = check(image, [(o.color, o.shape) for o in scene.objects])
        gate["objects"] += ok
        gate["prompts"].append(all(ok))
        trc = daami2i.trace_image(
            pipe,
            scene.image,
            scene.caption,
            timesteps=steps,
            generator=torch.Generator().manual_seed(i),
            max_sequence_length=MAX_TOKENS,
        )
        ghm = trc.compute_global_heat_map()
        per_layer = {name: trc.compute_global_heat_map(layers=[name]) for name in layers}
        own = {  # each layer's word map guided by that layer's own self-attention block
            name: daami2i.trace_image(
                pipe,
                scene.image,
                scene.caption,
                timesteps=steps,
                generator=torch.Generator().manual_seed(i),
                max_sequence_length=MAX_TOKENS,
                self_layers=[name],
                cross_layers=[name],
            ).compute_global_heat_map()
            for name in layers
        }
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            for kind, word in (("shape", obj.shape), ("colour", obj.color)):
                raw = ghm.compute_word_heat_map(word)
                maps = {"every layer": raw, "every layer, guided by self-attention": ghm.compute_guided_heat_map(raw)}
                for name, g in per_layer.items():
                    maps[name] = g.compute_word_heat_map(word)
                for name, g in own.items():
                    maps[f"{name}, guided by its own self-attention"] = g.compute_guided_heat_map(
                        g.compute_word_heat_map(word)
                    )
                for name, m in maps.items():
                    rows[f"{kind}: {name}"].append(score(m.expand_as((64, 64)).numpy(), mask))
            for name, b in baselines(mask).items():
                rows[name].append(b)
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{args.n} images, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    table = summarise(rows)
    gate_out = {k: float(np.mean(v)) for k, v in gate.items()}
    print(
        f"quality gate on {args.n} captions: {gate_out['objects']:.0%} of objects, {gate_out['prompts']:.0%} of prompts"
    )
    print(f"{'map (real images, exact masks)':80} {'mIoU@0.4':>9} {'best mIoU':>9} {'pointing':>8}")
    for name, r in table.items():
        print(f"{name:80} {r['miou@0.4']:9.3f} {r['best_miou']:9.3f} {r['pointing']:8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": str(args.model),
                "n": args.n,
                "timesteps": steps,
                "layers": layers,
                "gate": gate_out,
                "real": table,
                "seconds": time.time() - t0,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

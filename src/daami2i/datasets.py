"""Synthetic detection / segmentation datasets: generate under the trace, turn word maps into
instances, write COCO files. Resumable, and sharded by rank under ``accelerate launch``.

Layout of ``out``::

    images/000000001.png ...       one PNG per sample (image id = prompt index * K + k + 1)
    shards/rank-0.jsonl ...        one JSON line per finished sample (written after its image)
    instances.json, captions.json  COCO files, merged from every shard at the end

Sample ``(prompt i, k)`` is generated with seed ``seed + image id``, so a sample does not depend on
which process made it or on how often the run was interrupted. A sample counts as done once its
line is in a shard file; a run that is killed and started again skips the done samples and
appends the rest. Categories are the words (lemmas when spaCy is used), numbered in sorted order;
annotation ids follow image ids.

>>> words_in("a red circle and a blue square", ["circle", "square", "triangle"])
['circle', 'square']
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, QueryError
from .heatmaps import masks as M
from .heatmaps.maps import HeatMap
from .heatmaps.schemes import SCHEMES, word_map

FORMAT = "daami2i-dataset"


@dataclass
class DatasetConfig:
    """How samples are made: sampling, which scheme turns word maps into masks, and how."""

    images_per_prompt: int = 1
    scheme: str = "guided"
    method: str = "tau"  # "tau" or "otsu"
    tau: float = 0.4
    min_fragment: float = 0.05
    merge_iou: float | None = 0.3
    segmentation: str = "auto"  # "auto", "polygon" or "rle"
    seed: int = 0
    steps: int = 25
    guidance: float = 4.0
    save_experiments: bool = False
    spacy_model: str | None = None  # pipeline name or folder for noun lookup (when no words are given)

    def check(self) -> None:
        if self.images_per_prompt < 1:
            raise ConfigError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.method not in ("tau", "otsu"):
            raise ConfigError(f"method must be 'tau' or 'otsu', got {self.method!r}")
        if self.segmentation not in ("auto", "polygon", "rle"):
            raise ConfigError(f"segmentation must be 'auto', 'polygon' or 'rle', got {self.segmentation!r}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist: write one prompt per line")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def words_in(prompt: str, vocabulary: Sequence[str]) -> list[str]:
    """The entries of ``vocabulary`` (words or phrases) that occur in ``prompt`` as whole words,
    case-insensitively, in the order of their first occurrence.

    >>> words_in("A flower pot, two cats and a flower", ["cat", "cats", "flower pot", "pot"])
    ['flower pot', 'cats']
    """
    import re

    found = []
    for entry in dict.fromkeys(v.strip().lower() for v in vocabulary if v.strip()):
        phrase = r"\s+".join(re.escape(w) for w in entry.split())
        m = re.search(rf"(?<![\w-]){phrase}(?![\w-])", prompt.lower())
        if m:
            found.append((m.start(), entry))
    # a phrase hides the single words inside it ("flower pot" wins over "pot")
    kept = [(i, e) for i, e in found if not any(e != f and e in f.split() for _, f in found)]
    return [e for _, e in sorted(kept)]


def nouns(prompt: str, model: str | None = None) -> list[tuple[str, str]]:
    """(word, lemma) of every noun of ``prompt``, in order, with an installed spaCy pipeline.

    ``model`` is a spaCy pipeline name or folder; by default the first installed of
    ``en_core_web_sm`` / ``_md`` / ``_lg``. spaCy and its pipelines are optional and never downloaded
    at run time.
    """
    nlp = _spacy_pipeline(model)
    out: list[tuple[str, str]] = []
    for tok in nlp(prompt):
        word = tok.text.lower()
        if tok.pos_ in ("NOUN", "PROPN") and word not in [w for w, _ in out]:
            out.append((word, (tok.lemma_ or tok.text).lower()))
    return out


@functools.lru_cache(maxsize=4)
def _spacy_pipeline(model: str | None) -> Any:
    try:
        import spacy
    except ImportError as exc:
        raise ConfigError(
            "finding nouns needs spaCy and an English pipeline (pip install 'daami2i[nlp]' en_core_web_sm); "
            "or pass the words to look for (--words circle,square,triangle)"
        ) from exc
    names = [model] if model is not None else ["en_core_web_sm", "en_core_web_md", "en_core_web_lg"]
    for name in names:
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise ConfigError(
        f"no spaCy pipeline {' / '.join(names)} is installed: install one (pip install en_core_web_sm), "
        "pass --spacy-model with a pipeline name or folder, or pass --words"
    )


def shard_of(n_prompts: int, rank: int, world: int) -> list[int]:
    """The prompt indices of process ``rank`` among ``world``: every ``world``-th from ``rank``.

    >>> shard_of(5, 1, 2)
    [1, 3]
    """
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, {world}), got {rank}")
    return list(range(rank, n_prompts, world))


def _done(out: Path) -> set[int]:
    ids: set[int] = set()
    for shard in sorted((out / "shards").glob("rank-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(int(json.loads(line)["image_id"]))
            except (ValueError, KeyError):  # a line cut short by a kill: that sample is redone
                continue
    return ids


def _check_out(out: Path, prompts: list[str], config: DatasetConfig) -> None:
    """Refuse to mix runs: a folder holds one prompt list and one configuration."""
    meta = out / "dataset.json"
    info = {"format": FORMAT, "version": 1, "prompts": prompts, "config": vars(config)}
    if meta.is_file():
        old = json.loads(meta.read_text(encoding="utf-8"))
        if old.get("prompts") != prompts or old.get("config") != info["config"]:
            raise ConfigError(
                f"{out} holds a dataset made from other prompts or settings: choose another output folder "
                "(or delete it to start again)"
            )
    elif out.exists() and any(p.name not in ("shards", "images") for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and is not a daami2i dataset folder: choose another output folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp, meta)


def generate_shard(
    pipe: Any,
    prompts: list[str],
    out: Path,
    config: DatasetConfig,
    vocabulary: Sequence[str] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> int:
    """Generate this process's samples that are not done yet; returns how many it made."""
    from tqdm.auto import tqdm

    from .tracing import trace

    config.check()
    if rank == 0:
        _check_out(out, prompts, config)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    done = _done(out)
    k_per = config.images_per_prompt
    todo = [(i, k) for i in shard_of(len(prompts), rank, world) for k in range(k_per) if i * k_per + k + 1 not in done]
    shard = out / "shards" / f"rank-{rank}.jsonl"
    if shard.is_file() and shard.stat().st_size and not shard.read_bytes().endswith(b"\n"):
        with shard.open("a", encoding="utf-8") as f:  # end a line cut short by a kill
            f.write("\n")
    made = 0
    bar = tqdm(todo, desc=f"dataset (rank {rank})", unit="image", disable=not progress, file=sys.stderr)
    for i, k in bar:
        prompt = prompts[i]
        image_id = i * k_per + k + 1
        if vocabulary is not None:
            pairs = [(w, w) for w in words_in(prompt, vocabulary)]
        else:
            pairs = nouns(prompt, config.spacy_model)
        gen = torch.Generator(device="cpu").manual_seed(config.seed + image_id)
        with trace(pipe) as trc:
            image = pipe(
                prompt, num_inference_steps=config.steps, guidance_scale=config.guidance, generator=gen
            ).images[0]
        ghm = trc.compute_global_heat_map()
        anns = []
        for word, lemma in pairs:
            try:
                heat = word_map(ghm, word, config.scheme)
            except QueryError:  # e.g. the word was cut off by the tokenizer's length limit
                continue
            up = HeatMap(heat).expand_as(image)  # min-max normalised, at the image's size
            mask = M.binarize(up, config.method, config.tau)  # type: ignore[arg-type]
            for inst in M.instances(mask, config.min_fragment, config.merge_iou):
                fields = inst.annotation(config.segmentation)  # type: ignore[arg-type]
                anns.append({"category": lemma, "word": word, **fields})
        name = f"{image_id:09d}.png"
        tmp = out / "images" / f".{name}.tmp.png"
        image.save(tmp)
        os.replace(tmp, out / "images" / name)
        if config.save_experiments:
            trc.to_experiment(out / "experiments" / f"{image_id:09d}", seed=config.seed + image_id, overwrite=True)
        record = {
            "image_id": image_id,
            "file_name": f"images/{name}",
            "prompt_index": i,
            "sample": k,
            "caption": prompt,
            "height": image.size[1],
            "width": image.size[0],
            "seed": config.seed + image_id,
            "annotations": anns,
        }
        with shard.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        made += 1
    return made


def merge(out: Path) -> tuple[Path, Path]:
    """Merge every shard into ``instances.json`` (COCO) and ``captions.json``; returns their paths."""
    records: dict[int, dict[str, Any]] = {}
    for shard in sorted((out / "shards").glob("rank-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            records.setdefault(int(rec["image_id"]), rec)  # a sample written twice counts once
    if not records:
        raise ConfigError(f"{out} has no finished samples to merge")
    cats = sorted({a["category"] for r in records.values() for a in r["annotations"]})
    cat_id = {c: j + 1 for j, c in enumerate(cats)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    for image_id in sorted(records):
        r = records[image_id]
        images.append({"id": image_id, "file_name": r["file_name"], "height": r["height"], "width": r["width"]})
        captions.append({"id": image_id, "image_id": image_id, "caption": r["caption"]})
        for a in r["annotations"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[a["category"]],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "segmentation": a["segmentation"],
                    "iscrowd": a["iscrowd"],
                }
            )
    categories = [{"id": cat_id[c], "name": c, "supercategory": "object"} for c in cats]
    inst = {"info": {"description": "daami2i synthetic dataset"}, "images": images, "annotations": annotations}
    inst["categories"] = categories
    paths = out / "instances.json", out / "captions.json"
    for path, data in zip(paths, (inst, {"images": images, "annotations": captions}), strict=True):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    return paths


def evaluate(pred_path: Path, gt_path: Path) -> dict[str, Any]:
    """COCO AP (segm and bbox, pycocotools) and mask / box mIoU of a prediction file against ground truth.

    ``pred_path`` may be a COCO results list or a full instances file (as :func:`merge` writes);
    categories are matched by name. mIoU: per (image, category) the IoU of the union of predicted
    masks (boxes) with the union of true ones, averaged per category, then over categories.
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    raw = json.loads(Path(pred_path).read_text(encoding="utf-8"))
    if isinstance(raw, dict):  # an instances file: re-key its categories by name onto the ground truth's
        names = {c["id"]: c["name"] for c in raw.get("categories", [])}
        gt_ids = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
        results = []
        for a in raw.get("annotations", []):
            name = names.get(a["category_id"])
            if name in gt_ids:
                results.append({**a, "category_id": gt_ids[name], "score": a.get("score", 1.0)})
    else:
        results = [{**a, "score": a.get("score", 1.0)} for a in raw]
    if not results:
        raise ConfigError(f"{pred_path} holds no predictions for the ground truth's categories")
    for a in results:
        a.pop("id", None)
    out: dict[str, Any] = {"per_category": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        for kind in ("segm", "bbox"):
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[f"{kind}_AP"] = float(ev.stats[0])
            out[f"{kind}_AP50"] = float(ev.stats[1])
    ious: dict[str, dict[int, list[float]]] = {"segm": {}, "bbox": {}}
    for img in gt.getImgIds():
        info = gt.loadImgs(img)[0]
        h, w = info["height"], info["width"]
        for cat in gt.getCatIds():
            g = gt.loadAnns(gt.getAnnIds(imgIds=img, catIds=cat))
            d = dt.loadAnns(dt.getAnnIds(imgIds=img, catIds=cat))
            if not g and not d:
                continue
            for kind in ("segm", "bbox"):
                gm = _union(g, gt, kind, h, w)
                dm = _union(d, dt, kind, h, w)
                union = (gm | dm).sum()
                ious[kind].setdefault(cat, []).append(float((gm & dm).sum() / union) if union else 1.0)
    for kind in ("segm", "bbox"):
        per = {gt.loadCats(c)[0]["name"]: float(np.mean(v)) for c, v in ious[kind].items()}
        out[f"{kind}_mIoU"] = float(np.mean(list(per.values()))) if per else 0.0
        for name, v in per.items():
            out["per_category"].setdefault(name, {})[f"{kind}_IoU"] = v
    return out


def _union(anns: Iterable[dict], coco: Any, kind: str, h: int, w: int) -> Any:
    import numpy as np

    m = np.zeros((h, w), dtype=bool)
    for a in anns:
        if kind == "segm":
            m |= coco.annToMask(a).astype(bool)
        else:
            x, y, bw, bh = a["bbox"]
            m[int(round(y)) : int(round(y + bh)), int(round(x)) : int(round(x + bw))] = True
    return m

"""Experiments on disk: everything needed to answer every query later, without the model.

Layout of an experiment folder (no pickle anywhere; loading never executes code from the files)::

    manifest.json          format, version, prompts, tokens, sizes, steps, pipeline identity, stores
    attention.safetensors  "self/<factor>"        (n_images, N, N)            float32
                           "cross/<layer>"        (n_images, heads, N, 77)    float32
                           "cross_steps/<layer>"  (steps, n_images, heads, N, T) float32, optional
    image_<i>.png          the generated images
    tokenizer/             only when the pipeline's tokenizer is not the standard CLIP BPE one

>>> import daami2i, tempfile
>>> from daami2i.testing import tiny_sd_pipeline
>>> pipe = tiny_sd_pipeline()
>>> with daami2i.trace(pipe) as trc:
...     _ = pipe("a red cat", num_inference_steps=1, height=64, width=64)
>>> folder = trc.to_experiment(tempfile.mkdtemp() + "/exp")
>>> exp = daami2i.load_experiment(folder)
>>> exp.compute_global_heat_map().compute_word_heat_map("cat").value.shape
torch.Size([8, 8])
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import Daami2iError, QueryError
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.selfattn import Direction
from .store import CrossAttentionStore, Generation, SelfAttentionStore

FORMAT = "daami2i-experiment"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "attention.safetensors"


class ExperimentError(Daami2iError, OSError):
    """An experiment folder cannot be written or read."""


def _is_standard_clip(tokenizer: Any) -> bool:
    try:
        return len(tokenizer) == 49408 and tokenizer.convert_tokens_to_ids("cat</w>") == 2368
    except Exception:  # any tokenizer that cannot answer is not the standard one
        return False


def _prepare_folder(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ExperimentError(f"{path} exists and is not a folder: choose another experiment path")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).is_file():
            raise ExperimentError(
                f"{path} is a non-empty folder that is not a daami2i experiment: refusing to write into it"
            )
        if not overwrite:
            raise ExperimentError(f"{path} already holds an experiment: pass overwrite=True to replace it")
        for name in (MANIFEST, TENSORS):
            (path / name).unlink(missing_ok=True)
        for old in path.glob("image_*.png"):
            old.unlink()
    path.mkdir(parents=True, exist_ok=True)


def save_experiment(
    gen: Generation,
    path: str | Path,
    *,
    images: list[Any] | None = None,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    tokenizers: dict[str, Any] | None = None,
) -> Path:
    """Write ``gen`` (and its images) to the folder ``path``; returns the folder.

    ``tokenizers`` (joint models) maps the pipeline attribute of each text stream's tokenizer to it."""
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    _prepare_folder(path, overwrite)
    images = list(images) if images is not None else list(gen.images)
    tensors: dict[str, torch.Tensor] = {}
    for factor, st in gen.self_attention.items():
        tensors[f"self/{factor}"] = st.sums.detach().float().cpu().contiguous()
    for layer, ct in gen.cross_attention.items():
        tensors[f"cross/{layer}"] = ct.sums.detach().float().cpu().contiguous()
        if ct.per_step:
            tensors[f"cross_steps/{layer}"] = torch.stack(ct.per_step).float().cpu().contiguous()
    save_file(tensors, str(path / TENSORS), metadata={"format": FORMAT, "version": str(VERSION)})
    image_files = []
    for i, im in enumerate(images):
        name = f"image_{i}.png"
        im.save(path / name)
        image_files.append(name)
    tok_kind = _save_tokenizer(tokenizer, path / "tokenizer")
    stream_kinds = {
        st["tokenizer"]: _save_tokenizer((tokenizers or {}).get(st["tokenizer"]), path / "tokenizers" / st["tokenizer"])
        for st in gen.streams
    }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"daami2i": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "info": info or {},
        "tokenizer": tok_kind,
        "stream_tokenizers": stream_kinds,
        "generation": {
            "index": gen.index,
            "prompts": gen.prompts,
            "image_prompts": gen.image_prompts,
            "image_tokens": gen.image_tokens,
            "latent_size": list(gen.latent_size) if gen.latent_size else None,
            "grid_size": list(gen.grid_size),
            "image_size": list(gen.image_size) if gen.image_size else None,
            "n_images": gen.n_images,
            "cfg": gen.cfg,
            "halves": gen.halves,
            "steps_run": gen.steps_run,
            "steps_captured": gen.steps_captured,
            "config": gen.config,
            "streams": gen.streams,
        },
        "self_attention": [
            {"factor": f, "size": list(st.size), "layers": st.layers} for f, st in gen.self_attention.items()
        ],
        "cross_attention": [
            {
                "layer": ct.layer,
                "factor": ct.factor,
                "size": list(ct.size),
                "step_tokens": ct.step_tokens,
                "per_step": bool(ct.per_step),
            }
            for ct in gen.cross_attention.values()
        ],
        "images": image_files,
        "nbytes": {k: gen.nbytes(k) for k in ("self", "cross", "cross_steps")},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _save_tokenizer(tokenizer: Any, folder: Path) -> str | None:
    if tokenizer is None:
        return None
    if _is_standard_clip(tokenizer):
        return "clip-bpe-49408"
    tokenizer.save_pretrained(str(folder))
    return "saved"


class Experiment:
    """A saved trace: answers every query like the live trace did, without the model."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        generation: Generation,
        tokenizer: Any,
        tokenizers: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.generation = generation
        self.tokenizer = tokenizer
        self.tokenizers = tokenizers or {}  # joint models: pipeline attribute -> tokenizer of each stream

    @property
    def prompts(self) -> list[str | None]:
        """The prompt of each image."""
        return self.generation.image_prompts

    @property
    def images(self) -> list[Any]:
        """The generated images (PIL), loaded from the folder."""
        from PIL import Image

        out = []
        for name in self.manifest.get("images", []):
            with Image.open(self.path / name) as im:
                out.append(im.copy())
        return out

    def compute_global_heat_map(
        self,
        prompt: str | None = None,
        image_idx: int = 0,
        factors: Any = None,
        direction: Direction | None = None,
        steps: Any = None,
        layers: Any = None,
    ) -> GlobalHeatMap:
        """Same as :meth:`daami2i.Trace.compute_global_heat_map`, from the saved stores."""
        return self.generation.heat_map(
            image_idx,
            tokenizer=self.tokenizer,
            prompt=prompt,
            factors=factors,
            direction=direction or self.generation.config.get("direction", "attended_by"),
            steps=steps,
            tokenizers=self.tokenizers,
            layers=layers,
        )

    def __repr__(self) -> str:
        g = self.generation
        return f"Experiment({str(self.path)!r}, prompts={g.image_prompts}, image_size={g.image_size})"


def _load_tokenizer(path: Path, kind: str | None, folder: str = "tokenizer") -> Any:
    if kind is None:
        return None
    if kind == "clip-bpe-49408":
        from ..testing import clip_tokenizer

        return clip_tokenizer()
    if kind == "saved":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path / folder), local_files_only=True, trust_remote_code=False)
    raise ExperimentError(f"unknown tokenizer kind {kind!r} in {path / MANIFEST}")


def load_experiment(path: str | Path) -> Experiment:
    """Open an experiment folder written by :meth:`daami2i.Trace.to_experiment`."""
    from safetensors.torch import load_file

    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ExperimentError(f"{path} is not a daami2i experiment: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{mpath} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ExperimentError(f"{mpath} is not a daami2i experiment manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ExperimentError(
            f"{path} uses experiment format version {manifest.get('version')}, this daami2i reads version {VERSION}"
        )
    tensors = load_file(str(path / TENSORS))
    g = manifest["generation"]
    gen = Generation(
        index=g["index"],
        grid_size=tuple(g["grid_size"]),
        prompts=g["prompts"],
        latent_size=tuple(g["latent_size"]) if g["latent_size"] else None,
        image_size=tuple(g["image_size"]) if g["image_size"] else None,
        n_images=g["n_images"],
        cfg=g["cfg"],
        halves=g["halves"],
        steps_run=g["steps_run"],
        steps_captured=list(g["steps_captured"]),
        image_prompts=list(g["image_prompts"]),
        image_tokens=list(g["image_tokens"]),
        config=dict(g.get("config", {})),
        streams=list(g.get("streams", [])),
    )
    try:
        for entry in manifest["self_attention"]:
            f = int(entry["factor"])
            gen.self_attention[f] = SelfAttentionStore(
                f, tuple(entry["size"]), tensors[f"self/{f}"], list(entry["layers"])
            )
        for entry in manifest["cross_attention"]:
            layer = entry["layer"]
            steps = tensors.get(f"cross_steps/{layer}")
            gen.cross_attention[layer] = CrossAttentionStore(
                layer,
                int(entry["factor"]),
                tuple(entry["size"]),
                tensors[f"cross/{layer}"],
                per_step=list(steps.unbind(0)) if steps is not None else None,
                step_tokens=int(entry.get("step_tokens", 0)),
            )
    except KeyError as exc:
        raise ExperimentError(f"{path / TENSORS} lacks the tensor {exc} that the manifest lists") from exc
    for st in gen.self_attention.values():
        n = st.size[0] * st.size[1]
        if tuple(st.sums.shape) != (gen.n_images, n, n):
            raise ExperimentError(f"self/{st.factor} has shape {tuple(st.sums.shape)}, expected {(gen.n_images, n, n)}")
    if gen.n_images < 1:
        raise QueryError(f"{path} holds no image")
    tokenizers = {
        attr: _load_tokenizer(path, kind, f"tokenizers/{attr}")
        for attr, kind in manifest.get("stream_tokenizers", {}).items()
    }
    return Experiment(path, manifest, gen, _load_tokenizer(path, manifest.get("tokenizer")), tokenizers)

"""Experiments on disk: everything needed to answer every query later, without the model.

Layout of an experiment folder (no pickle anywhere; loading never executes code from the files)::

    manifest.json          format, version, prompts, tokens, sizes, steps, pipeline identity, stores
    attention.safetensors  "self/<factor>"        (n_images, N, N)            float32
                                                  (n_images, frames, N/F, N/F): AnimateDiff's blocks
                           "temporal/<factor>"    (n_images, h*w, frames, frames) float32, AnimateDiff
                           "cross/<layer>"        (n_images, heads, N, 77)    float32
                           "cross_steps/<layer>"  (steps, n_images, heads, N, T) float32, optional
                           "text_image/<layer>"   (n_images, T, N)            float32, optional
                           "text_text/<layer>"    (n_images, T, T)            float32, optional
    image_<i>.png          the generated images
    tokenizer/             only when the pipeline's tokenizer is not the standard CLIP BPE one
    tokenizers/<attr>/     joint models (SD3, Flux): each text stream's tokenizer, when not standard

Loading trusts nothing in the folder: every size is checked against the tensors' shapes (read from
the safetensors header before any tensor is loaded), every path named by the manifest must lie
inside the folder, images are opened as PNG only, and any damage is an :class:`ExperimentError`
that names the file, what was expected and what was found. ``load_experiment(OUT)`` on the folder
``daami2i generate -o OUT`` wrote opens ``OUT/experiment``.

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
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import ExperimentError, QueryError
from ..heatmaps.frames import FrameLayout
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.resample import cells_of
from ..heatmaps.selfattn import Direction
from ..heatmaps.words import tokenize_prompt
from .store import CrossAttentionStore, Generation, SelfAttentionStore, TemporalStore, predecessor_arguments

FORMAT = "daami2i-experiment"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "attention.safetensors"


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
    images = list(images) if images is not None else list(gen.images)
    if images and len(images) != gen.n_images:
        raise ExperimentError(
            f"images must hold one image per generated image ({gen.n_images}), got {len(images)}: "
            "pass all of them, or images=[] to save none"
        )
    _prepare_folder(path, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    for factor, st in gen.self_attention.items():
        tensors[f"self/{factor}"] = st.sums.detach().float().cpu().contiguous()
    for factor, tt in gen.temporal.items():
        tensors[f"temporal/{factor}"] = tt.sums.detach().float().cpu().contiguous()
    for layer, ct in gen.cross_attention.items():
        tensors[f"cross/{layer}"] = ct.sums.detach().float().cpu().contiguous()
        if ct.per_step:
            tensors[f"cross_steps/{layer}"] = torch.stack(ct.per_step).float().cpu().contiguous()
        for kind, t in (("text_image", ct.text_image), ("text_text", ct.text_text)):
            if t is not None:
                tensors[f"{kind}/{layer}"] = t.detach().float().cpu().contiguous()
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
            "frames": gen.frames.to_dict() if gen.frames is not None else None,
        },
        "self_attention": [
            {"factor": f, "size": list(st.size), "layers": st.layers, "pool": st.pool, "blocks": st.blocks}
            for f, st in gen.self_attention.items()
        ],
        "temporal_attention": [
            {"factor": f, "size": list(tt.size), "layers": tt.layers} for f, tt in gen.temporal.items()
        ],
        "cross_attention": [
            {
                "layer": ct.layer,
                "factor": ct.factor,
                "size": list(ct.size),
                "step_tokens": ct.step_tokens,
                "per_step": bool(ct.per_step),
                "text_queries": [k for k, t in (("image", ct.text_image), ("text", ct.text_text)) if t is not None],
            }
            for ct in gen.cross_attention.values()
        ],
        "images": image_files,
        "nbytes": {k: gen.nbytes(k) for k in ("self", "cross", "cross_steps", "text")},
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
        image_paths: list[Path] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.generation = generation
        self.tokenizer = tokenizer
        self.tokenizers = tokenizers or {}  # joint models: pipeline attribute -> tokenizer of each stream
        if image_paths is None:  # built by hand: the manifest's names, taken as they are
            image_paths = [path / name for name in manifest.get("images", [])]
        self.image_paths = image_paths  # checked by load_experiment: PNG files inside the folder

    @property
    def prompts(self) -> list[str | None]:
        """The prompt of each image."""
        return self.generation.image_prompts

    @property
    def images(self) -> list[Any]:
        """The generated images (PIL), loaded from the folder (PNG only)."""
        from PIL import Image

        out = []
        for file in self.image_paths:
            try:
                with Image.open(file, formats=["PNG"]) as im:
                    im.load()
                    out.append(im.copy())
            except Exception as exc:  # the file changed or broke after loading: still one error family
                raise ExperimentError(f"{file} cannot be read as a PNG image ({_one_line(exc)}); {_FIX}") from exc
        return out

    def compute_global_heat_map(
        self,
        *args: Any,
        prompt: str | None = None,
        factors: Any = None,
        head_idx: int | None = None,
        layer_idx: int | None = None,
        normalize: bool = False,
        image_idx: int = 0,
        direction: Direction | None = None,
        steps: Any = None,
        layers: Any = None,
    ) -> GlobalHeatMap:
        """Same as :meth:`daami2i.Trace.compute_global_heat_map` (the predecessors' positional forms
        too), from the saved stores. Heads and the predecessors' layer index are not saved: query
        ``head_idx`` / ``layer_idx`` on the live trace (``layers=[names]`` works here)."""
        prompt, factors, head_idx, layer_idx, normalize = predecessor_arguments(
            args, prompt=prompt, factors=factors, head_idx=head_idx, layer_idx=layer_idx, normalize=normalize
        )
        if head_idx is not None or layer_idx is not None:
            raise QueryError(
                "head_idx / layer_idx need the live trace (experiments keep word maps per layer, not the "
                "predecessors' layer index or per-head self-attention): query them on trc before saving, or "
                "pick word layers by name with layers=[...]"
            )
        return self.generation.heat_map(
            image_idx,
            tokenizer=self.tokenizer,
            prompt=prompt,
            factors=factors,
            direction=direction or self.generation.config.get("direction", "attended_by"),
            steps=steps,
            tokenizers=self.tokenizers,
            layers=layers,
            normalize=normalize,
        )

    def __repr__(self) -> str:
        g = self.generation
        return f"Experiment({str(self.path)!r}, prompts={g.image_prompts}, image_size={g.image_size})"

    def _repr_png_(self) -> bytes | None:
        """The first image and its word maps as a picture in Jupyter (drawn by :mod:`daami2i.display`)."""
        from ..display import repr_png

        return repr_png(self)


# -- loading: nothing read from the folder is trusted -------------------------------------------------
_FIX = "the folder is damaged or was edited: save the experiment again (Trace.to_experiment or daami2i generate)"
_FIX_PATH = "every file an experiment names must lie inside its folder: remove the entry or copy the file in"
_MAX_MANIFEST_BYTES = 64 * 2**20
_MAX_TOKENIZER_CONFIG_BYTES = 16 * 2**20
_FACTORS = tuple(2**k for k in range(7))  # latent downsampling factors of a store: 1 .. 64
_MAX_LATENT_PER_GRID = 8  # latent side / grid side (a UNet's grid factor, a DiT's patch or packing)
_MAX_IMAGE_PER_LATENT = 32  # image side / latent side (the VAE's downsampling)
_MAX_IMAGE_SIDE = 2**15
_MAX_POOL = 64  # self_pool cell side
_MAX_IMAGE_PIXELS = 2**28
_HALVES = ("cond", "uncond", "both")
_DIRECTIONS = ("attended_by", "attends_to")
_ATTRIBUTE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a pipeline attribute, e.g. "tokenizer_3"
_MISSING = object()
Size = tuple[int, int]


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


class _Checker:
    """Checks the values of one manifest; each error names the file, the field, what was expected,
    what was found, and the fix."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, what: str, expected: str, got: Any = _MISSING, fix: str = _FIX) -> ExperimentError:
        found = "" if got is _MISSING else f", got {_shown(got)}"
        return ExperimentError(f"{self.file}: {what} must be {expected}{found}; {fix}")

    def key(self, obj: dict[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
        if key in obj:
            return obj[key]
        if default is not _MISSING:
            return default
        raise ExperimentError(f"{self.file}: {where} lacks the required key {key!r}; {_FIX}")

    def mapping(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(what, "a JSON object", value)
        return value

    def items(self, value: Any, what: str, length: int | None = None) -> list[Any]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            expected = "a JSON list" if length is None else f"a JSON list of {length} entries (one per image)"
            raise self.error(what, expected, value)
        return value

    def integer(self, value: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
            raise self.error(what, expected, value)
        return value

    def flag(self, value: Any, what: str) -> bool:
        if type(value) is not bool:
            raise self.error(what, "true or false", value)
        return value

    def text(self, value: Any, what: str, choices: tuple[str, ...] | None = None, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = "a string" if choices is None else "one of " + ", ".join(repr(c) for c in choices)
            raise self.error(what, expected + (" or null" if optional else ""), value)
        return value

    def size(self, value: Any, what: str, optional: bool = False) -> Size | None:
        if value is None and optional:
            return None
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int and v >= 1 for v in value)):
            raise self.error(what, "[height, width], two positive integers" + (" (or null)" if optional else ""), value)
        return (value[0], value[1])

    def texts(self, value: Any, what: str, n: int, allow_empty: bool = True) -> list[str | None]:
        if allow_empty and value == []:
            return []
        values = self.items(value, what, n)
        for i, v in enumerate(values):
            self.text(v, f"{what}[{i}]", optional=True)
        return list(values)

    def token_lists(self, value: Any, what: str, n: int, allow_empty: bool = True) -> list[list[str] | None]:
        if allow_empty and value == []:
            return []
        out: list[list[str] | None] = []
        for i, toks in enumerate(self.items(value, what, n)):
            if toks is not None:
                if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                    raise self.error(f"{what}[{i}]", "a list of token strings or null", toks)
                toks = list(toks)
            out.append(toks)
        return out


def _downsample(size: Size, ratio: int) -> Size:
    """``size`` after ``log2(ratio)`` stride-2 steps, each rounding up (as the UNet does)."""
    h, w = size
    while ratio > 1:
        h, w, ratio = (h + 1) // 2, (w + 1) // 2, ratio // 2
    return h, w


def _inside(root: Path, name: Any, what: str, check: _Checker) -> Path:
    """The file ``name`` (relative, from the manifest or the layout) of the folder ``root``, resolved;
    refused when it is absolute, climbs out with '..', or is a link leading outside."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise check.error(what, "a file name inside the experiment folder", name)
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise check.error(what, "a relative path inside the experiment folder (not absolute, no '..')", name, _FIX_PATH)
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise ExperimentError(
            f"{check.file}: {what} {name!r} resolves to {target}, outside the experiment folder {root} "
            f"(a symbolic link?); {_FIX_PATH}"
        )
    return target


def _find_folder(path: Path) -> Path:
    """The experiment folder: ``path`` itself, or ``path/experiment`` (what ``daami2i generate -o``
    wrote), or the folder of ``path`` when it names the manifest."""
    if path.name == MANIFEST and path.is_file():
        return path.parent
    if (path / MANIFEST).exists() or (path / MANIFEST).is_symlink():
        return path
    if (path / "experiment" / MANIFEST).is_file():
        return path / "experiment"
    if not path.exists():
        why = "the folder does not exist"
    elif not path.is_dir():
        why = "it is not a folder"
    else:
        why = "expected a folder written by Trace.to_experiment or by daami2i generate -o OUT (OUT/experiment)"
    raise ExperimentError(f"{path} is not a daami2i experiment: {MANIFEST} is missing ({why})")


def _read_json(file: Path, what: str, limit: int) -> Any:
    if not file.is_file():
        raise ExperimentError(f"{file}: {what} must be a regular file; {_FIX}")
    try:
        size = file.stat().st_size
        if size > limit:
            raise ExperimentError(
                f"{file}: {what} must be at most {limit // 2**20} MiB of JSON, got {size} bytes; {_FIX}"
            )
        raw = file.read_bytes()[: limit + 1]
    except OSError as exc:
        if isinstance(exc, ExperimentError):
            raise
        raise ExperimentError(f"{file} cannot be read ({_one_line(exc)}): check its permissions") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExperimentError(
            f"{file}: {what} must be UTF-8 JSON text, got binary data ({exc.reason}); {_FIX}"
        ) from exc
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ExperimentError(f"{file}: {what} must be valid JSON, got {_one_line(exc)}; {_FIX}") from exc


def _manifest(root: Path) -> tuple[dict[str, Any], _Checker]:
    """The manifest of ``root`` as a JSON object whose format and version this daami2i reads."""
    mpath = root / MANIFEST
    check = _Checker(mpath)
    _inside(root, MANIFEST, "the manifest", check)
    manifest = _read_json(mpath, "the manifest", _MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise ExperimentError(
            f"{mpath} is not a daami2i experiment manifest: expected a JSON object with format "
            f"{FORMAT!r}, got a JSON {type(manifest).__name__}; {_FIX}"
        )
    if manifest.get("format") != FORMAT:
        raise ExperimentError(
            f"{mpath} is not a daami2i experiment manifest: expected format {FORMAT!r}, got "
            f"{_shown(manifest.get('format'))}; open a folder written by Trace.to_experiment"
        )
    if manifest.get("version") != VERSION or type(manifest.get("version")) is not int:
        raise ExperimentError(
            f"{root} uses experiment format version {_shown(manifest.get('version'))}, this daami2i reads version "
            f"{VERSION}: open it with the daami2i that wrote it (manifest 'software'), or save it again"
        )
    for key in ("generation", "self_attention", "cross_attention"):
        check.key(manifest, key, "the manifest")
    for key in ("info", "software", "nbytes", "stream_tokenizers"):
        if key in manifest:
            check.mapping(manifest[key], key)
    for k, v in manifest.get("nbytes", {}).items():
        check.integer(v, f"nbytes.{k}")
    return manifest, check


def _generation(manifest: dict[str, Any], check: _Checker) -> Generation:
    """The generation's fields (without stores), each checked for type and range."""
    g = check.mapping(manifest["generation"], "generation")

    def key(name: str, default: Any = _MISSING) -> Any:
        return check.key(g, name, "generation", default)

    n = check.integer(key("n_images"), "generation.n_images", lo=1)
    prompts = key("prompts")
    if prompts is not None:
        prompts = check.texts(prompts, "generation.prompts", len(prompts) if isinstance(prompts, list) else -1)
    steps = check.items(key("steps_captured"), "generation.steps_captured")
    for i, t in enumerate(steps):
        check.integer(t, f"generation.steps_captured[{i}]")
    if len(set(steps)) != len(steps):
        raise check.error("generation.steps_captured", "distinct step numbers", steps)
    config = check.mapping(key("config", {}), "generation.config")
    if "direction" in config:
        check.text(config["direction"], "generation.config.direction", _DIRECTIONS)
    grid_size = check.size(key("grid_size"), "generation.grid_size")
    frames = None
    if key("frames", None) is not None:
        try:
            frames = FrameLayout.from_dict(key("frames"))
        except QueryError as err:
            raise check.error("generation.frames", "a frame layout (token_frames, rows, source)", str(err)) from None
        if grid_size is not None and frames.token_frames * frames.rows != grid_size[0]:
            raise check.error(
                "generation.frames", f"token frames x rows equal to the grid's {grid_size[0]} rows", key("frames")
            )
    return Generation(
        index=check.integer(key("index"), "generation.index"),
        grid_size=grid_size,  # type: ignore[arg-type]
        frames=frames,
        prompts=prompts,
        latent_size=check.size(key("latent_size"), "generation.latent_size", optional=True),
        image_size=check.size(key("image_size"), "generation.image_size", optional=True),
        n_images=n,
        cfg=check.flag(key("cfg"), "generation.cfg"),
        halves=check.text(key("halves"), "generation.halves", _HALVES),
        steps_run=check.integer(key("steps_run"), "generation.steps_run"),
        steps_captured=list(steps),
        image_prompts=check.texts(key("image_prompts"), "generation.image_prompts", n),
        image_tokens=check.token_lists(key("image_tokens"), "generation.image_tokens", n),
        config=dict(config),
        streams=[
            dict(check.mapping(st, f"generation.streams[{i}]"))
            for i, st in enumerate(check.items(key("streams", []), "generation.streams"))
        ],
    )


def _text_queries(value: Any, where: str, check: _Checker) -> list[str]:
    """A cross entry's kept text-query relations: a list of distinct "image" / "text"."""
    kinds = check.items(value, where)
    if any(k not in ("image", "text") for k in kinds) or len(set(kinds)) != len(kinds):
        raise check.error(where, 'a list of distinct "image" / "text" (the text -> image / text -> text stores)', kinds)
    return list(kinds)


def _entries(manifest: dict[str, Any], check: _Checker) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The self- and cross-attention store entries, checked for type; sizes are checked later, against
    the tensors."""
    selfs, crosses = [], []
    for i, entry in enumerate(check.items(manifest["self_attention"], "self_attention")):
        where = f"self_attention[{i}]"
        entry = check.mapping(entry, where)
        layers = check.items(check.key(entry, "layers", where), f"{where}.layers")
        for j, name in enumerate(layers):
            check.text(name, f"{where}.layers[{j}]")
        selfs.append(
            {
                "factor": check.integer(check.key(entry, "factor", where), f"{where}.factor", lo=1, hi=_FACTORS[-1]),
                "size": check.size(check.key(entry, "size", where), f"{where}.size"),
                "layers": list(layers),
                "pool": check.integer(entry.get("pool", 1), f"{where}.pool", lo=1, hi=_MAX_POOL),
                "blocks": check.flag(entry.get("blocks", False), f"{where}.blocks"),
            }
        )
    for i, entry in enumerate(check.items(manifest["cross_attention"], "cross_attention")):
        where = f"cross_attention[{i}]"
        entry = check.mapping(entry, where)
        per_step = entry.get("per_step")
        crosses.append(
            {
                "layer": check.text(check.key(entry, "layer", where), f"{where}.layer"),
                "factor": check.integer(check.key(entry, "factor", where), f"{where}.factor", lo=1, hi=_FACTORS[-1]),
                "size": check.size(check.key(entry, "size", where), f"{where}.size"),
                "step_tokens": check.integer(entry.get("step_tokens", 0), f"{where}.step_tokens"),
                "per_step": None if per_step is None else check.flag(per_step, f"{where}.per_step"),
                "text_queries": _text_queries(entry.get("text_queries", []), f"{where}.text_queries", check),
            }
        )
    for kind, entries, name in (("self", selfs, "factor"), ("cross", crosses, "layer")):
        for e in entries:
            if name == "factor" and e["factor"] not in _FACTORS:
                raise check.error(f"{kind}_attention factor", "a power of two from 1 to 64", e["factor"])
        seen = [e[name] for e in entries]
        if len(set(seen)) != len(seen):
            raise check.error(f"the {name}s of {kind}_attention", "distinct", seen)
    if not selfs and not crosses:
        raise check.error("self_attention and cross_attention", "lists with at least one captured store", [])
    return selfs, crosses


def _check_sizes(gen: Generation, stores: list[tuple[str, int, Size]], check: _Checker) -> None:
    """The grid, latent and image sizes must follow from the stores' sizes (which match the tensors):
    each store is the grid downsampled by its factor over the grid's factor."""
    fmin = min(f for _, f, _ in stores)
    grid = gen.grid_size
    if not any(
        all(f % g == 0 and _downsample(grid, f // g) == size for _, f, size in stores) for g in _FACTORS if g <= fmin
    ):
        held = ", ".join(f"{name} {s[0]}x{s[1]} at factor {f}" for name, f, s in stores[:3])
        more = f" and {len(stores) - 3} more" if len(stores) > 3 else ""
        raise ExperimentError(
            f"{check.file}: generation.grid_size and the store sizes must agree (each store is the grid "
            f"downsampled by its factor), got grid_size {list(grid)} with {held}{more}; {_FIX}"
        )
    lat = gen.latent_size
    if lat is not None and not all(g <= v <= g * _MAX_LATENT_PER_GRID for v, g in zip(lat, grid, strict=True)):
        raise check.error(
            "generation.latent_size",
            f"between the grid {grid[0]}x{grid[1]} and {_MAX_LATENT_PER_GRID} times it, per side",
            list(lat),
        )
    img = gen.image_size
    if img is not None:
        base = lat or grid
        top = _MAX_IMAGE_PER_LATENT * (1 if lat else _MAX_LATENT_PER_GRID)
        if (
            not all(b <= v <= min(b * top, _MAX_IMAGE_SIDE) for v, b in zip(img, base, strict=True))
            or img[0] * img[1] > _MAX_IMAGE_PIXELS
        ):
            name = "latent" if lat else "grid"
            raise check.error(
                "generation.image_size",
                f"between the {name} {base[0]}x{base[1]} and {top} times it per side (at most "
                f"{_MAX_IMAGE_SIDE} pixels a side)",
                list(img),
            )


def _check_streams(gen: Generation, n_text: int | None, check: _Checker) -> None:
    """Joint models' text streams: names, tokenizer attributes, rows within the stored text keys."""
    for i, st in enumerate(gen.streams):
        where = f"generation.streams[{i}]"
        check.mapping(st, where)
        check.text(check.key(st, "name", where), f"{where}.name")
        attr = check.text(check.key(st, "tokenizer", where), f"{where}.tokenizer")
        if not _ATTRIBUTE.fullmatch(attr):
            raise check.error(f"{where}.tokenizer", "a pipeline attribute name such as 'tokenizer_3'", attr)
        first = check.integer(check.key(st, "first_row", where), f"{where}.first_row", hi=n_text)
        stop = check.integer(check.key(st, "stop_row", where), f"{where}.stop_row", lo=first, hi=n_text)
        st["first_row"], st["stop_row"] = first, stop
        st["tokens"] = check.token_lists(check.key(st, "tokens", where), f"{where}.tokens", gen.n_images, False)
        if st.get("prompts") is not None:
            st["prompts"] = check.texts(st["prompts"], f"{where}.prompts", gen.n_images)


def _temporal_entries(manifest: dict[str, Any], gen: Generation, check: _Checker) -> list[dict[str, Any]]:
    """The manifest's temporal stores (AnimateDiff's motion modules), each checked; none for older files."""
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(check.items(manifest.get("temporal_attention", []), "temporal_attention")):
        where = f"temporal_attention[{i}]"
        entry = check.mapping(entry, where)
        layers = check.items(check.key(entry, "layers", where), f"{where}.layers")
        for j, name in enumerate(layers):
            check.text(name, f"{where}.layers[{j}]")
        size = check.size(check.key(entry, "size", where), f"{where}.size")
        frames = gen.frames.token_frames if gen.frames is not None else 1
        if size is None or size[0] > gen.grid_size[0] // frames or size[1] > gen.grid_size[1]:
            raise check.error(f"{where}.size", f"at most one frame of the grid {list(gen.grid_size)}", size)
        factor = check.integer(check.key(entry, "factor", where), f"{where}.factor", lo=1, hi=_FACTORS[-1])
        if factor not in _FACTORS or factor in [e["factor"] for e in out]:
            raise check.error(f"{where}.factor", "a distinct power of two from 1 to 64", factor)
        out.append({"factor": factor, "size": size, "layers": list(layers)})
    return out


def _tensor_header(
    root: Path,
    gen: Generation,
    selfs: list[dict[str, Any]],
    crosses: list[dict[str, Any]],
    check: _Checker,
    temporals: list[dict[str, Any]] | None = None,
) -> tuple[Any, list[str]]:
    """The open safetensors file and the names of the tensors to read, each checked (dtype, shape)
    in the header against the manifest, and the manifest's sizes against them; nothing is read yet."""
    temporals = temporals or []
    from safetensors import safe_open

    tpath = root / TENSORS
    _inside(root, TENSORS, "the attention tensors file", check)
    if not tpath.is_file():
        why = "is missing" if not tpath.exists() else "is not a regular file"
        raise ExperimentError(f"{tpath} {why}: an experiment keeps its attention maps there; {_FIX}")
    try:
        handle = safe_open(str(tpath), framework="pt")
        header = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()}
        meta = handle.metadata() or {}
    except Exception as exc:  # SafetensorError and friends: truncated, garbage, not safetensors
        raise ExperimentError(f"{tpath} is not a readable safetensors file ({_one_line(exc)}); {_FIX}") from exc
    if meta.get("format", FORMAT) != FORMAT:
        raise ExperimentError(f"{tpath}: metadata format must be {FORMAT!r}, got {_shown(meta.get('format'))}; {_FIX}")
    n, n_steps = gen.n_images, len(gen.steps_captured)

    def shape_of(key: str, rank: int) -> tuple[int, ...]:
        if key not in header:
            held = _shown(sorted(header), 120)
            raise ExperimentError(f"{tpath} lacks the tensor {key!r} that {MANIFEST} lists (it holds {held}); {_FIX}")
        shape, dtype = header[key]
        if dtype != "F32":
            raise ExperimentError(f"{tpath}: tensor {key!r} must be float32 (F32), got {dtype}; {_FIX}")
        if len(shape) != rank:
            raise ExperimentError(
                f"{tpath}: tensor {key!r} must have {rank} dimensions, got shape {list(shape)}; {_FIX}"
            )
        return shape

    def expect(key: str, shape: tuple[int, ...], want: tuple[int, ...], why: str) -> None:
        if shape != want:
            raise ExperimentError(
                f"{tpath}: tensor {key!r} must have shape {list(want)} ({why} in {MANIFEST}), got {list(shape)}; {_FIX}"
            )

    frames = gen.frames.token_frames if gen.frames is not None else 1
    for e in selfs:
        key, (h, w) = f"self/{e['factor']}", e["size"]
        if e["blocks"]:  # one block per frame (AnimateDiff)
            if gen.frames is None or h % frames or e["pool"] > 1:
                raise check.error(f"self_attention blocks of factor {e['factor']}", "a video's unpooled frames", e)
            per = h // frames * w
            expect(key, shape_of(key, 4), (n, frames, per, per), f"n_images {n}, {frames} frames of {h // frames}x{w}")
            continue
        shape = shape_of(key, 3)
        expect(key, shape, (n, h * w, h * w), f"n_images {n}, size {h}x{w}")
    for e in temporals:
        key, (h, w) = f"temporal/{e['factor']}", e["size"]
        if gen.frames is None:
            raise check.error("temporal_attention", "a video generation's (generation.frames)", e)
        expect(key, shape_of(key, 4), (n, h * w, frames, frames), f"n_images {n}, size {h}x{w}, {frames} frames")
    n_text, text_key = None, ""
    for e in crosses:
        key, (h, w) = f"cross/{e['layer']}", e["size"]
        shape = shape_of(key, 4)
        heads, tokens = shape[1], shape[3]
        expect(key, shape, (n, max(heads, 1), h * w, max(tokens, 1)), f"n_images {n}, heads >= 1, size {h}x{w}")
        if n_text is not None and tokens != n_text:
            raise ExperimentError(
                f"{tpath}: tensor {key!r} must have as many text tokens as {text_key!r} ({n_text}), "
                f"got {tokens}; {_FIX}"
            )
        n_text, text_key = tokens, key
        skey = f"cross_steps/{e['layer']}"
        if e["per_step"] is False and skey in header:
            raise ExperimentError(f"{tpath} holds {skey!r}, but {MANIFEST} says per_step is false; {_FIX}")
        e["has_steps"] = e["per_step"] or (e["per_step"] is None and skey in header)
        if e["has_steps"]:
            sshape = shape_of(skey, 5)
            step_tokens = e["step_tokens"] if e["per_step"] else sshape[4]
            if not 1 <= step_tokens <= tokens:
                raise check.error(f"cross_attention step_tokens of {e['layer']!r}", f"in [1, {tokens}]", step_tokens)
            e["step_tokens"] = step_tokens
            expect(skey, sshape, (n_steps, n, heads, h * w, step_tokens), f"{n_steps} captured steps, as {key}")
        for kind in ("image", "text"):
            tkey = f"text_{kind}/{e['layer']}"
            if kind not in e["text_queries"]:
                if tkey in header:
                    raise ExperimentError(f"{tpath} holds {tkey!r}, but {MANIFEST} does not list it; {_FIX}")
                continue
            want = (n, tokens, h * w) if kind == "image" else (n, tokens, tokens)
            expect(tkey, shape_of(tkey, 3), want, f"n_images {n}, the {tokens} text tokens of {key}")
    for e in selfs:  # a pooled store holds the cells of the grid: checked against the grid as if it were it
        if e["pool"] > 1:
            frames = gen.frames.token_frames if gen.frames is not None else 1
            cells = cells_of(gen.grid_size, frames, e["pool"])
            if tuple(e["size"]) != cells:
                raise check.error(
                    f"self_attention size of pool {e['pool']}",
                    f"the {frames}-frame grid {gen.grid_size[0]}x{gen.grid_size[1]} in cells: {list(cells)}",
                    list(e["size"]),
                )
    stores = [(f"self/{e['factor']}", e["factor"], gen.grid_size if e["pool"] > 1 else e["size"]) for e in selfs]
    stores += [(f"cross/{e['layer']}", e["factor"], e["size"]) for e in crosses]
    _check_sizes(gen, stores, check)
    _check_streams(gen, n_text, check)
    wanted = [f"self/{e['factor']}" for e in selfs] + [f"cross/{e['layer']}" for e in crosses]
    wanted += [f"temporal/{e['factor']}" for e in temporals]
    wanted += [f"cross_steps/{e['layer']}" for e in crosses if e["has_steps"]]
    wanted += [f"text_{kind}/{e['layer']}" for e in crosses for kind in e["text_queries"]]
    return handle, wanted


def _read_tensors(root: Path, handle: Any, wanted: list[str]) -> dict[str, torch.Tensor]:
    """The checked tensors, read; non-finite values are damage too."""
    tpath = root / TENSORS
    tensors = {}
    for key in wanted:  # every size is now known to match the file: loading allocates what it holds
        try:
            t = handle.get_tensor(key)
        except Exception as exc:
            raise ExperimentError(f"{tpath}: tensor {key!r} cannot be read ({_one_line(exc)}); {_FIX}") from exc
        if not bool(torch.isfinite(t).all()):
            raise ExperimentError(f"{tpath}: tensor {key!r} must hold finite numbers, got NaN or infinity; {_FIX}")
        tensors[key] = t
    return tensors


def _images(root: Path, manifest: dict[str, Any], n_images: int, check: _Checker) -> list[Path]:
    """The image files: inside the folder, present, and complete PNGs; none, or one per image."""
    from PIL import Image

    names = check.items(manifest.get("images", []), "images")
    if names and len(names) != n_images:
        raise check.error("images", f"a list of {n_images} file names (one per image) or empty", names)
    files = []
    for i, name in enumerate(names):
        file = _inside(root, name, f"images[{i}]", check)
        if not file.is_file():
            raise ExperimentError(f"{file} is missing or not a file (images[{i}] of {MANIFEST}); {_FIX}")
        try:
            with Image.open(file, formats=["PNG"]) as im:
                im.verify()  # reads every chunk and its checksum: finds truncation and garbage
        except Exception as exc:
            raise ExperimentError(f"{file} must be a complete PNG image, got {_one_line(exc)}; {_FIX}") from exc
        files.append(file)
    return files


def _tokenizer_folder(root: Path, name: str, check: _Checker) -> Path:
    """A saved tokenizer's folder: inside the experiment, plain files only (no links leading out), and a
    config that neither asks for remote code nor points at files of its own choosing."""
    folder = _inside(root, name, "the tokenizer folder", check)
    if not folder.is_dir():
        raise ExperimentError(f"{root / name} is missing: {MANIFEST} says the tokenizer was saved there; {_FIX}")
    for base, dirs, files in os.walk(folder, followlinks=False):
        for entry in dirs + files:
            rel = str((Path(base) / entry).relative_to(root))
            path = _inside(root, rel, "a tokenizer file", check)
            if not (path.is_file() or path.is_dir()):
                raise ExperimentError(f"{root / rel} must be a regular file or folder; {_FIX}")
    config_file = folder / "tokenizer_config.json"
    if config_file.exists():
        config = _read_json(config_file, "the tokenizer config", _MAX_TOKENIZER_CONFIG_BYTES)
        if not isinstance(config, dict):
            raise ExperimentError(f"{config_file} must be a JSON object, got a JSON {type(config).__name__}; {_FIX}")
        if "auto_map" in config:
            raise ExperimentError(
                f"{config_file} asks for remote tokenizer code (auto_map), which loading never runs; {_FIX}"
            )
        named = [k for k, v in config.items() if k.endswith(("_file", "_files")) and v is not None]
        if named:
            raise ExperimentError(
                f"{config_file} must not name its own files, got {named}: save_pretrained never writes them; {_FIX}"
            )
    return folder


def _load_tokenizer(root: Path, kind: str | None, folder: Path | None) -> Any:
    if kind is None:
        return None
    if kind == "clip-bpe-49408":
        from ..testing import clip_tokenizer

        return clip_tokenizer()
    assert kind == "saved" and folder is not None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # damaged files: json, sentencepiece, tokenizers errors of every kind
        raise ExperimentError(f"{folder}: the saved tokenizer cannot be loaded ({_one_line(exc)}); {_FIX}") from exc


def _check_tokenizer(
    tokenizer: Any, folder: Path, prompts: list[str | None], tokens: list[list[str] | None], lower: bool
) -> None:
    """A saved tokenizer must split the saved prompts into the saved tokens: a damaged folder can
    load without error yet hold a different (or empty) vocabulary."""
    for i, (prompt, toks) in enumerate(zip(prompts, tokens, strict=False)):
        if prompt is None or toks is None:
            continue
        try:
            got = tokenize_prompt(tokenizer, prompt.lower() if lower else prompt)
        except Exception as exc:
            raise ExperimentError(
                f"{folder}: the saved tokenizer cannot split prompts ({_one_line(exc)}); {_FIX}"
            ) from exc
        if list(got) != list(toks):
            raise ExperimentError(
                f"{folder}: the saved tokenizer must split image {i}'s prompt {_shown(prompt, 40)} into the saved "
                f"tokens {_shown(toks, 60)}, got {_shown(got, 60)}; {_FIX}"
            )


def _tokenizers(
    root: Path, gen: Generation, kinds: dict[str, tuple[str | None, Path | None]]
) -> tuple[Any, dict[str, Any]]:
    """The pipeline's tokenizer and each stream's, loaded; saved ones checked against the saved tokens."""
    loaded = {attr: _load_tokenizer(root, kind, folder) for attr, (kind, folder) in kinds.items()}
    main_kind, main_folder = kinds[""]
    if main_kind == "saved" and main_folder is not None and not gen.streams:
        _check_tokenizer(loaded[""], main_folder, gen.image_prompts, gen.image_tokens, lower=True)
    for st in gen.streams:
        kind, folder = kinds.get(st["tokenizer"], (None, None))
        if kind == "saved" and folder is not None and st.get("prompts"):
            _check_tokenizer(loaded[st["tokenizer"]], folder, st["prompts"], st["tokens"], lower=st["name"] == "clip")
    main = loaded.pop("")
    return main, loaded


def _tokenizer_kinds(
    root: Path, manifest: dict[str, Any], check: _Checker
) -> dict[str, tuple[str | None, Path | None]]:
    """'' (the pipeline's tokenizer) and each stream's attribute -> (kind, checked folder)."""
    kinds = ("clip-bpe-49408", "saved")
    out: dict[str, tuple[str | None, Path | None]] = {}
    kind = check.text(manifest.get("tokenizer"), "tokenizer", kinds, optional=True)
    out[""] = (kind, _tokenizer_folder(root, "tokenizer", check) if kind == "saved" else None)
    for attr, kind in manifest.get("stream_tokenizers", {}).items():
        if not _ATTRIBUTE.fullmatch(attr):
            raise check.error(
                "stream_tokenizers keys", "pipeline attribute names such as 'tokenizer_3'", attr, _FIX_PATH
            )
        kind = check.text(kind, f"stream_tokenizers.{attr}", kinds, optional=True)
        out[attr] = (kind, _tokenizer_folder(root, f"tokenizers/{attr}", check) if kind == "saved" else None)
    return out


def _nbytes(manifest: dict[str, Any], gen: Generation) -> None:
    """The manifest's store sizes, recomputed from the tensors (``info`` prints them)."""
    manifest["nbytes"] = {k: gen.nbytes(k) for k in ("self", "cross", "cross_steps", "text")}


def load_experiment(path: str | Path) -> Experiment:
    """Open an experiment folder written by :meth:`daami2i.Trace.to_experiment` (or the folder
    ``daami2i generate -o OUT`` wrote, whose experiment is ``OUT/experiment``).

    Raises :class:`ExperimentError` (a :class:`daami2i.Daami2iError`) for a missing, damaged,
    inconsistent or unsafe folder, before anything large is allocated; never unpickles or runs code."""
    folder = _find_folder(Path(path))
    root = folder.resolve()
    manifest, check = _manifest(root)
    gen = _generation(manifest, check)
    selfs, crosses = _entries(manifest, check)
    image_files = _images(root, manifest, gen.n_images, check)
    kinds = _tokenizer_kinds(root, manifest, check)
    temporals = _temporal_entries(manifest, gen, check)
    handle, wanted = _tensor_header(root, gen, selfs, crosses, check, temporals)
    tokenizer, tokenizers = _tokenizers(root, gen, kinds)
    tensors = _read_tensors(root, handle, wanted)
    for e in selfs:
        f = e["factor"]
        pool, frames = e["pool"], gen.frames.token_frames if gen.frames is not None else 1
        gen.self_attention[f] = SelfAttentionStore(
            f,
            e["size"],
            tensors[f"self/{f}"],
            e["layers"],
            pool=pool,
            frames=frames if pool > 1 or e["blocks"] else 1,
            tokens=gen.grid_size if pool > 1 else None,
            blocks=e["blocks"],
        )
    for e in temporals:
        f = e["factor"]
        gen.temporal[f] = TemporalStore(f, e["size"], tensors[f"temporal/{f}"], e["layers"])
    for e in crosses:
        layer = e["layer"]
        steps = tensors.get(f"cross_steps/{layer}")
        gen.cross_attention[layer] = CrossAttentionStore(
            layer,
            e["factor"],
            e["size"],
            tensors[f"cross/{layer}"],
            per_step=list(steps.unbind(0)) if steps is not None else None,
            step_tokens=e["step_tokens"],
            text_image=tensors.get(f"text_image/{layer}"),
            text_text=tensors.get(f"text_text/{layer}"),
        )
    _nbytes(manifest, gen)
    return Experiment(folder, manifest, gen, tokenizer, tokenizers, image_files)

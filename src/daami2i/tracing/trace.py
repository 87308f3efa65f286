"""``daami2i.trace``: the context manager that captures attention while a pipeline generates."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import logging
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError, QueryError, TraceError
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.resample import cells_of
from ..heatmaps.selfattn import Direction, check_direction
from ..heatmaps.words import TokenStream, locate_tokens, tokenize_prompt, truncation_note
from ..storage.recorder import Recorder
from ..storage.store import Generation, predecessor_arguments
from .capture import (
    CaptureHub,
    CapturingProcessor,
    JointCapturingProcessor,
    acquire_attention_patches,
    release_attention_patches,
)
from .families import AttentionSite, DenoiserCall, FamilyAdapter, PassTracker, Stream, adapter_for

Halves = Literal["cond", "uncond", "both"]
FactorSpec = str | Iterable[int] | None

_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # denoisers currently traced


def _warn_user(message: str) -> None:
    """A UserWarning attributed to the caller's line (the pipeline call), not to a torch hook."""
    import sys
    import types

    skip = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(skip) or "/diffusers/" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)


class _TruncationNotices(logging.Filter):
    """Drops diffusers' and transformers' own "the prompt was truncated" notices while a trace captures
    word maps: daami2i's one warning says the same, and which words were lost."""

    NOTICES = ("The following part of your input was truncated", "Token indices sequence length is longer")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def _library_loggers() -> list[logging.Logger]:
    """diffusers' and transformers' loggers (a record is filtered by the logger that emits it)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("diffusers", "transformers")]
    return [logging.getLogger(n) for n in names]


MAX_STEP_LIST = 100_000  # far more steps than any sampler runs; beyond it, a callable says it better


def _steps_text(steps: list[int] | None) -> str:
    """A short form of a step list: ``[3, 4, 5, 9]`` -> ``3-5, 9``."""
    if steps is None:
        return "a callable"
    runs: list[list[int]] = []
    for t in sorted(set(steps)):
        if runs and t == runs[-1][-1] + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return "[" + (", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")) + "]"


RELATIONS = ("image->text", "image->image", "text->image", "text->text")


def _check_relations(relations: Iterable[str] | None) -> set[str]:
    """The relations asked for (default: image->text and image->image), each one of :data:`RELATIONS`."""
    if relations is None:
        return {"image->text", "image->image"}
    got = [relations] if isinstance(relations, str) else list(relations)
    bad = [r for r in got if r not in RELATIONS]
    if bad or not got:
        raise ConfigError(
            f"relations must be a non-empty list of {list(RELATIONS)} (query->key: image->text is the word maps, "
            f"image->image self-attention, text->image where a word's query looks, text->text among the "
            f"prompt's tokens); got {relations!r}"
        )
    return set(got)


def _check_steps(steps: Any) -> list[int]:
    """``steps`` as a list of non-negative step indices, or a ConfigError saying what was wrong."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ConfigError(
            f"steps must be None, a callable step -> bool, or an iterable of 0-based step indices "
            f"(e.g. range(10, 20)), got {steps!r}"
        )
    if isinstance(steps, range) and len(steps) > MAX_STEP_LIST:
        raise ConfigError(
            f"steps={steps} lists {len(steps)} step indices; pass at most {MAX_STEP_LIST}, or a callable such as "
            f"steps=lambda t: t >= {steps.start} (None captures every step)"
        )
    out = list(itertools.islice(steps, MAX_STEP_LIST + 1))
    if len(out) > MAX_STEP_LIST:
        raise ConfigError(
            f"steps lists more than {MAX_STEP_LIST} step indices; pass fewer, or a callable step -> bool "
            "(None captures every step)"
        )
    bad = [t for t in out if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 0]
    if bad:
        raise ConfigError(
            f"steps must be non-negative integer step indices (0 is the first denoising step), got {bad[:5]} "
            f"in {out[:10]}{' ...' if len(out) > 10 else ''}"
        )
    if not out:
        raise ConfigError("steps is empty: nothing would be captured; pass None to capture every step")
    return [int(t) for t in out]


def denoiser_of(pipe: Any) -> tuple[Any, FamilyAdapter]:
    """The pipeline's denoiser and the adapter of its model family (see :mod:`.families`)."""
    return adapter_for(pipe)


_AUTO_POOL_BYTES = 512 * 2**20  # self_pool="auto": a video's self-attention store fits this


class Trace:
    """Capture self- and cross-attention of a Stable Diffusion pipeline while it generates.

    >>> from daami2i.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with trace(pipe) as trc:
    ...     image = pipe("a red cat", num_inference_steps=2, height=64, width=64).images[0]
    ...     ghm = trc.compute_global_heat_map()
    >>> ghm.compute_word_heat_map("cat").expand_as(image).shape
    torch.Size([64, 64])

    SD3 and Flux (MMDiT, joint attention) are traced the same way: word maps come from the image-query
    rows of the joint softmax restricted to the text keys, self-attention maps from the same rows
    restricted to the image keys (see :mod:`daami2i.tracing.families.mmdit`). Their layers all work on one grid
    of image tokens, so factors do not apply; pick layers by name (``cross_layers=[...]``, see
    :attr:`attention_layers`).

    Args:
        pipe: a diffusers pipeline with a ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, img2img, inpaint)
            or an SD3 / Flux transformer (StableDiffusion3Pipeline, FluxPipeline, their img2img).
        self_attention / cross_attention: capture each kind at all (both on by default).
        self_factors: resolutions of self-attention to capture, as latent downsampling factors:
            ``"highest"`` (default, like daam-i2i: the highest self-attention resolution only),
            ``"all"``, or an iterable such as ``(1, 2)``.
        cross_factors: ``"daam"`` (default: down and up blocks, every factor except 8, like DAAM),
            ``"all"`` (mid block too), or an iterable of factors.
        self_layers / cross_layers: explicit layer names (see :attr:`attention_layers`) to capture
            instead of the factor rule.
        steps: denoising step indices (0-based) to capture; ``None`` captures all.
        halves: which half of the classifier-free-guidance batch to keep: ``"cond"`` (default),
            ``"uncond"`` or ``"both"`` (their mean, as daam-i2i does). Without guidance there is
            only one half and ``"cond"``/``"both"`` use it.
        direction: default pixel-map direction, ``"attended_by"`` (the seed's column: how much every
            pixel attends to the region) or ``"attends_to"`` (where the region looks).
        chunk_mb: upper bound, in MiB, of one chunk of recomputed attention probabilities.
        store_device: where stores live (default: the device of the UNet).
        keep: ``"last"`` (default) frees the previous generation's maps when the pipeline is
            called again inside the same trace; ``"all"`` keeps every generation (see
            ``compute_global_heat_map(generation=...)``).
        cross_steps: also keep cross-attention per step (only the prompt's token rows), so word
            maps can later be computed for any range of steps. Self-attention is not kept per step
            (64 MiB per step at 512 px); choose its steps before the run with ``steps``.
        max_store_mb: refuse a generation whose stores would exceed this many MiB; the check runs
            at the first UNet call, before any denoising, and the error gives the size needed.
        keep_heads: also keep self-attention per layer and head (UNets), so that
            ``compute_global_heat_map(head_idx=..., layer_idx=...)`` can select daam-i2i's entries;
            one (N x N) map per layer and kept head, so it multiplies the self-attention store.
        relations: which query->key relations to keep (default ``["image->text", "image->image"]``:
            word maps and self-attention). Joint-attention models (SD3, Flux, Chroma, Flux.2, Qwen-Image,
            Z-Image, Lumina 2) also have ``"text->image"`` (where a word's query looks in the image,
            :meth:`GlobalHeatMap.compute_text_query_heat_map`) and ``"text->text"`` (among the prompt's
            tokens, :meth:`GlobalHeatMap.text_to_text`), one (tokens x N) / (tokens x tokens) head-mean
            sum per joint layer; chosen before the run, so nothing unrequested is stored.
        self_pool: keep self-attention per ``p`` x ``p`` cell of each frame instead of per token: the
            store shrinks by ``p**4`` and holds the exact cell means of the full-resolution sum (queries of
            whole cells are exact cell means; see :mod:`daami2i.heatmaps.selfattn`). ``"auto"``
            (default) pools videos only, with the smallest ``p`` whose store fits 512 MiB per video
            (Wan 2.1 at 480x832, 81 frames: ``p = 2``, 256 MiB); images are never pooled unless asked.
            Single-resolution (transformer) models only; not with ``keep_heads``, and not AnimateDiff,
            whose frames never attend to each other (one block per frame is kept).
        low_memory, load_heads, save_heads, data_dir, track_all: daam-i2i's positional options.
            ``low_memory`` captures the first transformer of each UNet block only and
            ``track_all=True`` every resolution (``self_factors="all"``). ``load_heads`` /
            ``save_heads`` (pickled dumps of every call) are refused: use :meth:`to_experiment`.
            ``data_dir`` is ignored, with a warning.
    """

    def __init__(
        self,
        pipe: Any,
        low_memory: bool = False,
        load_heads: bool = False,
        save_heads: bool = False,
        data_dir: str | Path | None = None,
        track_all: bool = False,
        *,
        self_attention: bool = True,
        cross_attention: bool = True,
        self_factors: FactorSpec = "highest",
        cross_factors: FactorSpec = "daam",
        self_layers: Iterable[str] | None = None,
        cross_layers: Iterable[str] | None = None,
        steps: Iterable[int] | Callable[[int], bool] | None = None,
        halves: Halves = "cond",
        direction: Direction = "attended_by",
        chunk_mb: float = 64.0,
        store_device: torch.device | str | None = None,
        keep: Literal["last", "all"] = "last",
        cross_steps: bool = False,
        max_store_mb: float | None = None,
        keep_heads: bool = False,
        relations: Iterable[str] | None = None,
        self_pool: int | Literal["auto"] = "auto",
    ) -> None:
        self.pipe = pipe
        if load_heads or save_heads:
            raise ConfigError(
                "load_heads / save_heads (daam-i2i's pickled attention dumps of every call, ~335 MB each) are not "
                "supported: save a generation with trc.to_experiment(path) (safetensors + JSON) and reopen it with "
                "daami2i.load_experiment(path); keep_heads=True keeps self-attention per layer and head"
            )
        if data_dir is not None:
            _warn_user(
                f"data_dir={str(data_dir)!r} is ignored: daam-i2i kept its load_heads / save_heads dumps there, which "
                "daami2i replaces by trc.to_experiment(path)"
            )
        if track_all:  # daam-i2i: every located self-attention layer, at every resolution
            if self_factors not in ("highest", "all"):
                raise ConfigError(
                    f"track_all=True captures every resolution; it contradicts self_factors={self_factors!r}"
                )
            self_factors = "all"
        self.low_memory = bool(low_memory)
        self.keep_heads = bool(keep_heads)
        self.time_idx = 0  # daam-i2i / DAAM: counts time_callback calls
        self.unet, self.adapter = adapter_for(pipe)
        if not callable(getattr(pipe, self.adapter.prompt_method, None)):
            raise ConfigError(
                f"{type(pipe).__name__} has no {self.adapter.prompt_method} method: daami2i cannot see its prompts"
            )
        if halves not in ("cond", "uncond", "both"):
            raise ConfigError(f"halves must be 'cond', 'uncond' or 'both', got {halves!r}")
        self.halves: Halves = halves
        self.direction = check_direction(direction)
        if not chunk_mb > 0:
            raise ConfigError(f"chunk_mb must be positive, got {chunk_mb!r}")
        self.chunk_bytes = int(chunk_mb * 2**20)
        self._scratch: torch.Tensor | None = None  # reused buffer for attention probabilities
        self.store_device = store_device
        if keep not in ("last", "all"):
            raise ConfigError(f"keep must be 'last' or 'all', got {keep!r}")
        self.keep = keep
        self.cross_steps = bool(cross_steps)
        if steps is not None and not callable(steps):
            steps = _check_steps(steps)
        if max_store_mb is not None and not max_store_mb > 0:
            raise ConfigError(f"max_store_mb must be positive or None, got {max_store_mb!r}")
        self.max_store_mb = max_store_mb
        self.sites = self.adapter.find_sites(self.unet)
        # further denoisers taking over some steps (Wan 2.2's transformer_2): their layers are prefixed
        self._denoisers = [self.unet] + [m for _, m in self.adapter.extra_denoisers(pipe, self.unet)]
        for attr, module in self.adapter.extra_denoisers(pipe, self.unet):
            self.sites += [dataclasses.replace(s, name=f"{attr}.{s.name}") for s in self.adapter.find_sites(module)]
        if not self.adapter.predecessor_layers and (self.low_memory or self.keep_heads):
            raise ConfigError(
                "low_memory and keep_heads are daam-i2i's UNet options; for SD3 / Flux pick layers with "
                "self_layers=[...] / cross_layers=[...] (see trc.attention_layers)"
            )
        wanted = _check_relations(relations)
        if relations is not None:  # relations name what is kept; self_attention / cross_attention follow
            self_attention = self_attention and "image->image" in wanted
            cross_attention = cross_attention and bool(wanted - {"image->image"})
        self_sites = [s for s in self.sites if s.kind in ("self", "joint")]
        if not self_sites:
            raise ConfigError(f"{type(self.unet).__name__} has no attention layers to trace")
        self.grid_factor = min(s.factor for s in self_sites)
        self_selected = self._select("self", self_factors, self_layers) if self_attention else []
        self._cross_sites = self._select("cross", cross_factors, cross_layers) if cross_attention else []
        # temporal self-attention (AnimateDiff's motion modules: each pixel across frames) is part of
        # "image->image", at every resolution (one F x F matrix per pixel: small)
        self._temporal_sites = [s for s in self.sites if s.kind == "temporal"] if self_attention else []
        self._self_names = {s.name for s in self_selected}
        self._cross_names = {s.name for s in self._cross_sites}
        # one entry per layer (a joint layer can serve both kinds)
        self.selected = list({s.name: s for s in self_selected + self._cross_sites + self._temporal_sites}.values())
        if not self.selected:
            raise ConfigError("nothing to capture: both self_attention and cross_attention are off")
        self.text_relations = frozenset(wanted & {"text->image", "text->text"})
        if self.text_relations and not any(s.kind == "joint" for s in self._cross_sites):
            raise ConfigError(
                f"relations {sorted(self.text_relations)} need text tokens that are queries, which only joint "
                f"attention has (SD3, Flux, Chroma, Flux.2, Qwen-Image, Z-Image, Lumina 2, HiDream); the "
                f"{type(self.unet).__name__}'s text tokens are keys only (cross-attention): its relations are "
                "'image->text' and 'image->image'"
            )
        self._self_factors = sorted({s.factor for s in self_selected})
        bad_pool = isinstance(self_pool, bool) or not isinstance(self_pool, int) or self_pool < 1
        if self_pool != "auto" and bad_pool:
            raise ConfigError(
                f"self_pool must be 'auto' or a positive integer (cell side in tokens), got {self_pool!r}"
            )
        if self_pool not in ("auto", 1) and self.adapter.frame_batch:
            raise ConfigError(
                f"self_pool={self_pool}: {self.adapter.name}'s frames never attend to each other, so its "
                "self-attention is kept as one block per frame, which is not pooled"
            )
        if self_pool not in ("auto", 1) and (self.keep_heads or self._self_factors not in ([], [1])):
            raise ConfigError(
                f"self_pool={self_pool} pools the single self-attention grid of transformer models; "
                + (
                    "it does not combine with keep_heads"
                    if self.keep_heads
                    else f"this model's self-attention has several resolutions (factors {self._self_factors})"
                )
            )
        self.self_pool = self_pool
        self.config: dict[str, Any] = {  # recorded with each generation (experiment manifests)
            "self_layers": [s.name for s in self_selected],
            "cross_layers": [s.name for s in self._cross_sites],
            "halves": halves,
            "direction": direction,
            "steps": None if steps is None or callable(steps) else sorted(int(t) for t in steps),
            "cross_steps": self.cross_steps,
            "keep_heads": self.keep_heads,
            "self_pool": self_pool,
            "relations": sorted(
                ({"image->image"} if self_selected else set())
                | ({"image->text"} if self._cross_sites else set())
                | self.text_relations
            ),
        }
        if callable(steps):
            self._step_ok: Callable[[int], bool] = steps
        elif steps is None:
            self._step_ok = lambda _step: True
        else:
            self._step_ok = set(steps).__contains__
        self.generations: list[Generation] = []
        self._current: Generation | None = None
        self._step = -1
        self._rows: torch.Tensor | None = None  # (n_images, halves) batch rows kept, set per generation
        self._store_device: torch.device | None = None
        self._step_tokens = 77
        self._text_columns: torch.Tensor | None = None  # joint models: text-key columns kept, per generation
        self._n_text = 0
        self._stream_prompts: dict[str, Any] = {}  # joint models: prompt arguments seen by check_inputs
        self._encoder_ids: dict[str, list[torch.Tensor]] = {}  # text encoder attribute -> (B, L) ids per call
        self._passes_seen: PassTracker = self.adapter.new_pass_tracker()
        self._encode_cfg = False  # guidance as the pipeline's encode_prompt was told (PixArt)
        self._pass = 0  # 0 for a step's first denoiser call, 1 for a repeat (a second guidance pass)
        self._capturing = False
        self._hub = CaptureHub()  # what the capturing processors read: the recorder, capture or not, the step
        self._cfg_override: bool | None = None  # set by callers that run the UNet themselves
        self._log_filter: logging.Filter | None = None
        self._active = False
        self._originals: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._attention_keys: list[tuple[str, str]] = []  # shared attention-function wrappers in use
        self._patches: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, had instance attr, old)

    # -- configuration --------------------------------------------------------------------------
    @property
    def attention_layers(self) -> dict[str, tuple[str, int]]:
        """Every attention layer of the denoiser: name -> (kind, factor); kind is ``"self"``,
        ``"cross"`` or, in SD3 / Flux, ``"joint"`` (image and text keys: serves both)."""
        return {s.name: (s.kind, s.factor) for s in self.sites}

    @property
    def layer_names(self) -> list[str]:
        """daam-i2i's ``layer_names``: ``'{up|down}-attn-{i}'`` for each located layer, in the order
        ``layer_idx`` counts them (up blocks first; ``i`` restarts in each block, so names repeat).
        SD3 / Flux: the joint layers' module names. Module names and kinds: :attr:`attention_layers`."""
        return _LayerNames(self, [label for label, _ in self._located("self")])

    def _located(self, kind: str) -> list[tuple[str, AttentionSite]]:
        """(label, site) of the layers of ``kind`` in the predecessors' ``layer_idx`` order."""
        return self.adapter.predecessor_order(self.sites, kind, self.low_memory)

    def _select(self, kind: str, factors: FactorSpec, layers: Iterable[str] | None) -> list[AttentionSite]:
        pool = [s for s in self.sites if s.kind in (kind, "joint")]
        if self.low_memory and layers is None:
            first = {s.name for _, s in self._located(kind)}
            pool = [s for s in pool if s.name in first]
        if layers is not None:
            names = list(layers)
            known = {s.name for s in pool}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ConfigError(
                    f"unknown {kind}-attention layer(s) {unknown}; the {kind}-attention layers are {sorted(known)}"
                )
            return [s for s in pool if s.name in set(names)]
        available = sorted({s.factor for s in pool})
        if factors == "highest":
            return [s for s in pool if s.factor == min(available)]
        if factors == "all":
            return pool
        if factors == "daam" and kind == "cross":
            return [s for s in pool if s.block != "mid" and s.factor != 8]
        if isinstance(factors, str) or factors is None:
            raise ConfigError(
                f"{kind}_factors must be 'highest', 'all'{', daam' if kind == 'cross' else ''} or an iterable of "
                f"factors from {available}, got {factors!r}"
            )
        wanted = {int(f) for f in factors}
        missing = wanted - set(available)
        if missing:
            raise ConfigError(f"{kind}-attention has no layers at factor(s) {sorted(missing)}; available: {available}")
        return [s for s in pool if s.factor in wanted]

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        busy = any(d in _ACTIVE for d in self._denoisers)
        if busy or any(isinstance(s.module.get_processor(), CapturingProcessor) for s in self.sites):
            raise TraceError(
                "this pipeline is already being traced: leave the first `with daami2i.trace(pipe)` block "
                "before entering another"
            )
        for s in self.selected:
            self.adapter.check_site(s)
        _ACTIVE.update(self._denoisers)
        try:
            reads_fn = self.adapter.reads_attention_function
            wrapper = JointCapturingProcessor if reads_fn else CapturingProcessor
            for s in self.selected:
                original = s.module.get_processor()
                self._originals[s.name] = original
                s.module.set_processor(wrapper(original, s, self._hub))
            # every processor is read at its attention function where it calls one (UNets too)
            self._attention_keys = acquire_attention_patches(list(self._originals.values()))
            for denoiser in self._denoisers:
                self._handles.append(denoiser.register_forward_pre_hook(self._on_unet, with_kwargs=True))
            if self._cross_sites:
                self._log_filter = _TruncationNotices()
                for logger in _library_loggers():
                    logger.addFilter(self._log_filter)
            method = self.adapter.prompt_method  # check_inputs, or what takes the prompts where there is none
            check = getattr(self.pipe, method)
            try:
                check_sig: inspect.Signature | None = inspect.signature(check)
            except (TypeError, ValueError):
                check_sig = None

            def check_inputs(*args: Any, **kwargs: Any) -> Any:
                self._stream_prompts = {}
                if check_sig is not None:
                    try:
                        bound = check_sig.bind_partial(*args, **kwargs).arguments
                        # copies of list arguments: a pipeline may rewrite its prompt list in place (Z-Image)
                        self._stream_prompts = {k: list(v) if isinstance(v, list) else v for k, v in bound.items()}
                    except TypeError:
                        pass
                self._begin(args[0] if args else kwargs.get("prompt"))
                return check(*args, **kwargs)

            self._patch(self.pipe, method, check_inputs)
            self._watch_timesteps()
            self._hook_encoders()
            if self.adapter.guidance_from_encode_prompt:
                self._patch_encode_prompt()
            processor = getattr(self.pipe, "image_processor", None)
            if processor is not None and callable(getattr(processor, "postprocess", None)):
                post = processor.postprocess

                def postprocess(*args: Any, **kwargs: Any) -> Any:
                    out = post(*args, **kwargs)
                    self._keep_images(out)
                    return out

                self._patch(processor, "postprocess", postprocess)
            self._active = True
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _watch_timesteps(self) -> None:
        """A generation also starts where the pipeline sets its scheduler's timesteps after the
        denoiser ran: a pipeline that skips the prompt method when given ``prompt_embeds`` (Z-Image's
        ``encode_prompt``) must not add its second generation to the first."""
        scheduler = getattr(self.pipe, "scheduler", None)
        set_timesteps = getattr(scheduler, "set_timesteps", None)
        if not callable(set_timesteps):
            return

        @functools.wraps(set_timesteps)  # its signature too: diffusers inspects it (sigmas=, timesteps=)
        def watched(*args: Any, **kwargs: Any) -> Any:
            gen = self._current
            if gen is not None and gen.latent_size is not None and self._cfg_override is None:
                self._stream_prompts = {}
                self._begin(None)  # the prompts of this call are unknown (given as embeddings)
            return set_timesteps(*args, **kwargs)

        self._patch(scheduler, "set_timesteps", watched)

    def _hook_encoders(self) -> None:
        """Record the input ids each text encoder of the pipeline receives (streams with
        ``Stream.encoder`` take their labels from them)."""
        config: Any = getattr(self.pipe, "config", None)
        for attr in sorted(config.keys() if hasattr(config, "keys") else []):
            encoder = getattr(self.pipe, attr, None) if attr.startswith("text_encoder") else None
            if not isinstance(encoder, torch.nn.Module):
                continue

            def keep(_module: Any, args: tuple, kwargs: dict, attr: str = attr) -> None:
                ids = args[0] if args else kwargs.get("input_ids")
                if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
                    self._encoder_ids.setdefault(attr, []).append(ids.detach().to("cpu", copy=True))

            self._handles.append(encoder.register_forward_pre_hook(keep, with_kwargs=True))

    def _patch_encode_prompt(self) -> None:
        """Read the ``do_classifier_free_guidance`` argument of the pipeline's ``encode_prompt`` call:
        pipelines without a ``do_classifier_free_guidance`` attribute (PixArt) decide it there."""
        encode = self.pipe.encode_prompt
        sig = inspect.signature(encode)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind_partial(*args, **kwargs)
            param = sig.parameters.get("do_classifier_free_guidance")
            default = param.default if param is not None else False
            self._encode_cfg = bool(bound.arguments.get("do_classifier_free_guidance", default))
            return encode(*args, **kwargs)

        self._patch(self.pipe, "encode_prompt", encode_prompt)

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        """Shadow ``obj.name`` with an instance attribute, remembering how to undo it."""
        had = name in vars(obj)
        self._patches.append((obj, name, had, vars(obj).get(name)))
        object.__setattr__(obj, name, value)

    def _restore(self) -> None:
        try:
            for s in self.selected:
                if s.name in self._originals:
                    s.module.set_processor(self._originals[s.name])
            for h in self._handles:
                h.remove()
            release_attention_patches(self._attention_keys)
            self._attention_keys = []
            if self._log_filter is not None:
                for logger in _library_loggers():
                    logger.removeFilter(self._log_filter)
                self._log_filter = None
            for obj, name, had, old in reversed(self._patches):
                if had:
                    object.__setattr__(obj, name, old)
                elif name in vars(obj):
                    object.__delattr__(obj, name)
        finally:
            self._originals.clear()
            self._handles.clear()
            self._patches.clear()
            self._scratch = None
            self._hub.capturing = False
            self._active = False
            for denoiser in self._denoisers:
                _ACTIVE.discard(denoiser)

    # -- capture --------------------------------------------------------------------------------
    def _begin(self, prompt: Any) -> None:
        prompts: list[str | None] | None
        if prompt is None:
            prompts = None
        elif isinstance(prompt, str):
            prompts = [prompt]
        else:
            prompts = [p if isinstance(p, str) else None for p in prompt]
        index = self.generations[-1].index + 1 if self.generations else 0
        if self.keep == "last":
            self.generations.clear()  # free the previous maps before new ones are allocated
        self._current = Generation(index=index, grid_size=(0, 0), prompts=prompts, halves=self.halves)
        self.generations.append(self._current)
        self._step = -1
        self._passes_seen = self.adapter.new_pass_tracker()
        self._encoder_ids = {}  # the ids each text encoder receives from here on: this generation's
        self._pass = 0
        self._capturing = False
        self._hub.recorder, self._hub.capturing = None, False

    def _on_unet(self, _module: Any, args: tuple, kwargs: dict) -> None:
        call: DenoiserCall = self.adapter.read_call(args, kwargs)
        sample = call.sample
        direct = self._current is None and self._cfg_override is None
        if self._current is None:  # the denoiser was called without the pipeline's __call__
            self._begin(None)
        gen = self._current
        assert gen is not None
        if self._cfg_override is None:
            # a second call in one step is a second pass: true CFG's negative prompt (Flux), SD3's
            # skip-layer guidance (not captured); the adapter knows how to tell
            repeat = self._passes_seen.is_repeat(call, gen.latent_size is not None)
            if not repeat and self._pass == 0 and self.halves == "uncond" and self._passes() and self._step >= 0:
                raise TraceError(
                    f"halves='uncond' was asked for, but {self.adapter.name} ran step {self._step} without a second "
                    f"(negative-prompt) pass: {self.adapter.second_pass_hint}; otherwise use halves='cond'"
                )
            self._pass = 1 if repeat else 0
        else:
            self._pass = 0
        if self._pass == 0:
            self._step += 1
            gen.steps_run = self._step + 1
        if gen.latent_size is None:
            context = call.context
            if not isinstance(sample, torch.Tensor):
                raise TraceError(
                    f"the {type(self.unet).__name__} was called without a latent sample tensor "
                    f"(got {type(sample).__name__})"
                )
            n_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) else 77
            if direct:
                self._cfg_override = False  # a bare denoiser call: its batch rows are kept as they come
                try:
                    self._setup_generation(gen, call, n_tokens, kwargs)
                finally:
                    self._cfg_override = None
                if gen.n_images > 1 and gen.n_images % 2 == 0:
                    _warn_user(
                        f"the {type(self.unet).__name__} was called directly, not by the pipeline, with a batch of "
                        f"{gen.n_images}: daami2i keeps each batch entry as its own image and cannot tell whether "
                        "the batch is the guidance halves [uncond; cond]. If it is, image_idx=0 is the unconditional "
                        f"half: pass compute_global_heat_map(image_idx={gen.n_images // 2}) for the conditional one, "
                        "or use daami2i.trace_image(pipe, image, prompt), which runs the denoiser and its guidance "
                        "itself."
                    )
            else:
                self._setup_generation(gen, call, n_tokens, kwargs)
        wanted_pass = {"cond": (0,), "uncond": (1,), "both": (0, 1)}[self.halves] if self._passes() else (0,)
        self._capturing = self._step_ok(self._step) and self._pass in wanted_pass
        self._hub.capturing, self._hub.step = self._capturing, self._step
        self._hub.rewrite = call.rewrite
        if self._capturing and gen.steps_captured[-1:] != [self._step]:
            gen.steps_captured.append(self._step)

    def _passes(self) -> bool:
        """Whether the guidance halves come as separate transformer calls (Flux true CFG) rather than
        as halves of the batch."""
        return self.adapter.guidance_as_passes and self._cfg_override is None

    def _setup_generation(
        self, gen: Generation, call: DenoiserCall, n_tokens: int, kwargs: dict[str, Any] | None = None
    ) -> None:
        scale = self.adapter.pixel_scale(self.pipe)  # the VAE's pixels per latent position
        sample = call.sample
        gen.grid_size, gen.latent_size = self.adapter.geometry(self.unet, call, kwargs or {}, self.grid_factor)
        gen.image_size = (gen.latent_size[0] * scale, gen.latent_size[1] * scale)
        gen.frames = self.adapter.frame_layout(self.pipe, self.unet, call, gen.grid_size)
        batch = int(sample.shape[0])
        if self._cfg_override is not None:
            gen.cfg = self._cfg_override
        elif self._passes():
            gen.cfg = False  # guidance halves are separate calls here, not halves of the batch
        elif self.adapter.guidance_from_encode_prompt:
            gen.cfg = bool(self._encode_cfg)
        else:
            gen.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if gen.cfg and batch % 2:
            raise TraceError(f"classifier-free guidance is on but the UNet batch ({batch}) is odd")
        gen.n_images = batch // 2 if gen.cfg else batch
        if self.halves == "uncond" and not gen.cfg and not self._passes():
            raise TraceError(
                "halves='uncond' was asked for but this generation runs without classifier-free guidance "
                "(guidance_scale <= 1), so there is no unconditional half; use halves='cond'"
            )
        n = gen.n_images
        if not gen.cfg:
            rows = [[i] for i in range(n)]
        else:
            u, c = (n, 0) if self.adapter.cond_first else (0, n)  # first rows of each half: [uncond; cond] or reversed
            rows = {
                "cond": [[c + i] for i in range(n)],
                "uncond": [[u + i] for i in range(n)],
                "both": [[u + i, c + i] for i in range(n)],
            }[self.halves]
        self._rows = torch.tensor(rows, device=sample.device)  # (n_images, halves)
        self._store_device = torch.device(self.store_device) if self.store_device is not None else sample.device
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if gen.prompts is not None and n % len(gen.prompts) == 0:
            per = n // len(gen.prompts)
            gen.image_prompts = [gen.prompts[i // per] for i in range(n)]
        else:
            gen.image_prompts = [None] * n
        gen.image_tokens = [
            tokenize_prompt(tokenizer, p.lower()) if (p is not None and tokenizer is not None) else None
            for p in gen.image_prompts
        ]
        gen.config = dict(self.config)
        if self.adapter.single_clip_stream and self._cross_sites:
            for p, toks in zip(gen.image_prompts, gen.image_tokens, strict=True):
                if toks is not None and len(toks) + 2 > n_tokens:
                    note = truncation_note(TokenStream("clip", tokenizer, toks, 1, n_tokens - 1))
                    _warn_user(f"{note}. Prompt: {p!r}")
                    break
        known = [len(t) for t in gen.image_tokens if t is not None]
        self._step_tokens = min(n_tokens, max(known) + 2) if known and len(known) == len(gen.image_tokens) else n_tokens
        if not self.adapter.single_clip_stream:
            self._setup_streams(gen, n_tokens, sample.device)
        latent = gen.latent_size
        frames = gen.frames.token_frames if gen.frames is not None else 1
        self._hub.recorder = Recorder(
            gen,
            self._rows,
            self._store_device,
            lambda factor: self.adapter.layer_grid(self.unet, latent, factor),
            chunk_bytes=self.chunk_bytes,
            scratch=self._scratch_buffer,
            keep_heads=self.keep_heads,
            cross_steps=self.cross_steps,
            step_tokens=self._step_tokens,
            text_columns=None if self.adapter.single_clip_stream else self._text_columns,
            n_text=self._n_text,
            n_reference=self.adapter.reference_tokens(call, gen.grid_size),
            text_first=self.adapter.text_first,
            text_varies=self.adapter.text_length_varies,
            self_layers=self._self_names,
            cross_layers=self._cross_names,
            text_relations=self.text_relations,
            pass_weight=0.5 if self._passes() and self.halves == "both" else 1.0,
            word_heads=self.adapter.word_heads_kept,
            self_pool=self._pool_for(gen.grid_size, frames, n),
            frames=frames,
            frame_batch=self.adapter.frame_batch,
        )
        if self.max_store_mb is not None:
            total = getattr(self.pipe, "_num_timesteps", None)
            n_steps = sum(self._step_ok(t) for t in range(total)) if isinstance(total, int) else None
            if not self.adapter.single_clip_stream:
                n_tokens = self._step_tokens = int(self._text_columns.numel()) if self._text_columns is not None else 0
            need = self.estimate_nbytes(gen.latent_size, n, n_tokens, n_steps, self._step_tokens, frames=frames)
            if need["total"] > self.max_store_mb * 2**20:
                parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in need.items() if k != "total" and v)
                raise TraceError(
                    f"this generation would store {need['total'] / 2**20:.1f} MiB ({parts}) for {n} image(s) of "
                    f"{gen.image_size[0]}x{gen.image_size[1]}, over max_store_mb={self.max_store_mb:g}; capture fewer "
                    "resolutions, layers or steps, or raise max_store_mb"
                )

    def _setup_streams(self, gen: Generation, n_text: int, device: torch.device) -> None:
        """Joint models: which text-key columns to keep (each stream's prompt tokens, its start and end
        tokens; all of the stream when the prompt is unknown) and where each stream's rows start."""
        self._n_text = n_text
        columns: list[int] = []
        gen.streams = []
        for st in self.adapter.text_streams(self.pipe, n_text):
            stop = n_text if st.width is None else min(n_text, st.offset + st.width)
            if st.offset >= stop:
                continue
            tokenizer = getattr(self.pipe, st.tokenizer, None)
            prompt = self._stream_prompts.get(st.prompt_arg)
            prompts = gen.image_prompts if prompt is None else self._per_image(prompt, gen.n_images)
            if st.lowercase:  # the text as the pipeline hands it to the tokenizer
                prompts = [p.lower().strip() if p is not None else None for p in prompts]
            if st.encoder is not None:
                columns.extend(self._received_stream(gen, st, stop, tokenizer, prompts, len(columns)))
                continue
            tokens = [
                tokenize_prompt(tokenizer, p.lower() if st.name == "clip" else p)
                if p is not None and tokenizer
                else None
                for p in prompts
            ]
            known = [len(t) for t in tokens if t is not None]
            full = width = stop - st.offset
            truncated = False
            if known and len(known) == len(tokens):
                need = max(known) + st.bos + 1  # start token, prompt tokens, end token
                width, truncated = min(full, need), need > full
            if truncated:
                toks = max((t for t in tokens if t is not None), key=len)
                seen_stop = st.bos + width - 1
                note = truncation_note(TokenStream(st.name, tokenizer, toks, st.bos, seen_stop))
                _warn_user(note)
            gen.streams.append(
                {
                    "name": st.name,
                    "tokenizer": st.tokenizer,
                    "first_row": len(columns) + st.bos,
                    # a truncated prompt's last column is the end token: no word maps there
                    "stop_row": len(columns) + width - (1 if truncated else 0),
                    "tokens": tokens,
                    "prompts": list(prompts),
                }
            )
            columns.extend(range(st.offset, st.offset + width))
        self._text_columns = torch.tensor(columns, dtype=torch.long, device=device)

    def _received_stream(
        self, gen: Generation, st: Stream, stop: int, tokenizer: Any, prompts: list[str | None], before: int
    ) -> list[int]:
        """A stream labelled by the ids its encoder received: find each image's prompt tokens in them
        (past any template or system prompt), keep those key columns and the one after (the end
        token), and append the stream to ``gen.streams``; returns the key columns kept."""
        received = [row for t in self._encoder_ids.get(st.encoder or "", []) for row in t.tolist()]
        special = list(getattr(tokenizer, "all_special_ids", []) or [])  # padding, an end token after a cut
        found: list[tuple[int, int] | None] = []
        tokens: list[list[str] | None] = []
        texts: list[str | None] = list(prompts)  # the text whose tokens were found (words are looked up in it)
        for i, p in enumerate(prompts):
            ids, spot = None, None
            # the prompt tokenised alone, else as after a space: a template that puts one before it
            # (Lumina 2's "... <Prompt Start> ") makes a SentencePiece tokenizer mark its first word ("▁a")
            for text in (p, " " + p) if p is not None and tokenizer else ():
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                spot = locate_tokens(received, ids, special) if ids else None
                if spot is not None:
                    texts[i] = text
                    break
            found.append(spot)
            tokens.append(tokenizer.convert_ids_to_tokens(ids) if spot is not None and ids else None)
        spots = [f for f in found if f is not None]
        why = None
        if any(p is not None and f is None for p, f in zip(prompts, found, strict=True)):
            why = (
                f"the {st.name} text encoder ({st.encoder}) did not receive the prompt's tokens as daami2i "
                "tokenizes them"
            )
        elif len({a for a, _ in spots}) > 1:
            why = f"the prompts of this batch start at different {st.name} positions (left padding?)"
        if why is not None or not spots:  # unknown prompts, or labels that cannot be trusted: keep it whole
            if why is not None:
                _warn_user(f"{why}, so its word maps are not labelled; generate one prompt per call for them")
            gen.streams.append(
                {
                    "name": st.name,
                    "tokenizer": st.tokenizer,
                    "first_row": before,
                    "stop_row": before + stop - st.offset,
                    "tokens": [None] * len(prompts),
                    "prompts": list(prompts),
                }
            )
            return list(range(st.offset, stop))
        dropped = self.adapter.dropped_positions(st, received, stop - st.offset)
        start = spots[0][0] - dropped  # the prompt's first key column within the stream
        if not 0 <= start < stop - st.offset:
            raise TraceError(
                f"the {st.name} stream's prompt tokens sit at encoder position {spots[0][0]}, outside its "
                f"{stop - st.offset} key columns after the {dropped} dropped ones: the family adapter's "
                "Stream is wrong for this pipeline"
            )
        seen = max(n for _, n in spots)
        truncated = any(f is not None and f[1] < len(t or []) for f, t in zip(found, tokens, strict=True))
        width = min(stop - st.offset - start, seen + (0 if truncated else 1))  # the end token after the prompt
        if truncated:
            toks = max((t for t in tokens if t is not None), key=len)
            _warn_user(truncation_note(TokenStream(st.name, tokenizer, toks, 0, seen)))
        gen.streams.append(
            {
                "name": st.name,
                "tokenizer": st.tokenizer,
                "first_row": before,
                "stop_row": before + width,
                "tokens": tokens,
                "prompts": texts,
            }
        )
        first = st.offset + start
        return list(range(first, first + width))

    @staticmethod
    def _per_image(prompt: Any, n_images: int) -> list[str | None]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or n_images % len(prompts):
            return [None] * n_images
        per = n_images // len(prompts)
        return [prompts[i // per] if isinstance(prompts[i // per], str) else None for i in range(n_images)]

    def estimate_nbytes(
        self,
        latent_size: tuple[int, int],
        n_images: int = 1,
        n_tokens: int = 77,
        n_steps: int | None = None,
        step_tokens: int = 77,
        *,
        frames: int = 1,
    ) -> dict[str, int]:
        """Bytes this trace's stores take for one generation: ``{"self", "cross", "cross_steps", "text", "total"}``.

        ``latent_size`` is (height, width) of the latent (the image size divided by the VAE's 8);
        ``n_steps`` (captured steps) only matters with ``cross_steps=True``; ``frames`` is the number of
        token frames a video's latent stacks (its self-attention may be pooled, see ``self_pool``).

        >>> from daami2i.testing import tiny_sd_pipeline
        >>> trace(tiny_sd_pipeline()).estimate_nbytes((64, 64))["self"] == 4096 * 4096 * 4
        True
        """
        out = {"self": 0, "cross": 0, "cross_steps": 0, "text": 0}
        adapter, halves = self.adapter, 2 if self.halves == "both" else 1
        steps = n_steps if n_steps is not None else adapter.default_steps
        for f in self._self_factors:  # one (N x N) head-mean sum per resolution
            h, w = adapter.layer_grid(self.unet, latent_size, f)
            pool = self._pool_for((h, w), frames, n_images)
            if pool > 1:  # a sum per cell
                h, w = cells_of((h, w), frames, pool)
            if adapter.frame_batch:  # one block per frame
                out["self"] += n_images * frames * (h * w // frames) ** 2 * 4
            else:
                out["self"] += n_images * (h * w) ** 2 * 4
        for f in sorted({s.factor for s in self._temporal_sites}):  # one frames x frames matrix per pixel
            h, w = adapter.layer_grid(self.unet, latent_size, f)
            out["self"] += n_images * (h * w // frames) * frames * frames * 4
        if self.keep_heads:  # and one per layer and kept head
            for site in self.sites:
                if site.name in self._self_names:
                    h, w = adapter.layer_grid(self.unet, latent_size, site.factor)
                    out["self"] += n_images * halves * site.module.heads * (h * w) ** 2 * 4
        for site in self._cross_sites:  # per layer (and head, where kept) the text columns
            h, w = adapter.layer_grid(self.unet, latent_size, site.factor)
            per = n_images * (site.module.heads if adapter.word_heads_kept else 1) * h * w * 4
            out["cross"] += per * n_tokens
            if self.cross_steps:
                out["cross_steps"] += per * step_tokens * steps
            if site.kind == "joint":  # the text tokens as queries: over the image, over the text
                out["text"] += (
                    n_images
                    * 4
                    * n_tokens
                    * (
                        (h * w if "text->image" in self.text_relations else 0)
                        + (n_tokens if "text->text" in self.text_relations else 0)
                    )
                )
        out["total"] = sum(out.values())
        return out

    def _pool_for(self, grid: tuple[int, int], frames: int, n_images: int) -> int:
        """The self-attention cell side for a token ``grid`` of ``frames`` stacked frames (see ``self_pool``)."""
        if self.self_pool != "auto":
            return int(self.self_pool)
        if frames == 1 or self._self_factors != [1] or self.adapter.frame_batch:
            return 1  # images, several resolutions, or frames kept as blocks of their own (AnimateDiff)
        for p in range(1, max(grid) + 1):  # the budget is per video: a batch of videos pools as one does
            h, w = cells_of(grid, frames, p)
            if (h * w) ** 2 * 4 <= _AUTO_POOL_BYTES:
                return p
        return max(grid)

    def _keep_images(self, out: Any) -> None:
        gen = self._current
        if gen is None:
            return
        from diffusers.image_processor import VaeImageProcessor

        if isinstance(out, torch.Tensor) and out.dim() == 4:
            out = VaeImageProcessor.pt_to_numpy(out.detach().float().cpu())
        if getattr(out, "ndim", 0) == 4:
            out = VaeImageProcessor.numpy_to_pil(out)
        if isinstance(out, list) and out and all(hasattr(im, "save") for im in out):
            gen.images = list(out)

    def _scratch_buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """A flat float32 buffer of at least ``n`` elements on ``device``, reused across captures."""
        buf = self._scratch
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._scratch = torch.empty(n, device=device)
        return buf

    # -- results --------------------------------------------------------------------------------
    @property
    def last_generation(self) -> Generation:
        """The most recent pipeline call's captured data."""
        if not self.generations or self.generations[-1].latent_size is None:
            raise TraceError(
                "nothing has been captured yet: call the pipeline inside `with daami2i.trace(pipe) as trc:` "
                "before computing heat maps"
            )
        return self.generations[-1]

    def compute_global_heat_map(
        self,
        *args: Any,
        prompt: str | None = None,
        factors: Iterable[int] | None = None,
        head_idx: int | None = None,
        layer_idx: int | None = None,
        normalize: bool = False,
        image_idx: int = 0,
        direction: Direction | None = None,
        generation: int = -1,
        steps: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
    ) -> GlobalHeatMap:
        """Heat maps of one generated image (``image_idx`` in the batch) of the last generation.

        Positional arguments follow DAAM, ``(prompt, factors, head_idx, layer_idx, normalize)``, or,
        when the first is not a string, daam-i2i, ``(factors, head_idx, layer_idx, normalize)``:

        * ``prompt`` overrides the text used to look words up (default: the image's own prompt);
        * ``factors`` restricts the captured resolutions used; one factor whose self-attention was
          captured puts the maps on that resolution's own grid, without interpolation (daam-i2i);
        * ``head_idx`` keeps one head: head ``h`` of each cross-attention layer (DAAM), and the kept
          self-attention head ``h`` of each layer (daam-i2i; with ``halves="both"``, heads of the
          unconditional half come first; needs ``trace(keep_heads=True)``);
        * ``layer_idx`` keeps one transformer layer, counted as the predecessors count (see
          :attr:`layer_names`);
        * ``normalize``: word maps divided by the sum of the prompt's token maps (DAAM), self-attention
          rows by their sum (daam-i2i).

        daami2i's own keywords: ``generation`` picks an earlier call (a position in
        :attr:`generations`; earlier calls are kept with ``keep="all"``); ``steps`` restricts word
        maps to those denoising steps (needs ``cross_steps=True``); ``layers`` to those captured
        cross-attention (or, in SD3 / Flux, joint) layers, e.g. the few "grounding" layers of a
        transformer, chosen after the run.
        """
        prompt, factors, head_idx, layer_idx, normalize = predecessor_arguments(
            args, prompt=prompt, factors=factors, head_idx=head_idx, layer_idx=layer_idx, normalize=normalize
        )
        gen = self.last_generation if generation == -1 else self._generation(generation)
        gen.check_finite()
        if gen.steps_run and not gen.steps_captured:
            raise QueryError(
                f"nothing was captured: steps={_steps_text(self.config['steps'])} "
                f"selected none of the {gen.steps_run} denoising steps this generation ran (0-{gen.steps_run - 1}); "
                "trace with steps inside that range (0-based step indices)"
            )
        self_layers = None
        if layer_idx is not None:
            self_layers, cross_layer = self._layer_at(int(layer_idx), gen)
            if layers is not None:
                raise QueryError("pass layer_idx (the predecessors' layer index) or layers (names), not both")
            layers = cross_layer
        if head_idx is not None and not self.adapter.word_heads_kept and gen.cross_attention:
            raise QueryError(
                "head_idx: SD3 / Flux word maps are kept as the mean over heads, so no head can be chosen; "
                "choose layers instead (layers=[...] or layer_idx)"
            )
        no_words = layers == []  # the chosen block's cross-attention was not captured
        ghm = gen.heat_map(
            image_idx,
            tokenizer=getattr(self.pipe, "tokenizer", None),
            prompt=prompt,
            factors=factors,
            direction=direction or self.direction,
            steps=steps,
            tokenizers={st["tokenizer"]: getattr(self.pipe, st["tokenizer"], None) for st in gen.streams},
            layers=None if no_words else layers,
            head_idx=None if head_idx is None else int(head_idx),
            self_layers=self_layers,
            normalize=bool(normalize),
        )
        if no_words:
            ghm.cross_layers = []
        if (head_idx is not None or layer_idx is not None) and not ghm.self_levels and not ghm.cross_layers:
            where = ""
            if layer_idx is not None:
                label, site = self._located("self")[int(layer_idx)] if self_layers else ("", None)
                where = f" (layer_idx={layer_idx} is {label}: {site.name}, factor {site.factor})" if site else ""
            raise QueryError(
                f"no heat maps found for head_idx={head_idx}, layer_idx={layer_idx}, factors={factors}{where}: no "
                f"captured layer matches; captured: {self.config['self_layers'] + self.config['cross_layers']}"
            )
        return ghm

    def _layer_at(self, layer_idx: int, gen: Generation) -> tuple[list[str], list[str] | None]:
        """The self- and cross-attention layer names at the predecessors' ``layer_idx`` (one transformer
        block: its attn1 and attn2); cross is None when that block's cross-attention was not captured
        (its word maps then come from no layer, and say so)."""
        located_self = self._located("self")
        located_cross = self._located("cross")
        n = max(len(located_self), len(located_cross))
        if layer_idx >= n:
            raise QueryError(
                f"layer_idx must be in [0, {n - 1}] (the predecessors' index of {n} located layers: "
                f"{[label for label, _ in located_self]}), got {layer_idx}"
            )
        self_names = [located_self[layer_idx][1].name] if layer_idx < len(located_self) else []
        cross_name = located_cross[layer_idx][1].name if layer_idx < len(located_cross) else None
        cross = [cross_name] if cross_name is not None and cross_name in gen.cross_attention else None
        if cross is None and gen.cross_attention:
            cross = []  # selects no word layer
        return self_names, cross

    # -- the predecessors' attributes ----------------------------------------------------------
    @property
    def latent_hw(self) -> int:
        """daam-i2i: pixels of the highest self-attention grid (4096 for a 64x64 grid): the last
        generation's, or, before any, the one the denoiser's default sample size gives."""
        if self.generations and self.generations[-1].latent_size is not None:
            h, w = self.generations[-1].grid_size
            return h * w
        h, w = self.adapter.layer_grid(self.unet, self.adapter.default_latent(self.unet), self.grid_factor)
        return h * w

    @property
    def last_prompt(self) -> str:
        """daam-i2i / DAAM: the prompt of the last generation ('' before any, or when it had none)."""
        if not self.generations or not self.generations[-1].prompts:
            return ""
        first = self.generations[-1].prompts[0]
        return first if isinstance(first, str) else ""

    @property
    def last_image(self) -> Any:
        """daam-i2i / DAAM: the last image the pipeline returned (PIL), or None."""
        if not self.generations or not self.generations[-1].images:
            return None
        return self.generations[-1].images[-1]

    def time_callback(self, *args: Any, **kwargs: Any) -> None:
        """daam-i2i / DAAM: counts calls in :attr:`time_idx` (denoising steps are tracked without it)."""
        self.time_idx += 1

    def hook(self) -> Trace:
        """Start capturing without ``with`` (daam-i2i / DAAM); stop with :meth:`unhook`."""
        return self.__enter__()

    def unhook(self) -> None:
        """Stop capturing and restore the pipeline (daam-i2i / DAAM); the captured maps stay."""
        self._restore()

    def to_experiment(
        self,
        path: str | Path,
        seed: int | None = None,
        id: str = ".",  # DAAM's name
        subtype: str = ".",
        *,
        images: list[Any] | None = None,
        generation: int = -1,
        overwrite: bool = False,
        **info: Any,
    ) -> Path:
        """Save the last generation (maps, images, prompts, tokens, pipeline identity) to a folder and
        return it: ``path / id / subtype`` (DAAM's layout; both default to ``"."``).

        ``images`` defaults to the images the pipeline returned; ``seed`` and any extra keyword
        (JSON-serialisable; DAAM's compute keywords land here too, since every query stays possible)
        are recorded in the manifest. Reopen with :func:`daami2i.load_experiment`.
        """
        from ..storage.experiment import save_experiment

        for name, part in (("id", id), ("subtype", subtype)):
            if not isinstance(part, str) or Path(part).is_absolute() or ".." in Path(part).parts:
                raise ConfigError(f"{name} must be a relative folder name inside path (DAAM's layout), got {part!r}")
        path = Path(path) / id / subtype

        gen = self.last_generation if generation == -1 else self._generation(generation)
        gen.check_finite()  # (a folder of NaN maps would only be refused when loaded)
        scheduler = getattr(self.pipe, "scheduler", None)
        record = {
            "seed": seed,
            "pipeline": type(self.pipe).__name__,
            "model": getattr(getattr(self.pipe, "config", None), "_name_or_path", None),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "scheduler_config": dict(scheduler.config) if scheduler is not None else None,
            "dtype": str(self.unet.dtype),
            **info,
        }
        return save_experiment(
            gen,
            path,
            images=images,
            tokenizer=getattr(self.pipe, "tokenizer", None),
            info=json.loads(json.dumps(record, default=str)),
            overwrite=overwrite,
            tokenizers={st["tokenizer"]: getattr(self.pipe, st["tokenizer"], None) for st in gen.streams},
        )

    def _generation(self, index: int) -> Generation:
        if not -len(self.generations) <= index < len(self.generations):
            raise QueryError(f"generation must be in [0, {len(self.generations) - 1}], got {index}")
        return self.generations[index]


trace = Trace
DiffusionHeatMapHooker = Trace  # daam-i2i's name of the tracer


class _LayerNames(list):  # type: ignore[type-arg]
    """daam-i2i's list of layer names; the dict interface of daami2i 0.2's ``layer_names`` (name ->
    (kind, factor)) still answers, with a warning pointing to ``attention_layers``."""

    def __init__(self, trc: Trace, names: list[str]) -> None:
        super().__init__(names)
        self._trc = trc

    def _dict(self) -> dict[str, tuple[str, int]]:
        warnings.warn(
            "trc.layer_names is daam-i2i's list of names now; the dict of module names -> (kind, factor) is "
            "trc.attention_layers",
            DeprecationWarning,
            stacklevel=3,
        )
        return self._trc.attention_layers

    def items(self) -> Any:
        return self._dict().items()

    def keys(self) -> Any:
        return self._dict().keys()

    def values(self) -> Any:
        return self._dict().values()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._dict()[key]
        return super().__getitem__(key)

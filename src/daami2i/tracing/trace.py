"""``daami2i.trace``: the context manager that captures attention while a pipeline generates."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError, QueryError, TraceError
from ..heatmaps.maps import GlobalHeatMap
from ..heatmaps.selfattn import Direction, check_direction
from ..storage.store import CrossAttentionStore, Generation, SelfAttentionStore
from .capture import CapturingProcessor, attention_probs_chunks
from .unet import AttentionSite, find_sites, size_at, unet_of

Halves = Literal["cond", "uncond", "both"]
FactorSpec = str | Iterable[int] | None

_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # UNets currently traced


class Trace:
    """Capture self- and cross-attention of a Stable Diffusion pipeline while it generates.

    >>> from daami2i.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with trace(pipe) as trc:
    ...     image = pipe("a red cat", num_inference_steps=2, height=64, width=64).images[0]
    ...     ghm = trc.compute_global_heat_map()
    >>> ghm.compute_word_heat_map("cat").expand_as(image).shape
    torch.Size([64, 64])

    Args:
        pipe: a diffusers pipeline with a ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, img2img, inpaint).
        self_attention / cross_attention: capture each kind at all (both on by default).
        self_factors: resolutions of self-attention to capture, as latent downsampling factors:
            ``"highest"`` (default, like daam-i2i: the highest self-attention resolution only),
            ``"all"``, or an iterable such as ``(1, 2)``.
        cross_factors: ``"daam"`` (default: down and up blocks, every factor except 8, like DAAM),
            ``"all"`` (mid block too), or an iterable of factors.
        self_layers / cross_layers: explicit layer names (see :attr:`layer_names`) to capture
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
    """

    def __init__(
        self,
        pipe: Any,
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
    ) -> None:
        self.pipe = pipe
        self.unet = unet_of(pipe)
        if not callable(getattr(pipe, "check_inputs", None)):
            raise ConfigError(f"{type(pipe).__name__} has no check_inputs method: daami2i cannot see its prompts")
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
            steps = [int(t) for t in steps]
        if max_store_mb is not None and not max_store_mb > 0:
            raise ConfigError(f"max_store_mb must be positive or None, got {max_store_mb!r}")
        self.max_store_mb = max_store_mb
        self.sites = find_sites(self.unet)
        self_sites = [s for s in self.sites if s.kind == "self"]
        if not self_sites:
            raise ConfigError(f"{type(self.unet).__name__} has no attention layers to trace")
        self.grid_factor = min(s.factor for s in self_sites)
        self.selected = (self._select("self", self_factors, self_layers) if self_attention else []) + (
            self._select("cross", cross_factors, cross_layers) if cross_attention else []
        )
        if not self.selected:
            raise ConfigError("nothing to capture: both self_attention and cross_attention are off")
        self._self_factors = sorted({s.factor for s in self.selected if s.kind == "self"})
        self._cross_sites = [s for s in self.selected if s.kind == "cross"]
        self.config: dict[str, Any] = {  # recorded with each generation (experiment manifests)
            "self_layers": [s.name for s in self.selected if s.kind == "self"],
            "cross_layers": [s.name for s in self._cross_sites],
            "halves": halves,
            "direction": direction,
            "steps": None if steps is None or callable(steps) else sorted(int(t) for t in steps),
            "cross_steps": self.cross_steps,
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
        self._cfg_override: bool | None = None  # set by callers that run the UNet themselves
        self._active = False
        self._originals: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, had instance attr, old)

    # -- configuration --------------------------------------------------------------------------
    @property
    def layer_names(self) -> dict[str, tuple[str, int]]:
        """Every attention layer of the UNet: name -> (kind, factor)."""
        return {s.name: (s.kind, s.factor) for s in self.sites}

    def _select(self, kind: str, factors: FactorSpec, layers: Iterable[str] | None) -> list[AttentionSite]:
        pool = [s for s in self.sites if s.kind == kind]
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
        if self.unet in _ACTIVE or any(isinstance(s.module.get_processor(), CapturingProcessor) for s in self.sites):
            raise TraceError(
                "this pipeline is already being traced: leave the first `with daami2i.trace(pipe)` block "
                "before entering another"
            )
        for s in self.selected:
            if "Fused" in type(s.module.get_processor()).__name__:
                raise TraceError(
                    f"layer {s.name} runs {type(s.module.get_processor()).__name__}, whose fused QKV projection "
                    "hides the query and key: call pipe.unfuse_qkv_projections() before tracing"
                )
        _ACTIVE.add(self.unet)
        try:
            for s in self.selected:
                original = s.module.get_processor()
                self._originals[s.name] = original
                s.module.set_processor(CapturingProcessor(original, s, self))
            self._handles.append(self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
            check = self.pipe.check_inputs

            def check_inputs(*args: Any, **kwargs: Any) -> Any:
                self._begin(args[0] if args else kwargs.get("prompt"))
                return check(*args, **kwargs)

            self._patch(self.pipe, "check_inputs", check_inputs)
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
            self._active = False
            _ACTIVE.discard(self.unet)

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

    def _on_unet(self, _module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if self._current is None:  # the UNet was called without the pipeline's __call__
            self._begin(None)
        gen = self._current
        assert gen is not None
        self._step += 1
        gen.steps_run = self._step + 1
        if gen.latent_size is None:
            if not isinstance(sample, torch.Tensor):
                raise TraceError(f"the UNet was called without a latent sample tensor (got {type(sample).__name__})")
            context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            n_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) else 77
            self._setup_generation(gen, sample, n_tokens)
        if self._step_ok(self._step):
            gen.steps_captured.append(self._step)

    def _setup_generation(self, gen: Generation, sample: torch.Tensor, n_tokens: int) -> None:
        gen.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        gen.grid_size = size_at(gen.latent_size, self.grid_factor)
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        gen.image_size = (gen.latent_size[0] * scale, gen.latent_size[1] * scale)
        batch = int(sample.shape[0])
        if self._cfg_override is not None:
            gen.cfg = self._cfg_override
        else:
            gen.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if gen.cfg and batch % 2:
            raise TraceError(f"classifier-free guidance is on but the UNet batch ({batch}) is odd")
        gen.n_images = batch // 2 if gen.cfg else batch
        if self.halves == "uncond" and not gen.cfg:
            raise TraceError(
                "halves='uncond' was asked for but this generation runs without classifier-free guidance "
                "(guidance_scale <= 1), so there is no unconditional half; use halves='cond'"
            )
        n = gen.n_images
        if not gen.cfg:
            rows = [[i] for i in range(n)]
        else:
            rows = {
                "cond": [[n + i] for i in range(n)],
                "uncond": [[i] for i in range(n)],
                "both": [[i, n + i] for i in range(n)],
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
            tokenizer.tokenize(p.lower()) if (p is not None and tokenizer is not None) else None
            for p in gen.image_prompts
        ]
        gen.config = dict(self.config)
        known = [len(t) for t in gen.image_tokens if t is not None]
        self._step_tokens = min(n_tokens, max(known) + 2) if known and len(known) == len(gen.image_tokens) else n_tokens
        if self.max_store_mb is not None:
            total = getattr(self.pipe, "_num_timesteps", None)
            n_steps = sum(self._step_ok(t) for t in range(total)) if isinstance(total, int) else None
            need = self.estimate_nbytes(gen.latent_size, n, n_tokens, n_steps, self._step_tokens)
            if need["total"] > self.max_store_mb * 2**20:
                parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in need.items() if k != "total" and v)
                raise TraceError(
                    f"this generation would store {need['total'] / 2**20:.1f} MiB ({parts}) for {n} image(s) of "
                    f"{gen.image_size[0]}x{gen.image_size[1]}, over max_store_mb={self.max_store_mb:g}; capture fewer "
                    "resolutions, layers or steps, or raise max_store_mb"
                )

    def estimate_nbytes(
        self,
        latent_size: tuple[int, int],
        n_images: int = 1,
        n_tokens: int = 77,
        n_steps: int | None = None,
        step_tokens: int = 77,
    ) -> dict[str, int]:
        """Bytes this trace's stores take for one generation: ``{"self", "cross", "cross_steps", "total"}``.

        ``latent_size`` is (height, width) of the latent (the image size divided by the VAE's 8);
        ``n_steps`` (captured steps) only matters with ``cross_steps=True``.

        >>> from daami2i.testing import tiny_sd_pipeline
        >>> trace(tiny_sd_pipeline()).estimate_nbytes((64, 64))["self"] == 4096 * 4096 * 4
        True
        """
        out = {"self": 0, "cross": 0, "cross_steps": 0}
        for f in self._self_factors:
            h, w = size_at(latent_size, f)
            out["self"] += n_images * (h * w) ** 2 * 4
        for site in self._cross_sites:
            h, w = size_at(latent_size, site.factor)
            per = n_images * site.module.heads * h * w * 4
            out["cross"] += per * n_tokens
            if self.cross_steps:
                out["cross_steps"] += per * step_tokens * (n_steps if n_steps is not None else 50)
        out["total"] = sum(out.values())
        return out

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

    def _wants(self, site: AttentionSite) -> bool:
        return self._current is not None and self._current.steps_captured[-1:] == [self._step]

    def _chunks(self, attn: Any, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, mask: Any) -> Any:
        return attention_probs_chunks(attn, q, k, rows.flatten(), mask, self.chunk_bytes, self._scratch_buffer)

    def _scratch_buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """A flat float32 buffer of at least ``n`` elements on ``device``, reused across captures."""
        buf = self._scratch
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._scratch = torch.empty(n, device=device)
        return buf

    def _capture(self, site: AttentionSite, attn: Any, q: torch.Tensor, k: torch.Tensor, mask: Any) -> None:
        gen = self._current
        assert gen is not None and gen.latent_size is not None
        n_q = q.shape[1]
        size = size_at(gen.latent_size, site.factor)
        if size[0] * size[1] != n_q:
            raise TraceError(
                f"layer {site.name} saw {n_q} query tokens, but a {gen.latent_size} latent at factor {site.factor} "
                f"has {size[0] * size[1]}: this UNet's layout is not one daami2i understands"
            )
        rows, dev = self._rows, self._store_device
        assert rows is not None and dev is not None
        n_img, n_halves = rows.shape
        n_k = k.shape[1]
        if site.kind == "self":
            store = gen.self_attention.get(site.factor)
            if store is None:
                store = SelfAttentionStore(site.factor, size, torch.zeros(n_img, n_q, n_k, device=dev))
                gen.self_attention[site.factor] = store
            for start, stop, p in self._chunks(attn, q, k, rows, mask):
                p = p.view(n_img, n_halves * p.shape[1], stop - start, n_k)
                if p.device == store.sums.device:
                    store.add_mean(site.name, start, stop, p)
                else:  # reduce on the compute device before moving
                    store.add(site.name, start, stop, p.mean(1).to(dev))
        else:
            cstore = gen.cross_attention.get(site.name)
            if cstore is None:
                cstore = CrossAttentionStore(
                    site.name,
                    site.factor,
                    size,
                    torch.zeros(n_img, attn.heads, n_q, n_k, device=dev),
                    per_step=[] if self.cross_steps else None,
                    step_tokens=min(self._step_tokens, n_k),
                )
                gen.cross_attention[site.name] = cstore
            for start, stop, p in self._chunks(attn, q, k, rows, mask):
                p = p.view(n_img, n_halves, attn.heads, stop - start, n_k).mean(1)
                cstore.add(start, stop, p.to(dev), step=self._step)

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
        prompt: str | None = None,
        image_idx: int = 0,
        factors: Iterable[int] | None = None,
        direction: Direction | None = None,
        generation: int = -1,
        steps: Iterable[int] | None = None,
    ) -> GlobalHeatMap:
        """Heat maps of one generated image (``image_idx`` in the batch) of the last generation.

        ``prompt`` overrides the text used to look words up (default: the image's own prompt);
        ``factors`` restricts the captured resolutions used; ``generation`` picks an earlier call
        (a position in :attr:`generations`; earlier calls are kept with ``keep="all"``);
        ``steps`` restricts word maps to those denoising steps (needs ``cross_steps=True``).
        """
        gen = self.last_generation if generation == -1 else self._generation(generation)
        return gen.heat_map(
            image_idx,
            tokenizer=getattr(self.pipe, "tokenizer", None),
            prompt=prompt,
            factors=factors,
            direction=direction or self.direction,
            steps=steps,
        )

    def to_experiment(
        self,
        path: str | Path,
        images: list[Any] | None = None,
        seed: int | None = None,
        generation: int = -1,
        overwrite: bool = False,
        **info: Any,
    ) -> Path:
        """Save the last generation (maps, images, prompts, tokens, pipeline identity) to a folder.

        ``images`` defaults to the images the pipeline returned; ``seed`` and any extra keyword
        (JSON-serialisable) are recorded in the manifest. Reopen with :func:`daami2i.load_experiment`.
        """
        from ..storage.experiment import save_experiment

        gen = self.last_generation if generation == -1 else self._generation(generation)
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
        )

    def _generation(self, index: int) -> Generation:
        if not -len(self.generations) <= index < len(self.generations):
            raise QueryError(f"generation must be in [0, {len(self.generations) - 1}], got {index}")
        return self.generations[index]


trace = Trace

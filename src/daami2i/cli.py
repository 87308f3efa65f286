"""The ``daami2i`` command line: generate and trace, answer queries on saved experiments, inspect them.

    daami2i generate "a red circle and a blue square" -o outputs/shapes
    daami2i show outputs/shapes/experiment --word circle
    daami2i show outputs/shapes/experiment --box 2,2,8,8 --guide-word square -o box.png
    daami2i info outputs/shapes/experiment
    daami2i dataset prompts.txt -o outputs/dataset --words circle,square,triangle
    daami2i evaluate outputs/dataset/instances.json --gt truth.json

Exit codes: 0 success; 1 a failure while loading, generating or writing; 2 bad arguments or a
query that cannot be answered; 3 a missing or unreadable experiment folder. Errors are one line with
the fix; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit("the daami2i command line needs its extra: pip install 'daami2i[cli]'") from exc

from .errors import ConfigError, Daami2iError, QueryError, UnsupportedPipelineError

EXIT_FAILURE, EXIT_USAGE, EXIT_EXPERIMENT = 1, 2, 3
DEFAULT_MODEL = "shapes"
MODEL_DEFAULTS = {  # sampling defaults per built-in model: (steps, guidance)
    "shapes": (25, 4.0),
    "tiny": (20, 7.5),
}

app = typer.Typer(
    name="daami2i",
    help="Attention heat maps for Stable Diffusion: generate and trace, then query saved experiments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """An error the CLI reports as one line with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


_STATE = {"debug": False}  # set by the root callback for this invocation


def _debug() -> bool:
    return _STATE["debug"]


def friendly(func: F) -> F:
    """Turn expected exceptions into one line on stderr and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .storage.experiment import ExperimentError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            if _debug():
                raise
            if isinstance(exc, CliError):
                code = exc.code
            elif isinstance(exc, ExperimentError):
                code = EXIT_EXPERIMENT
            elif isinstance(exc, (QueryError, ConfigError, UnsupportedPipelineError)):
                code = EXIT_USAGE
            else:
                code = EXIT_FAILURE
            kind = "" if isinstance(exc, (CliError, Daami2iError)) else f"{type(exc).__name__}: "
            hint = "" if isinstance(exc, (CliError, Daami2iError)) else " (run with --debug for the traceback)"
            typer.echo(f"error: {kind}{exc}{hint}", err=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"daami2i {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """daami2i: where each word acts (cross-attention) and what each region is tied to (self-attention)."""
    ctx.obj = {"debug": debug}
    _STATE["debug"] = debug
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the terminal to our progress and results


# -- generate ---------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def _load_pipeline(model: str, device: str | None) -> Any:
    import torch
    from tqdm.auto import tqdm

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bar = tqdm(total=2, desc="load model", unit="stage", file=sys.stderr)
    try:
        if model == "shapes":
            from .shapes.model import load_pipeline

            pipe = load_pipeline()
        elif model == "tiny":
            from .testing import tiny_sd_pipeline

            pipe = tiny_sd_pipeline("sd2", sample_size=64)
        else:
            from diffusers import DiffusionPipeline

            local = Path(model).expanduser()
            if local.exists() and not (local / "model_index.json").is_file():
                raise CliError(f"{local} is not a diffusers pipeline folder (no model_index.json)", EXIT_USAGE)
            try:
                # half-precision weights run slowly (or not at all) on a CPU: load them as float32 there
                dtype = torch.float32 if torch.device(dev).type == "cpu" else None
                pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else model, dtype=dtype)
            except Exception as exc:
                offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
                hint = (
                    " (HF_HUB_OFFLINE is set: pass a local pipeline folder, or unset it to download)"
                    if offline
                    else " (pass a local pipeline folder or a valid hub id)"
                )
                raise CliError(f"could not load model {model!r}: {str(exc).splitlines()[0]}{hint}") from exc
        bar.update(1)
        pipe = pipe.to(dev)
        bar.update(1)
    finally:
        bar.close()
    return pipe


@app.command()
@friendly
def generate(
    prompt: str = typer.Argument(..., help="The text prompt."),
    model: str = typer.Option(
        DEFAULT_MODEL,
        "-m",
        "--model",
        help="A local pipeline folder, a hub id, 'shapes' (the embedded offline model: coloured circles, squares "
        "and triangles) or 'tiny' (random weights, for tests).",
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps [default: 25 for shapes, else 20]."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    height: int | None = typer.Option(None, "--height", help="Image height in pixels (multiple of 8)."),
    width: int | None = typer.Option(None, "--width", help="Image width in pixels (multiple of 8)."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Classifier-free guidance scale, <= 1 turns it off [default: 4 for shapes, else 7.5]."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder [default: outputs/<prompt>]."),
    device: str | None = typer.Option(None, "--device", help="torch device [default: cuda if available, else cpu]."),
    cross_steps: bool = typer.Option(False, "--cross-steps", help="Keep per-step word maps in the experiment."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier run in --out."),
) -> None:
    """Generate an image while tracing; write the image, one overlay per word, and the experiment."""
    import torch
    from tqdm.auto import tqdm

    from . import trace
    from .viz import plot_overlay, plot_word_grid

    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise CliError(f"--{name} must be a positive multiple of 8 (the VAE's scale), got {value}", EXIT_USAGE)
    out = out or Path("outputs") / _slug(prompt)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"{out} is not empty: choose another --out, or pass --overwrite to replace its files", EXIT_USAGE
        )
    default_steps, default_guidance = MODEL_DEFAULTS.get(model, (20, 7.5))
    steps = steps if steps is not None else default_steps
    guidance = guidance if guidance is not None else default_guidance
    pipe = _load_pipeline(model, device)
    pipe.set_progress_bar_config(desc="sampling", disable=False, file=sys.stderr)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    with trace(pipe, cross_steps=cross_steps) as trc:
        result = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            **size,
        )
    image = result.images[0]
    ghm = trc.compute_global_heat_map()
    words = ghm.words
    out.mkdir(parents=True, exist_ok=True)
    (out / "words").mkdir(exist_ok=True)
    with tqdm(total=len(words) + 3, desc="save", unit="file", file=sys.stderr) as bar:
        image.save(out / "image.png")
        bar.update(1)
        for word in words:
            fig, _ = plot_overlay(image, ghm.compute_word_heat_map(word), title=word)
            fig.savefig(out / "words" / f"{_slug(word)}.png", dpi=100, bbox_inches="tight")
            bar.update(1)
        fig, _ = plot_word_grid(image, ghm)
        fig.savefig(out / "words.png", dpi=80, bbox_inches="tight")
        bar.update(1)
        trc.to_experiment(out / "experiment", seed=seed, overwrite=overwrite, model_arg=model, steps=steps)
        bar.update(1)
    typer.echo(f"image:      {out / 'image.png'}")
    typer.echo(f"word maps:  {out / 'words'}/ ({', '.join(words)}) and {out / 'words.png'}")
    example = max(words, key=len)
    typer.echo(f"experiment: {out / 'experiment'}  (try: daami2i show {out / 'experiment'} --word {example})")


# -- show -------------------------------------------------------------------------------------------
def _numbers(text: str, what: str, count: int | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise CliError(f"{what} must be numbers separated by commas, got {text!r}", EXIT_USAGE) from None
    if count is not None and len(values) != count:
        raise CliError(f"{what} needs {count} numbers, got {len(values)} in {text!r}", EXIT_USAGE)
    return values


def _ints(values: list[float], what: str) -> list[int]:
    if any(v != int(v) for v in values):
        raise CliError(f"{what} takes integer latent coordinates, got {values}", EXIT_USAGE)
    return [int(v) for v in values]


@app.command()
@friendly
def show(
    experiment: Path = typer.Argument(..., help="An experiment folder (written by generate or Trace.to_experiment)."),
    word: str | None = typer.Option(None, "--word", help="A word of the prompt: its cross-attention map."),
    pixel: str | None = typer.Option(
        None, "--pixel", help="Latent pixels 'X,Y' (x = column), several as 'X,Y X,Y': their self-attention map."
    ),
    box: str | None = typer.Option(None, "--box", help="Latent box 'X1,Y1,X2,Y2' (X2, Y2 exclusive)."),
    contour: str | None = typer.Option(None, "--contour", help="Polygon in image pixels: 'x,y x,y x,y ...'."),
    guide_word: str | None = typer.Option(
        None, "--guide-word", help="Weight the --pixel/--box/--contour region by this word's map."
    ),
    merged: bool = typer.Option(False, "--merged", help="With --word: the word map refined by self-attention."),
    threshold: float | None = typer.Option(None, "--threshold", help="Draw the binary mask above this level."),
    image_idx: int = typer.Option(0, "--image", help="Which image of a batch."),
    direction: str = typer.Option("attended_by", "--direction", help="attended_by (columns) or attends_to (rows)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="PNG to write [default: inside the experiment]."),
) -> None:
    """Answer one query on a saved experiment, without the model, and write it as a PNG."""
    from . import load_experiment
    from .heatmaps import regions
    from .viz import plot_mask, plot_overlay, plot_region

    chosen = [n for n, v in (("--word", word), ("--pixel", pixel), ("--box", box), ("--contour", contour)) if v]
    if len(chosen) != 1:
        raise CliError(
            f"give exactly one of --word, --pixel, --box, --contour (got {', '.join(chosen) or 'none'})", EXIT_USAGE
        )
    if guide_word and word:
        raise CliError("--guide-word weights a --pixel/--box/--contour region; for a word use --merged", EXIT_USAGE)
    if merged and not word:
        raise CliError("--merged refines a --word map", EXIT_USAGE)
    exp = load_experiment(experiment)
    ghm = exp.compute_global_heat_map(image_idx=image_idx, direction=direction)  # type: ignore[arg-type]
    image = exp.images[image_idx] if exp.images else ghm.image_size
    guide = ghm.compute_word_heat_map(guide_word) if guide_word else None
    if word:
        hm: Any = ghm.compute_word_heat_map(word)
        label = f"word-{_slug(word)}"
        if merged:
            hm = ghm.compute_guided_heat_map(hm)
            label += "-merged"
    elif pixel:
        pairs = [_ints(_numbers(p, "--pixel", 2), "--pixel") for p in pixel.split()]
        gh, gw = ghm.grid_size
        bad = [p for p in pairs if not (0 <= p[0] < gw and 0 <= p[1] < gh)]
        if bad:
            raise CliError(f"--pixel {bad} is outside the {gh}x{gw} (height x width) latent grid", EXIT_USAGE)
        ids = [y * gw + x for x, y in pairs]
        if guide is None:
            hm = ghm.compute_pixel_heat_map(ids)
        else:
            hm = ghm.compute_region_heat_map(regions.pixel_weights(ids, ghm.grid_size) * guide.value)
            hm.region = {"kind": "pixels"}
        label = "pixel-" + "-".join(f"{x}x{y}" for x, y in pairs)
    elif box:
        x1, y1, x2, y2 = _ints(_numbers(box, "--box", 4), "--box")
        hm = ghm.compute_bbox_heat_map(x1, y1, x2, y2)
        if guide is not None:
            weights, region = hm.weights * guide.value, hm.region
            hm = ghm.compute_region_heat_map(weights)
            hm.region = region
        label = f"box-{x1}-{y1}-{x2}-{y2}"
    else:
        assert contour is not None
        pts = [_numbers(p, "--contour", 2) for p in contour.split()]
        h, w = ghm.image_size or (0, 0)
        hm = ghm.compute_contour_heat_map(pts, h, w, guide_heatmap=guide)
        label = "contour"
    if guide_word:
        label += f"-guided-{_slug(guide_word)}"
    if threshold is not None:
        label += f"-mask{threshold:g}"
    out = out or experiment / f"show-{label}.png"
    if threshold is not None:
        fig, _ = plot_mask(image, hm, threshold=threshold)
    elif word:
        fig, _ = plot_overlay(image, hm, title=word + (" (merged)" if merged else ""))
    else:
        fig, _ = plot_region(image, hm)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    v = hm.value
    typer.echo(
        f"wrote {out}  (map on the {v.shape[0]}x{v.shape[1]} grid, min {float(v.min()):.4g}, max {float(v.max()):.4g})"
    )


# -- info -------------------------------------------------------------------------------------------
@app.command()
@friendly
def info(experiment: Path = typer.Argument(..., help="An experiment folder.")) -> None:
    """What an experiment holds: prompts, sizes, resolutions, steps and store sizes."""
    from . import load_experiment

    exp = load_experiment(experiment)
    g, m = exp.generation, exp.manifest
    meta = m.get("info", {})
    mib = {k: v / 2**20 for k, v in m.get("nbytes", {}).items()}
    lines = [
        f"experiment  {experiment}",
        f"pipeline    {meta.get('pipeline')} ({meta.get('model') or 'built in'}), scheduler {meta.get('scheduler')}, "
        f"seed {meta.get('seed')}",
    ]
    for i, p in enumerate(g.image_prompts):
        lines.append(f"image {i}     {p!r}")
    lines += [
        f"image size  {g.image_size[0]}x{g.image_size[1]} (height x width)" if g.image_size else "image size  unknown",
        f"latent      {g.latent_size[0]}x{g.latent_size[1]}, grid {g.grid_size[0]}x{g.grid_size[1]}"
        if g.latent_size
        else "latent      unknown",
        f"steps       {g.steps_run} run, captured {g.steps_captured}",
        f"guidance    {'on' if g.cfg else 'off'}, halves kept: {g.halves}",
    ]
    for f, st in sorted(g.self_attention.items()):
        lines.append(f"self-attn   factor {f}: {st.size[0]}x{st.size[1]}, {len(st.layers)} layer(s)")
    factors: dict[int, list[str]] = {}
    for ct in g.cross_attention.values():
        factors.setdefault(ct.factor, []).append(ct.layer)
    for f, layers in sorted(factors.items()):
        per_step = any(g.cross_attention[n].per_step for n in layers)
        lines.append(f"cross-attn  factor {f}: {len(layers)} layer(s){', per step' if per_step else ''}")
    lines.append(
        f"stores      self {mib.get('self', 0):.1f} MiB, cross {mib.get('cross', 0):.1f} MiB, "
        f"per-step cross {mib.get('cross_steps', 0):.1f} MiB"
    )
    typer.echo("\n".join(lines))


# -- explore ----------------------------------------------------------------------------------------
@app.command()
@friendly
def explore(
    experiment: Path | None = typer.Argument(None, help="An experiment folder to open [default: none]."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="As for generate: 'shapes', a folder or a hub id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to your network)."),
    port: int = typer.Option(7860, "--port", help="Port of the web app."),
    device: str | None = typer.Option(None, "--device", help="torch device [default: cuda if available, else cpu]."),
) -> None:
    """Start the explorer web app: generate, click pixels, drag boxes, draw polygons, pick words."""
    from .explore import build_app, launch

    if experiment is not None and not (experiment / "manifest.json").is_file():
        raise CliError(f"{experiment} is not an experiment folder (no manifest.json)", EXIT_EXPERIMENT)
    pipe = _load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = MODEL_DEFAULTS.get(model, (20, 7.5))
    app_ = build_app(pipe, experiment, defaults={"steps": steps, "guidance": guidance})
    typer.echo(f"daami2i explorer on http://{host}:{port} (Ctrl+C stops it)")
    launch(app_, server_name=host, server_port=port, show_error=True, quiet=True)


# -- dataset / evaluate -----------------------------------------------------------------------------
@app.command()
@friendly
def dataset(
    prompts: Path = typer.Argument(..., help="A text file with one prompt per line ('#' starts a comment)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (a stopped run resumes in it)."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="As for generate: 'shapes', a folder or a hub id."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", "-k", min=1, help="Samples per prompt."),
    scheme: str = typer.Option("guided", "--scheme", help="raw, guided, cascade, repeated or diffused."),
    words: str | None = typer.Option(
        None,
        "--words",
        help="Comma-separated words to annotate where they occur [default: the embedded model's shapes (circle, "
        "square, triangle) for -m shapes, else nouns via spaCy].",
    ),
    method: str = typer.Option("tau", "--method", help="Mask threshold: tau (fixed) or otsu."),
    tau: float = typer.Option(0.4, "--tau", help="Threshold on the min-max normalised map for --method tau."),
    segmentation: str = typer.Option("auto", "--segmentation", help="auto (polygons unless holes), polygon or rle."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps [default: per model]."),
    guidance: float | None = typer.Option(None, "--guidance", help="Guidance scale [default: per model]."),
    seed: int = typer.Option(0, "--seed", help="Base seed; sample seeds are seed + image id."),
    experiments: bool = typer.Option(False, "--experiments", help="Also save each sample's experiment."),
    spacy_model: str | None = typer.Option(
        None, "--spacy-model", help="spaCy pipeline name or folder for nouns [default: en_core_web_sm/md/lg]."
    ),
    device: str | None = typer.Option(None, "--device", help="torch device [default: the process's device]."),
) -> None:
    """Generate a COCO detection / segmentation dataset from word maps (resumable; under
    `accelerate launch` every process takes its share of the prompts and the main one merges).

    Every option, the prompt file and the output folder are checked before the model loads and
    before anything is written; a folder made with other prompts or settings is refused.
    """
    from .datasets import (
        DatasetConfig,
        check_out,
        generate_shard,
        merge,
        model_identity,
        parse_words,
        prepare_out,
        read_prompts,
        settings_of,
        summary,
    )
    from .shapes import SHAPES

    prompt_list = read_prompts(prompts)
    vocabulary = parse_words(words)
    if vocabulary is None and spacy_model is None and model == "shapes":
        vocabulary = list(SHAPES)  # the embedded model knows three nouns: no spaCy needed
    default_steps, default_guidance = MODEL_DEFAULTS.get(model, (20, 7.5))
    config = DatasetConfig(
        images_per_prompt=images_per_prompt,
        scheme=scheme,
        method=method,
        tau=tau,
        segmentation=segmentation,
        seed=seed,
        steps=steps if steps is not None else default_steps,
        guidance=guidance if guidance is not None else default_guidance,
        save_experiments=experiments,
        spacy_model=spacy_model,
        model=model_identity(model),
    )
    settings = settings_of(config, vocabulary)  # checks every setting; loads spaCy when it finds the nouns
    check_out(out, prompt_list, settings)
    state = _distributed_state()
    pipe = _load_pipeline(model, device or (str(state.device) if state is not None else None))
    pipe.set_progress_bar_config(disable=True)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if rank == 0:
        prepare_out(out, prompt_list, settings)
    if state is not None:
        state.wait_for_everyone()
    made = generate_shard(pipe, prompt_list, out, config, vocabulary, rank=rank, world=world)
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        inst, caps = merge(out)
        typer.echo(f"{made} new sample(s) on this process; dataset: {inst} and {caps}")
        typer.echo(f"dataset holds {summary(out)}")


def _distributed_state() -> Any:
    """accelerate's process state when launched by `accelerate launch` (or torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        import torch
        from accelerate import PartialState
    except ImportError as exc:
        raise CliError("several processes need accelerate: pip install 'daami2i[datasets]'", EXIT_USAGE) from exc
    # without a GPU, accelerate only forms a process group of CPU workers when told to
    return PartialState(cpu=not torch.cuda.is_available())


@app.command()
@friendly
def evaluate(
    pred: Path = typer.Argument(..., help="Predictions: a COCO results list or an instances file."),
    gt: Path = typer.Option(..., "--gt", help="Ground-truth COCO instances file."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """COCO AP (segm, bbox) and mIoU of predictions against ground truth, per category and mean."""
    import json

    from .datasets import evaluate as run

    for path in (pred, gt):
        if not path.is_file():
            raise CliError(f"{path} does not exist", EXIT_USAGE)
    res = run(pred, gt)
    typer.echo(f"segm AP {res['segm_AP']:.3f} (AP50 {res['segm_AP50']:.3f}), mIoU {res['segm_mIoU']:.3f}")
    typer.echo(f"bbox AP {res['bbox_AP']:.3f} (AP50 {res['bbox_AP50']:.3f}), mIoU {res['bbox_mIoU']:.3f}")
    for name, v in sorted(res["per_category"].items()):
        typer.echo(f"  {name:20} segm IoU {v.get('segm_IoU', 0):.3f}  bbox IoU {v.get('bbox_IoU', 0):.3f}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

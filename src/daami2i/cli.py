"""The ``daami2i`` command line: generate and trace, answer queries on saved experiments, inspect them.

    daami2i generate "a red circle and a blue square" -o outputs/shapes
    daami2i show outputs/shapes/experiment --word circle
    daami2i show outputs/shapes/experiment --box 2,2,8,8 --guide-word square -o box.png
    daami2i info outputs/shapes/experiment
    daami2i dataset prompts.txt -o outputs/dataset --words circle,square,triangle
    daami2i evaluate outputs/dataset/instances.json --gt truth.json

Exit codes: 0 success; 1 a failure while loading, generating or writing; 2 bad arguments or a
query that cannot be answered; 3 a missing or unreadable experiment folder. Errors are one line with
the fix; ``--debug`` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
import secrets
import shutil
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit("the daami2i command line needs its extra: pip install 'daami2i[cli]'") from exc

from .errors import ConfigError, Daami2iError, QueryError, UnsupportedPipelineError
from .sampling import GUIDANCE_MAX, SEED_LIMIT, STEPS_MAX

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
    # plain click help: Rich markup would eat the "[default: ...]" of our help texts and label every
    # flag "<bool>" although flags take no value
    rich_markup_mode=None,
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


DEBUG_HELP = "Show full tracebacks instead of one-line errors."


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A warning as one line, ``warning: ...``, on its own line even while a progress bar is drawn
    (Python's format names a source line of torch's, which tells the user nothing)."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def friendly(func: F) -> F:
    """Turn expected exceptions into one line on stderr and a meaningful exit code.

    The command also gets a ``--debug`` flag, so that ``daami2i show ... --debug`` works as well as
    ``daami2i --debug show ...``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        from .errors import ExperimentError

        if debug:
            _STATE["debug"] = True
        try:
            with warnings.catch_warnings():
                if not _debug():
                    warnings.showwarning = _show_warning
                return func(*args, **kwargs)
        except (typer.Exit, BrokenPipeError):  # (click ends a broken pipe, `... | head`, quietly)
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

    # typer reads the parameters from the signature: the command's own, plus --debug
    signature = inspect.signature(func)
    debug_param = inspect.Parameter(
        "debug",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--debug", help=DEBUG_HELP),
        annotation="bool",
    )
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), debug_param]
    )
    wrapper.__annotations__ = {**func.__annotations__, "debug": "bool"}
    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"daami2i {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """daami2i: where each word acts (cross-attention) and what each region is tied to (self-attention)."""
    ctx.obj = {"debug": debug}
    _STATE["debug"] = debug
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the terminal to our progress and results


# -- generate ---------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    """A file-name form of ``text`` that keeps its letters (``café``) and names pictographs by code point
    (``🙂`` -> ``u1f642``), so that different words get different files.

    >>> _slug("A café, 🙂!"), _slug("...")
    ('a-café-u1f642', 'prompt')
    """
    parts = [
        ch if ch.isalnum() else (f"-u{ord(ch):x}-" if unicodedata.category(ch) == "So" else "-") for ch in text.lower()
    ]
    return re.sub(r"-+", "-", "".join(parts)).strip("-")[:60].strip("-") or "prompt"


def _unique_names(words: list[str]) -> dict[str, str]:
    """A distinct file stem per word: its slug, with ``-2``, ``-3`` ... where two slugs collide.

    >>> _unique_names(["cat", "Cat!", "dog"])
    {'cat': 'cat', 'Cat!': 'cat-2', 'dog': 'dog'}
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for w in words:
        stem, n = _slug(w), 1
        name = stem
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out[w] = name
    return out


def _device(device: str | None) -> str:
    """The torch device to use: ``device`` checked (before any model is loaded), or cuda / cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise CliError(
            f"--device {device!r} is not a torch device ({str(exc).splitlines()[0]}): use cpu, cuda or cuda:N",
            EXIT_USAGE,
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CliError(f"--device {device}: this torch sees no CUDA device; use --device cpu", EXIT_USAGE)
        if dev.index is not None and dev.index >= count:
            raise CliError(f"--device {device}: only {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})", EXIT_USAGE)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available here; use --device cpu", EXIT_USAGE)
    return device


def _load_pipeline(model: str, device: str | None) -> Any:
    import torch
    from tqdm.auto import tqdm

    from .quiet import quiet_loading

    dev = _device(device)
    bar = tqdm(total=2, desc="load model", unit="stage", file=sys.stderr)
    try:
        with quiet_loading():
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


def _check_generate_options(
    prompt: str, seed: int, height: int | None, width: int | None, guidance: float | None, steps: int | None = None
) -> None:
    """Everything about generate's options that can be checked without the model (exit code 2)."""
    from .heatmaps.words import is_word

    if not is_word(prompt):
        raise CliError(
            f"the prompt {prompt!r} has no words: give a prompt with at least one word (maps are made per word)",
            EXIT_USAGE,
        )
    if not 0 <= seed < SEED_LIMIT:
        raise CliError(f"--seed must be an integer from 0 to 2**64 - 1, got {seed}", EXIT_USAGE)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise CliError(f"--{name} must be a positive multiple of 8 (the VAE's scale), got {value}", EXIT_USAGE)
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= GUIDANCE_MAX):
        raise CliError(
            f"--guidance must be a number from 0 to {GUIDANCE_MAX:g} (the classifier-free guidance scale, e.g. 7.5; "
            f"<= 1 turns guidance off), got {guidance}",
            EXIT_USAGE,
        )
    if steps is not None and not 1 <= steps <= STEPS_MAX:
        raise CliError(
            f"--steps must be from 1 to {STEPS_MAX} (the schedulers of Stable Diffusion models have 1000 training "
            f"timesteps), got {steps}",
            EXIT_USAGE,
        )


def _pipeline_class_of(model: str) -> Any | None:
    """The pipeline class ``model`` loads, where it is known without loading: the built-in models, or a
    local folder's ``model_index.json`` (its ``_class_name``, a diffusers class); None for a hub id or
    a folder whose class cannot be told (loading it then reports what is wrong)."""
    import json

    if model in ("shapes", "tiny"):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        import diffusers

        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # an optional dependency of that class is missing
        return None
    return cls if isinstance(cls, type) else None


def _check_pipeline_options(
    video: bool, what: str, num_frames: int | None, height: int | None, width: int | None
) -> None:
    """generate's options that depend on whether the pipeline (``what``: its class name) makes videos."""
    if num_frames is not None and not video:
        raise CliError(f"--num-frames is for video pipelines; {what} is an image pipeline", EXIT_USAGE)
    if video and (height is None) != (width is None):
        raise CliError("a video pipeline needs both --height and --width (or neither)", EXIT_USAGE)


def _pipeline_is_video(
    pipe_or_class: Any, model: str, num_frames: int | None, height: int | None, width: int | None
) -> bool:
    """Whether the pipeline (an instance, or the class ``_pipeline_class_of`` found) makes videos (its
    call takes ``num_frames``), with the options that depend on it checked (exit code 2)."""
    from .video import is_video_pipeline

    video = is_video_pipeline(pipe_or_class)
    cls = pipe_or_class if isinstance(pipe_or_class, type) else type(pipe_or_class)
    _check_pipeline_options(video, f"{model} ({cls.__name__})", num_frames, height, width)
    return video


def _check_video_options(num_frames: int | None, fps: float, video_format: str) -> None:
    """generate's video options, checked before the model loads (exit code 2)."""
    if num_frames is not None and not 1 <= num_frames <= 10_000:
        raise CliError(f"--num-frames must be from 1 to 10000, got {num_frames}", EXIT_USAGE)
    if not (math.isfinite(fps) and 0 < fps <= 240):
        raise CliError(f"--fps must be a number in (0, 240] (frames per second), got {fps}", EXIT_USAGE)
    if video_format not in VIDEO_FORMATS:
        raise CliError(f"--video-format must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}", EXIT_USAGE)


VIDEO_FORMATS = ("auto", "mp4", "gif", "png")


def _video_suffix(video_format: str) -> str:
    """The file suffix of generate's videos ('' for a PNG folder); auto is MP4, or GIF without ffmpeg."""
    from .video import video_suffix

    if video_format == "auto":
        return video_suffix()
    return "" if video_format == "png" else f".{video_format}"


def _video_guidance(pipe: Any, guidance: float, given: bool) -> dict[str, Any]:
    """The guidance argument of a video pipeline's call: ``guidance_scale`` where its ``__call__`` takes
    one; a pipeline whose guider holds the scale (HunyuanVideo 1.5) gets it set there when ``--guidance``
    was given, else keeps its own."""
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "guidance_scale" in params:
        return {"guidance_scale": guidance}
    guider = getattr(pipe, "guider", None)
    if given:
        if guider is None or not hasattr(guider, "guidance_scale"):
            raise CliError(f"{type(pipe).__name__} takes no guidance scale: leave --guidance out")
        guider.guidance_scale = guidance
    return {}


def _generate_video(
    pipe: Any,
    stage: Path,
    prompt: str,
    call: dict[str, Any],
    *,
    cross_steps: bool,
    fps: float,
    suffix: str,
    seed: int,
    model: str,
    steps: int,
) -> tuple[list[str], dict[str, str], int]:
    """Trace a video pipeline's call; write the video, one overlay video per word, a picture of every
    word's overlays (``words.png``: a row of frames per word) and the experiment (with its frames)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from . import trace
    from .video import (
        heat_map_overlays,
        labelled_rows,
        save_experiment_frames,
        strip,
        strip_indices,
        video_frames_of,
        write_video,
    )

    with trace(pipe, cross_steps=cross_steps) as trc:
        result = pipe(prompt=prompt, **call)
    frames = video_frames_of(result)  # (T, H, W, 3) uint8
    ghm = trc.compute_global_heat_map()
    words = ghm.words
    if not words:
        raise CliError(f"the prompt {prompt!r} has no words the text encoder saw; nothing was written")
    (stage / "words").mkdir()
    names = _unique_names(words)
    rows = []
    with tqdm(total=len(words) + 3, desc="save", unit="file", file=sys.stderr) as bar:
        write_video(frames, stage / f"video{suffix}", fps)
        bar.update(1)
        for word in words:
            overlays = heat_map_overlays(ghm.compute_word_heat_map(word), frames)  # (T, H, W, 3)
            write_video(overlays, stage / "words" / f"{names[word]}{suffix}", fps)
            rows.append(strip(overlays))
            bar.update(1)
        shown = strip_indices(len(frames))
        Image.fromarray(labelled_rows(rows, words, shown)).save(stage / "words.png")
        bar.update(1)
        trc.to_experiment(stage / "experiment", seed=seed, model_arg=model, steps=steps, fps=fps)
        save_experiment_frames(frames, stage / "experiment")
        bar.update(1)
    return words, names, len(frames)


def _image_size(pipe: Any, height: int | None, width: int | None) -> dict[str, int]:
    """Both sides for the pipeline (diffusers ignores a width given without a height): the missing one is
    the model's default size."""
    if height is None and width is None:
        return {}
    if height is None or width is None:
        from .tracing.trace import denoiser_of

        latent = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe)[0].config.sample_size
        default = int(latent) * int(getattr(pipe, "vae_scale_factor", 8))
        height, width = height or default, width or default
    return {"height": height, "width": width}


def _check_out_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder: choose a folder for the run's files", EXIT_USAGE)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"{out} is not empty: choose another --out, or pass --overwrite to replace its files", EXIT_USAGE
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` to write a run into; moved into place only on success.

    On any failure (or Ctrl+C) the sibling, and any parent folder made for it, is removed, so ``out``
    never holds a half-written run. Into an existing non-empty ``out`` (``--overwrite``) each new
    entry replaces the one of the same name; other files there are kept.
    """
    out = Path(os.path.abspath(out))
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it private) so that the folder gets the umask's permissions
    stage = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        stage.mkdir()
    except OSError as exc:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise CliError(f"cannot write into {out.parent}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        yield stage
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            stage.rename(out)
        else:
            for entry in sorted(stage.iterdir()):
                _remove(out / entry.name)
                entry.rename(out / entry.name)
            stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in made:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


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
    seed: int = typer.Option(0, "--seed", help="Random seed, 0 to 2**64 - 1."),
    height: int | None = typer.Option(None, "--height", help="Image height in pixels (multiple of 8)."),
    width: int | None = typer.Option(None, "--width", help="Image width in pixels (multiple of 8)."),
    guidance: float | None = typer.Option(
        None,
        "--guidance",
        help="Classifier-free guidance scale (finite, >= 0), <= 1 turns it off [default: 4 for shapes, else 7.5].",
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder [default: outputs/<prompt>]."),
    device: str | None = typer.Option(None, "--device", help="torch device [default: cuda if available, else cpu]."),
    cross_steps: bool = typer.Option(False, "--cross-steps", help="Keep per-step word maps in the experiment."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier run in --out."),
    num_frames: int | None = typer.Option(
        None, "--num-frames", "--frames", help="Video pipelines: frames to generate [default: the pipeline's]."
    ),
    fps: float = typer.Option(8.0, "--fps", help="Video pipelines: frames per second of the written videos."),
    video_format: str = typer.Option(
        "auto",
        "--video-format",
        help="Video pipelines: mp4, gif, png (a folder of frames) or auto (mp4, gif without ffmpeg).",
    ),
) -> None:
    """Generate an image (or a video) while tracing; write it, one overlay per word, and the experiment.

    A video pipeline (Wan, CogVideoX) writes video.mp4 (GIF without ffmpeg), words/<word>.mp4 and
    words.png (a row of frames per word). Every option is checked before the model is loaded, those
    that depend on whether it makes videos (--num-frames, --height without --width) too where its
    class is known without loading it (shapes, tiny, a local folder's model_index.json); for a hub id
    they are checked once it is loaded, before it runs. The run is written into a temporary folder
    beside --out and moved into place at the end, so a failure leaves --out as it was.
    """
    import torch
    from tqdm.auto import tqdm

    from . import trace
    from .video import video_call
    from .viz import plot_overlay, plot_word_grid

    _check_generate_options(prompt, seed, height, width, guidance, steps)
    _check_video_options(num_frames, fps, video_format)
    known = _pipeline_class_of(model)
    if known is not None:
        _pipeline_is_video(known, model, num_frames, height, width)
    out = out or Path("outputs") / _slug(prompt)
    _check_out_folder(out, overwrite)
    dev = _device(device)
    default_steps, default_guidance = MODEL_DEFAULTS.get(model, (20, 7.5))
    steps = steps if steps is not None else default_steps
    given_guidance = guidance is not None
    guidance = guidance if guidance is not None else default_guidance
    with _staged(out, overwrite) as stage:
        pipe = _load_pipeline(model, dev)
        video = _pipeline_is_video(pipe, model, num_frames, height, width)
        pipe.set_progress_bar_config(desc="sampling", disable=False, file=sys.stderr)
        if video:
            suffix = _video_suffix(video_format)
            call = {
                "num_inference_steps": steps,
                **_video_guidance(pipe, guidance, given_guidance),
                "generator": torch.Generator(device="cpu").manual_seed(seed),
                **({"height": height, "width": width} if height is not None else {}),
                **video_call(pipe, num_frames),
            }
            words, names, n_frames = _generate_video(
                pipe,
                stage,
                prompt,
                call,
                cross_steps=cross_steps,
                fps=fps,
                suffix=suffix,
                seed=seed,
                model=model,
                steps=steps,
            )
        else:
            size = _image_size(pipe, height, width)
            with trace(pipe, cross_steps=cross_steps) as trc:
                result = pipe(
                    prompt=prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    **size,
                )
            image = result.images[0]
            ghm = trc.compute_global_heat_map()
            words = ghm.words
            if not words:
                raise CliError(f"the prompt {prompt!r} has no words the text encoder saw; nothing was written")
            (stage / "words").mkdir()
            names = _unique_names(words)
            with tqdm(total=len(words) + 3, desc="save", unit="file", file=sys.stderr) as bar:
                image.save(stage / "image.png")
                bar.update(1)
                for word in words:
                    fig, _ = plot_overlay(image, ghm.compute_word_heat_map(word), title=word)
                    fig.savefig(stage / "words" / f"{names[word]}.png", dpi=100, bbox_inches="tight")
                    bar.update(1)
                fig, _ = plot_word_grid(image, ghm)
                fig.savefig(stage / "words.png", dpi=80, bbox_inches="tight")
                bar.update(1)
                trc.to_experiment(stage / "experiment", seed=seed, model_arg=model, steps=steps)
                bar.update(1)
    if video:
        kind = f"{n_frames} frames at {fps:g} fps" + (" (PNG folder)" if not suffix else "")
        typer.echo(f"video:      {out / ('video' + suffix)}  ({kind})")
        files = ", ".join(f"{names[w]}{suffix}" if names[w] == w else f"{names[w]}{suffix} ({w})" for w in words)
        typer.echo(f"word maps:  {out / 'words'}/ {files}; all words: {out / 'words.png'}")
        example = max(words, key=len)
        typer.echo(f"experiment: {out / 'experiment'}  (try: daami2i show {out / 'experiment'} --word {example})")
        return
    typer.echo(f"image:      {out / 'image.png'}")
    files = ", ".join(f"{names[w]}.png" if names[w] == w else f"{names[w]}.png ({w})" for w in words)
    typer.echo(f"word maps:  {out / 'words'}/ {files}; all words: {out / 'words.png'}")
    example = max(words, key=len)
    typer.echo(f"experiment: {out / 'experiment'}  (try: daami2i show {out / 'experiment'} --word {example})")


# -- show -------------------------------------------------------------------------------------------
def _numbers(text: str, what: str, count: int | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise CliError(f"{what} must be numbers separated by commas, got {text!r}", EXIT_USAGE) from None
    if not all(math.isfinite(v) for v in values):
        raise CliError(f"{what} must be finite numbers, got {text!r}", EXIT_USAGE)
    if count is not None and len(values) != count:
        raise CliError(f"{what} needs {count} numbers, got {len(values)} in {text!r}", EXIT_USAGE)
    return values


def _ints(values: list[float], what: str) -> list[int]:
    if any(v != int(v) for v in values):
        raise CliError(f"{what} takes integer latent coordinates, got {values}", EXIT_USAGE)
    return [int(v) for v in values]


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not (math.isfinite(threshold) and 0 < threshold < 1):
        raise CliError(
            f"--threshold must be a number strictly between 0 and 1 (it cuts the map min-max normalised to "
            f"[0, 1]; 0 or 1 would give an all-full or all-empty mask), got {threshold}",
            EXIT_USAGE,
        )


def _output_file(out: str | None, folder: Path, name: str) -> Path:
    """Where show writes: ``folder / name`` by default; inside ``out`` when it is a folder (existing,
    or written with a trailing slash); else ``out``, with ``.png`` added when it has no extension."""
    if out is None:
        return folder / name
    path = Path(out).expanduser()
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / name
    if not path.suffix:
        return path.with_name(path.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix[1:].lower() not in formats:
        raise CliError(
            f"-o {out}: {path.suffix!r} is not an image format matplotlib writes ({', '.join(formats)}); "
            f"use e.g. {path.with_suffix('.png')}, or end a folder name with /",
            EXIT_USAGE,
        )
    return path


@app.command()
@friendly
def show(
    experiment: Path = typer.Argument(..., help="An experiment folder (written by generate or Trace.to_experiment)."),
    word: str | None = typer.Option(None, "--word", help="A word of the prompt: its cross-attention map."),
    pixel: str | None = typer.Option(
        None, "--pixel", help="Latent pixels 'X,Y' (x = column), several as 'X,Y X,Y': their self-attention map."
    ),
    box: str | None = typer.Option(
        None,
        "--box",
        help="Latent box 'X1,Y1,X2,Y2' (x = column), both corners included: columns X1..X2, rows Y1..Y2 "
        "(X2 = width or Y2 = height is clipped to the last column / row).",
    ),
    half_open: bool = typer.Option(False, "--half-open", help="With --box: X2 and Y2 exclusive, like Python slices."),
    contour: str | None = typer.Option(None, "--contour", help="Polygon in image pixels: 'x,y x,y x,y ...'."),
    guide_word: str | None = typer.Option(
        None, "--guide-word", help="Weight the --pixel/--box/--contour region by this word's map."
    ),
    merged: bool = typer.Option(False, "--merged", help="With --word: the word map refined by self-attention."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Also draw the binary mask above this level (0 < T < 1, on the normalised map)."
    ),
    image_idx: int = typer.Option(0, "--image", help="Which image of a batch."),
    frame: int | None = typer.Option(
        None,
        "--frame",
        help="Video experiments: the video frame a --pixel/--box/--contour is in [default: the same place in every "
        "frame].",
    ),
    fps: float = typer.Option(8.0, "--fps", help="Video experiments, -o *.gif / *.mp4: frames per second."),
    direction: str = typer.Option("attended_by", "--direction", help="attended_by (columns) or attends_to (rows)."),
    out: str | None = typer.Option(
        None,
        "-o",
        "--out",
        metavar="PATH",
        help="File to write (.png unless another extension is given); a folder (existing, or ending in /) "
        "gets the default name [default: show-<query>.png inside the experiment].",
    ),
) -> None:
    """Answer one query on a saved experiment, without the model, and write it as a PNG.

    On a video experiment the PNG is a strip of frames (up to 8, evenly spaced) with the map over each;
    -o *.gif or *.mp4 writes every frame as a video. Latent coordinates are of one frame's grid.
    """
    from . import load_experiment
    from .heatmaps import regions
    from .viz import plot_overlay, plot_overlay_with_mask, plot_region

    chosen = [n for n, v in (("--word", word), ("--pixel", pixel), ("--box", box), ("--contour", contour)) if v]
    if len(chosen) != 1:
        raise CliError(
            f"give exactly one of --word, --pixel, --box, --contour (got {', '.join(chosen) or 'none'})", EXIT_USAGE
        )
    if guide_word and word:
        raise CliError("--guide-word weights a --pixel/--box/--contour region; for a word use --merged", EXIT_USAGE)
    if merged and not word:
        raise CliError("--merged refines a --word map", EXIT_USAGE)
    if half_open and not box:
        raise CliError("--half-open changes how --box reads its corners; give a --box", EXIT_USAGE)
    _check_threshold(threshold)
    if not (math.isfinite(fps) and 0 < fps <= 240):
        raise CliError(f"--fps must be a number in (0, 240] (frames per second), got {fps}", EXIT_USAGE)
    exp = load_experiment(experiment)
    ghm = exp.compute_global_heat_map(image_idx=image_idx, direction=direction)  # type: ignore[arg-type]
    video = ghm.frames is not None
    if frame is not None and not video:
        raise CliError("--frame is for video experiments; this experiment is of an image", EXIT_USAGE)
    if frame is not None and not (pixel or box or contour):
        raise CliError("--frame places a --pixel/--box/--contour region in one video frame", EXIT_USAGE)
    if video:
        frames = _experiment_video(exp, ghm)
        image: Any = None
    else:
        images = exp.images  # (read once: each access opens and checks the PNGs)
        image = images[image_idx] if images else ghm.image_size
    at: dict[str, Any] = {"frame": frame} if video else {}  # video queries take the frame; images unchanged
    guide = ghm.compute_word_heat_map(guide_word) if guide_word else None
    if word:
        hm: Any = ghm.compute_word_heat_map(word)
        label = f"word-{_slug(word)}"
        if merged:
            hm = ghm.compute_guided_heat_map(hm)
            label += "-merged"
    elif pixel:
        pairs = [_ints(_numbers(p, "--pixel", 2), "--pixel") for p in pixel.split()]
        gh, gw = ghm.frame_size if video else ghm.grid_size
        bad = [p for p in pairs if not (0 <= p[0] < gw and 0 <= p[1] < gh)]
        if bad:
            raise CliError(f"--pixel {bad} is outside the {gh}x{gw} (height x width) latent grid", EXIT_USAGE)
        ids = [y * gw + x for x, y in pairs]
        if guide is None:
            hm = ghm.compute_pixel_heat_map(ids, **at)
        elif video:
            hm = ghm.compute_region_heat_map(ghm.compute_pixel_heat_map(ids, **at).weights * guide.value)
            hm.region = {"kind": "pixels"}
        else:
            hm = ghm.compute_region_heat_map(regions.pixel_weights(ids, ghm.grid_size) * guide.value)
            hm.region = {"kind": "pixels"}
        label = "pixel-" + "-".join(f"{x}x{y}" for x, y in pairs)
    elif box:
        x1, y1, x2, y2 = _ints(_numbers(box, "--box", 4), "--box")
        hm = ghm.compute_bbox_heat_map(x1, y1, x2, y2, half_open=half_open, **at)
        if guide is not None:
            weights, region = hm.weights * guide.value, hm.region
            hm = ghm.compute_region_heat_map(weights)
            hm.region = region
        label = f"box-{x1}-{y1}-{x2}-{y2}"
    else:
        assert contour is not None
        pts = [_numbers(p, "--contour", 2) for p in contour.split()]
        h, w = (frames.shape[1:3] if video else ghm.image_size) or (0, 0)
        hm = ghm.compute_contour_heat_map(pts, h, w, guide_heatmap=guide, **at)
        label = "contour"
    if guide_word:
        label += f"-guided-{_slug(guide_word)}"
    if frame is not None:
        label += f"-frame{frame}"
    if threshold is not None:
        label += f"-mask{threshold:g}"
    if video:
        _show_video(hm, frames, out, exp.path, label, threshold, fps)
        return
    target = _output_file(out, exp.path, f"show-{label}.png")  # exp.path: OUT/experiment when given OUT
    if word:
        title = word + (" (merged)" if merged else "")
        if threshold is None:
            fig, _ = plot_overlay(image, hm, title=title)
        else:
            fig, _ = plot_overlay_with_mask(image, hm, threshold=threshold, title=title)
    else:
        title = f"self-attention ({hm.direction})" + (f"\nguided by '{guide_word}'" if guide_word else "")
        fig, _ = plot_region(image, hm, title=title, threshold=threshold)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100, bbox_inches="tight")
    v = hm.value
    typer.echo(
        f"wrote {target}  (map on the {v.shape[0]}x{v.shape[1]} grid, min {float(v.min()):.4g}, "
        f"max {float(v.max()):.4g})"
    )


def _experiment_video(exp: Any, ghm: Any) -> Any:
    """A video experiment's frames (uint8 (T, H, W, 3)): those saved with it, else mid-grey frames of its
    size (the maps are drawn over them)."""
    import numpy as np

    from .video import experiment_frames, frame_pixels_of

    frames = experiment_frames(exp)
    if frames is not None:
        return frames
    size = frame_pixels_of(ghm)
    if size is None:
        raise CliError(f"{exp.path} records neither its video frames nor their size: nothing to draw on")
    return np.full((ghm.frames.video_frames, *size, 3), 128, np.uint8)


def _picture_suffixes() -> list[str]:
    """The file suffixes Pillow can write an RGB picture to (``.png``, ``.jpg``, ``.webp`` ...)."""
    from PIL import Image

    Image.init()
    return sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def _video_output_file(out: str | None, folder: Path, name: str) -> tuple[Path, bool]:
    """Where show writes a video experiment's map, and whether as a video: ``-o *.gif`` / ``*.mp4``
    (every frame), else a picture (a strip of frames) that Pillow writes: ``folder / name`` by default,
    inside ``out`` when it is a folder, ``out`` with ``.png`` added when it has no suffix, else ``out``
    when Pillow writes its suffix; any other suffix is a usage error naming those that work."""
    if out is None:
        return folder / name, False
    path = Path(out).expanduser()
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / name, False
    if not path.suffix:
        return path.with_name(path.name + ".png"), False
    suffix = path.suffix.lower()
    if suffix in (".gif", ".mp4"):
        return path, True
    pictures = _picture_suffixes()
    if suffix not in pictures:
        raise CliError(
            f"-o {out}: {path.suffix!r} is neither a video (.gif, .mp4: every frame) nor a picture format Pillow "
            f"writes for the strip of frames ({', '.join(pictures)}); use e.g. {path.with_suffix('.png')}",
            EXIT_USAGE,
        )
    return path, False


def _show_video(
    hm: Any, frames: Any, out: str | None, folder: Path, label: str, threshold: float | None, fps: float
) -> None:
    """show's output for a video: a strip of frames (PNG), or every frame as a GIF / MP4 (-o *.gif / *.mp4)."""
    from PIL import Image

    from .video import heat_map_overlays, strip, strip_indices, write_video

    target, moving = _video_output_file(out, folder, f"show-{label}.png")
    overlays = heat_map_overlays(hm, frames, threshold=threshold)  # (T, H, W, 3) uint8
    if moving:
        target = write_video(overlays, target, fps)
        what = f"{len(overlays)} frames at {fps:g} fps"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip(overlays)).save(target)
        what = f"frames {strip_indices(len(overlays))} of {len(overlays)}"
    v = hm.value
    typer.echo(
        f"wrote {target}  ({what}; map on {hm.frames.token_frames} token frames of "
        f"{v.shape[0] // hm.frames.token_frames}x{v.shape[1]}, min {float(v.min()):.4g}, max {float(v.max()):.4g})"
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
        f"image size  {g.image_size[0]}x{g.image_size[1]} (height x width"
        + (f"; {g.frames.token_frames} token frames stacked)" if g.frames is not None else ")")
        if g.image_size
        else "image size  unknown",
        f"latent      {g.latent_size[0]}x{g.latent_size[1]}, grid {g.grid_size[0]}x{g.grid_size[1]}"
        if g.latent_size
        else "latent      unknown",
        f"steps       {g.steps_run} run, captured {g.steps_captured}",
        f"guidance    {'on' if g.cfg else 'off'}, halves kept: {g.halves}",
    ]
    if g.frames is not None:  # a video: the sizes above are of its token frames stacked
        lay = g.frames
        frame_h = g.image_size[0] // lay.token_frames if g.image_size else None
        size = f" of {frame_h}x{g.image_size[1]}" if g.image_size and frame_h else ""
        lines.insert(
            len(lines) - 2,
            f"video       {lay.video_frames} frames{size}, {lay.token_frames} token frames of "
            f"{lay.rows}x{g.grid_size[1]} ({lay.note})",
        )
    for f, st in sorted(g.self_attention.items()):
        pooled = f", cell means of {st.pool}x{st.pool} tokens" if st.pool > 1 else ""
        lines.append(f"self-attn   factor {f}: {st.size[0]}x{st.size[1]}, {len(st.layers)} layer(s){pooled}")
    factors: dict[int, list[str]] = {}
    for ct in g.cross_attention.values():
        factors.setdefault(ct.factor, []).append(ct.layer)
    for f, layers in sorted(factors.items()):
        per_step = any(g.cross_attention[n].per_step for n in layers)
        lines.append(f"cross-attn  factor {f}: {len(layers)} layer(s){', per step' if per_step else ''}")
    relations = g.config.get("relations") if isinstance(g.config, dict) else None
    if relations:
        lines.append(f"relations   {', '.join(str(r) for r in relations)}")
    lines.append(
        f"stores      self {mib.get('self', 0):.1f} MiB, cross {mib.get('cross', 0):.1f} MiB, "
        f"per-step cross {mib.get('cross_steps', 0):.1f} MiB, text queries {mib.get('text', 0):.1f} MiB"
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

    if experiment is not None:
        from . import load_experiment

        # the folder generate printed works too; a damaged folder exits 3 before the model loads
        experiment = load_experiment(experiment).path
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

    res = run(pred, gt)  # (it checks both files: missing, a folder, not JSON, not matching)
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

"""The daami2i explorer: a local web app (Gradio) to point at an image and see what it is tied to.

    daami2i explore                       # the embedded shapes model, http://127.0.0.1:7860
    daami2i explore outputs/shapes/experiment -m path/to/pipeline --port 7861

Generate from a prompt (Enter or "Generate"), open a saved experiment (the zip this page downloads,
or a folder on the command line: the prompt and settings fields then show the experiment's), or
attribute an uploaded image, then click the image: in ``point`` mode the clicked latent pixel's
self-attention map appears; dragging on the image (in ``point`` or ``box`` mode) makes a box, as do
two clicks in ``box`` mode; in ``polygon`` mode clicks add vertices (drags are ignored there, so that
a shaky click keeps them) and "close polygon" (enabled from 3 vertices) queries the contour (the
closed ones stay drawn and count for a multi-contour map until "clear polygons"). The selection is
drawn over the image and the map (a layer in the page, the pictures stay the API's). Changing mode
drops what is pending. The prompt's words are chips: one click shows the word's map, raw and refined
by self-attention, and the mask and boxes at the chosen threshold, in tabs beside the image. A colour
bar says what the colours mean: each map stretched to its own range, or a fixed scale that compares
maps. Every map comes from the public API on the finished trace (milliseconds; the model is not run
again). Overlays, the mask, the COCO annotation of the current mask and the experiment (a zip) can be
downloaded. An error leaves the panels as they were and says on the info line (and in a toast) what
to do.

Each browser session has its own state; generation requests are queued one at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import Daami2iError, QueryError
from .heatmaps import masks as M
from .heatmaps.maps import GlobalHeatMap, HeatMap
from .sampling import GUIDANCE_MAX, SEED_LIMIT, STEPS_MAX

DISPLAY = 512  # the image is shown at least this large (nearest-neighbour), clicks are mapped back
# The default prompt at this seed is drawn as asked by the embedded shapes model (a red circle and a
# blue square, nothing else; daami2i.shapes.checker): it is for 6 of the seeds 0-39 at 25 steps,
# guidance 4.
DEFAULT_SEED = 27
DEFAULT_PROMPT = "a red circle and a blue square"
SIDE_MAX = 4096  # image sides the explorer asks for (multiples of 8, the VAE's scale)
ZIP_MAX_BYTES = 8 * 2**30  # an uploaded experiment.zip may unpack to at most this much
ZIP_MAX_FILES = 10_000


@dataclass
class Session:
    """What one browser session is looking at."""

    image: Image.Image | None = None
    ghm: GlobalHeatMap | None = None  # every captured resolution: word maps, "all resolutions" refinement
    ghm_high: GlobalHeatMap | None = None  # self-attention at the highest resolution only: region queries
    experiment_dir: Path | None = None
    clicks: list[tuple[float, float]] = field(default_factory=list)  # image pixel coords of pending clicks
    polygons: list[list[list[float]]] = field(default_factory=list)
    last_map: np.ndarray | None = None  # (H, W) in [0, 1], the map shown last (as coloured)
    last_title: str = ""
    zip_path: str | None = None  # the experiment folder zipped for download, made once
    last_heat: HeatMap | None = None  # the map shown last, as the API gave it
    last_kind: str = "self-high"  # its scale under "fixed scale": "self-high", "self-all" or "word"
    selection: dict[str, Any] | None = None  # what the current map is of, drawn over the panels
    word_heats: tuple[HeatMap, HeatMap, str] | None = None  # raw, refined and the refined map's kind
    tops: dict[str, float] = field(default_factory=dict)  # the fixed scale's 1 per kind, made once
    settings: dict[str, Any] = field(default_factory=dict)  # prompt, seed, steps, guidance it was made with
    word_instances: tuple[list[M.Instance], str] | None = None  # the shown word's mask instances, and the word
    frames: np.ndarray | None = None  # a video's frames (T, H, W, 3) uint8; None for an image
    frame: int = 0  # the video frame shown (``image`` is that frame); region queries are in it


# -- rendering (pure functions, used by the app and its tests) -------------------------------------
def scale_of(image: Image.Image) -> int:
    """Integer up-scaling factor for display."""
    return max(1, DISPLAY // max(image.size))


def show(image: Image.Image) -> Image.Image:
    """The image enlarged by :func:`scale_of` with nearest-neighbour (pixels stay crisp)."""
    k = scale_of(image)
    return image.convert("RGB").resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """``heat`` ((H, W) in [0, 1], the image's size) coloured by ``cmap`` over ``image``, enlarged."""
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    out = Image.fromarray(np.round((1 - alpha) * rgb * 255 + alpha * colour * 255).astype(np.uint8))
    return show(out)


def mask_image(image: Image.Image, mask: np.ndarray, boxes: list[list[float]]) -> Image.Image:
    """The mask over the image, readable on any colour: the image as it is inside the mask, dimmed
    outside it, the mask's edge in cyan; the instances' boxes outlined in yellow; enlarged."""
    from PIL import ImageDraw

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    mask = np.asarray(mask, dtype=bool)
    rgb[~mask] *= 0.3
    inner = mask.copy()  # the pixels whose four neighbours are in the mask too
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    rgb[mask & ~inner] = (0, 255, 255)
    out = show(Image.fromarray(rgb.astype(np.uint8)))
    k = scale_of(image)
    draw = ImageDraw.Draw(out)
    for x, y, w, h in boxes:
        draw.rectangle((x * k, y * k, (x + w) * k - 1, (y + h) * k - 1), outline=(255, 255, 0), width=2)
    return out


def grid_of(ghm: GlobalHeatMap) -> tuple[int, int]:
    """The latent grid a click lands on: an image's grid, or one frame's grid of a video."""
    return ghm.frame_size if ghm.frames is not None else ghm.grid_size


def pixel_of(ghm: GlobalHeatMap, image: Image.Image, x: float, y: float) -> int:
    """The row-major latent pixel id under image pixel (x, y) (of one frame's grid for a video)."""
    gh, gw = grid_of(ghm)
    col = min(gw - 1, max(0, int(x * gw / image.width)))
    row = min(gh - 1, max(0, int(y * gh / image.height)))
    return row * gw + col


def expanded(heat: HeatMap, image: Image.Image) -> np.ndarray:
    """``heat`` at the image's size, stretched to [0, 1] (its minimum 0, its maximum 1)."""
    return heat.expand_as(image).numpy()


def at_frame(state: Session, heat: HeatMap, absolute: bool = False) -> np.ndarray:
    """``heat`` at the shown image's size (H, W): an image's map stretched to [0, 1] (or raw with
    ``absolute``); a video's map expanded over the whole video (one scale for every frame,
    ``expand_as``), at the shown frame."""
    assert state.image is not None
    if heat.frames is None:
        return heat.expand_as(state.image, absolute=absolute).numpy()
    size = (state.image.height, state.image.width)
    return heat.expand_as(size, absolute=absolute)[state.frame].numpy()


def mask_at(state: Session, heat: HeatMap, threshold: float) -> np.ndarray:
    """The mask (H, W) bool of ``heat`` at ``threshold`` at the shown image: an image's map stretched
    and cut (``masks.binarize``); a video's map cut on its scale over the whole video (as
    ``expand_as(frames, threshold=...)`` and the video dataset export), at the shown frame."""
    assert state.image is not None
    if heat.frames is None:
        return M.binarize(at_frame(state, heat), "tau", threshold)
    size = (state.image.height, state.image.width)
    return heat.expand_as(size, threshold=threshold)[state.frame].numpy() > 0.5


def _at(state: Session) -> dict[str, Any]:
    """The ``frame=`` of a region query: the shown frame of a video; nothing for an image."""
    return {"frame": state.frame} if state.frames is not None else {}


def set_frame(state: Session, frame: Any) -> Session:
    """Show video frame ``frame``: the image becomes that frame; the current map stays (its colours
    are those of the new frame). A QueryError for an image or a frame outside the video."""
    if state.frames is None:
        raise QueryError("the frame slider is for videos: this is an image")
    n = len(state.frames)
    t = _whole(frame, "frame", 0, n - 1)
    state.frame = t
    state.image = Image.fromarray(state.frames[t])
    return state


PEAK_QUANTILE = 0.9  # the fixed scale's 1 for self-attention maps: 9 in 10 pixels' maps peak below it


def pixel_top(ghm: GlobalHeatMap, quantile: float = PEAK_QUANTILE) -> float:
    """The fixed scale's 1 for self-attention maps: the ``quantile`` of the peaks of every single
    latent pixel's map. (Their largest peak is an outlier, a pixel attending to itself: on the shapes
    model 2.4 against a median of 0.14; box, polygon and word-guided maps are means of pixel maps and
    peak near the 90th percentile.)"""
    from .heatmaps import selfattn

    gh, gw = ghm.grid_size
    n = gh * gw
    device = ghm.self_levels[0].sums.device if ghm.self_levels else torch.device("cpu")
    peaks = []
    for start in range(0, n, 256):  # every pixel's map, a batch at a time
        ids = torch.arange(start, min(n, start + 256), device=device)
        w = torch.zeros(len(ids), n, device=device)
        w[torch.arange(len(ids), device=device), ids] = 1
        maps = selfattn.query(ghm.self_levels, w.view(-1, gh, gw), ghm.grid_size, ghm.direction)
        peaks.append(maps.flatten(1).amax(1).float().cpu())
    return float(torch.quantile(torch.cat(peaks), quantile))


def word_top(ghm: GlobalHeatMap) -> float:
    """The largest value of the prompt's raw word maps: the 1 of the fixed scale for word maps."""
    return max((float(ghm.compute_word_heat_map(w).value.max()) for w in ghm.words), default=0.0)


def fixed_top(state: Session, kind: str) -> float:
    """The fixed scale's 1 for maps of ``kind`` (``self-high``, ``self-all``, ``word``), made once."""
    if kind not in state.tops:
        assert state.ghm is not None and state.ghm_high is not None
        if kind == "word":
            top = word_top(state.ghm)
        else:
            top = pixel_top(state.ghm if kind == "self-all" else state.ghm_high)
        state.tops[kind] = top if math.isfinite(top) and top > 0 else 1.0
    return state.tops[kind]


def coloured(state: Session, heat: HeatMap, kind: str, fixed: bool) -> np.ndarray:
    """What colours ``heat`` at the image's size: stretched min-max, or on the fixed scale
    (0 = no attention, 1 = :func:`fixed_top` of its kind; values above are clipped)."""
    assert state.image is not None
    if not fixed:
        return at_frame(state, heat)
    raw = at_frame(state, heat, absolute=True)
    return np.clip(raw / fixed_top(state, kind), 0, 1)


JET_STOPS = "#000080, #0000ff, #0080ff, #16ffe1, #7dff7a, #e4ff13, #ff9400, #ff1e00, #800000"


def legend_html(state: Session, fixed: bool) -> str:
    """The colour bar under the maps, and what its 0 and 1 mean."""
    if fixed and state.ghm is not None:
        ones = [
            f"{fixed_top(state, 'self-high'):.3g} for self-attention maps (9 in 10 single latent pixels' maps peak "
            "below it)"
        ]
        if "self-all" in state.tops:
            ones.append(f"{state.tops['self-all']:.3g} for maps refined with every resolution")
        ones.append(f"{fixed_top(state, 'word'):.3g} for raw word maps (the most of this prompt's words)")
        text = (
            "<b>fixed scale</b>: 0 = no attention, 1 = " + "; ".join(ones) + ". The same colour is the same "
            "value in every map of this image; higher values are clipped. The mask threshold stays on the "
            "stretched map."
        )
    elif fixed:
        text = "<b>fixed scale</b>: 0 = no attention, 1 = a value 9 in 10 single pixels' maps peak below (shown "
        text += "once an image is open)."
    else:
        text = (
            "<b>stretched</b>: 0 = the lowest value of the map shown, 1 = its highest; every map is stretched "
            "to its own range, so colours do not compare across maps (tick 'fixed scale' for that)."
        )
    return (
        '<div class="daami2i-legend">'
        f'<div style="height:14px;border-radius:3px;background:linear-gradient(to right, {JET_STOPS})"></div>'
        '<div style="display:flex;justify-content:space-between;font-size:0.85em">'
        "<span>0</span><span>0.5</span><span>1</span></div>"
        f'<div style="font-size:0.85em">{text} Colours lie over the image at 50 %.</div></div>'
    )


def marks_of(state: Session) -> str:
    """The selection as JSON for the page's drawing layer (image pixel coordinates): the current
    map's point, box or polygons, the closed polygons, the pending clicks, and whether the map panel
    shows the selection's map (then it is drawn there too)."""
    if state.image is None:
        return "null"
    pending = [[x + 0.5, y + 0.5] for x, y in state.clicks]  # where the vertices will be once closed
    marks = {
        "size": [state.image.width, state.image.height],
        "selection": state.selection,
        "polygons": state.polygons,
        "pending": pending,
    }
    return json.dumps(marks)


def close_label(state: Session) -> str:
    """The "close polygon" button's text: the pending vertices, out of the 3 needed."""
    n = len(state.clicks)
    return f"close polygon ({n}/3 points)" if n < 3 else f"close polygon ({n} points)"


# -- actions (each returns what the UI shows) -----------------------------------------------------
def _session(image: Image.Image, source: Any, frames: np.ndarray | None = None) -> Session:
    """Heat maps of a finished trace or a loaded experiment: all resolutions, and the highest alone.
    A video's session holds its ``frames`` and shows frame 0."""
    gen = source.generation if hasattr(source, "generation") else source.last_generation
    finest = min(gen.self_attention) if gen.self_attention else None
    ghm = source.compute_global_heat_map()
    high = source.compute_global_heat_map(factors=[finest]) if finest is not None else ghm
    if frames is not None:
        image = Image.fromarray(frames[0])
    return Session(image=image, ghm=ghm, ghm_high=high, frames=frames)


def _guidance(value: Any) -> float:
    """The guidance scale from a form field, a finite number in [0, GUIDANCE_MAX], or a QueryError."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or not 0 <= scale <= GUIDANCE_MAX:
        raise QueryError(
            f"guidance must be a number from 0 to {GUIDANCE_MAX:g} (1 or less turns guidance off), got {value!r}"
        )
    return scale


def default_size(pipe: Any) -> tuple[int, int] | None:
    """The (height, width) the pipeline draws when none is asked for, or None where it cannot be told."""
    from .tracing.trace import denoiser_of

    try:
        latent = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe)[0].config.sample_size
        side = int(latent) * int(getattr(pipe, "vae_scale_factor", 8))
    except Exception:  # a pipeline without a readable config: the fields stay empty (the model's default)
        return None
    return side, side


def _side(value: Any, name: str) -> int | None:
    """An image side from a form field: empty is None (the model's default), else a multiple of 8."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    side = _whole(value, name, 8, SIDE_MAX)
    if side % 8:
        raise QueryError(f"{name} must be a multiple of 8 (the VAE's scale) from 8 to {SIDE_MAX}, got {value!r}")
    return side


FRAMES_MAX = 10_000  # frames one generation may ask for (as daami2i generate --num-frames)
FRAMES_DEFAULT = 17  # the explorer's frame count for a video pipeline: small, so a generation is quick


def generate(
    pipe: Any,
    state: Session,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    height: Any = None,
    width: Any = None,
    num_frames: int | None = None,
) -> Session:
    """Run the pipeline under the trace; the session then holds the image and its heat maps. An empty
    ``height`` or ``width`` is the model's default. A video pipeline (its call takes ``num_frames``:
    the pipeline's default where None) gives a video session, its frames saved in the experiment;
    it is called with the arguments ``daami2i generate`` gives it (:func:`daami2i.video.video_call`:
    frames as an array, CogVideoX's fixed text length)."""
    from . import trace
    from .video import is_video_pipeline, save_experiment_frames, video_call, video_frames_of

    if not prompt or not prompt.strip():
        raise QueryError("type a prompt first")
    n_steps = _whole(steps, "steps", 1, STEPS_MAX)
    n_seed = _whole(seed, "seed", 0, SEED_LIMIT - 1)
    scale = _guidance(guidance)
    h, w = _side(height, "height"), _side(width, "width")
    size: dict[str, Any] = {}
    if h is not None or w is not None:  # diffusers ignores a width given without a height
        default = default_size(pipe)
        if default is None and (h is None or w is None):
            raise QueryError("give both the height and the width (this model's default size is not known)")
        size = {"height": h or default[0], "width": w or default[1]}  # type: ignore[index]
    video = is_video_pipeline(pipe)
    if video:
        size.update(video_call(pipe, None if num_frames is None else _whole(num_frames, "frames", 1, FRAMES_MAX)))
    elif num_frames is not None:
        raise QueryError("the frame count is for video pipelines: this model makes images")
    with trace(pipe, self_factors="all") as trc:
        out = pipe(
            prompt=prompt,
            num_inference_steps=n_steps,
            guidance_scale=scale,
            generator=torch.Generator(device="cpu").manual_seed(n_seed),
            **size,
        )
    frames = video_frames_of(out) if video else None
    state = _session(out.images[0] if frames is None else Image.fromarray(frames[0]), trc, frames)
    state.experiment_dir = Path(tempfile.mkdtemp(prefix="daami2i-explore-")) / "experiment"
    trc.to_experiment(state.experiment_dir, seed=n_seed, steps=n_steps, guidance=scale)
    if frames is not None:
        save_experiment_frames(frames, state.experiment_dir)
    state.settings = {"prompt": prompt, "seed": n_seed, "steps": n_steps, "guidance": scale}
    return state


def word_chips(state: Session) -> list[str]:
    """The words to offer as chips: those the text encoder saw, as typed (``café``, emoji)."""
    if state.ghm is None or state.ghm.prompt_tokens is None:
        return []
    return state.ghm.words


def generated_note(state: Session) -> str:
    """The info line after a generation; it says where a prompt too long for the encoder was cut."""
    note = "generated; click the image or a word"
    cut = state.ghm.truncation if state.ghm is not None and state.ghm.prompt_tokens is not None else None
    return f"{note}. Note: {cut}" if cut else note


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """A whole number from a form field (``3`` or ``3.0``, not ``2.5``) in [low, high], or a QueryError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or v != int(v) or not low <= v <= high:
        raise QueryError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(v)


def attribute(pipe: Any, image: Image.Image, caption: str, seed: int = 0) -> Session:
    """Real-image attribution of an uploaded image with its caption (:func:`daami2i.trace_image`)."""
    from . import trace_image

    if image is None:
        raise QueryError("upload an image first")
    if not caption or not caption.strip():
        raise QueryError("type a caption of the image first")
    n_seed = _whole(seed, "seed", 0, SEED_LIMIT - 1)
    h, w = image.height - image.height % 8, image.width - image.width % 8
    image = image.convert("RGB").crop((0, 0, w, h))  # the VAE needs multiples of 8
    trc = trace_image(pipe, image, caption, generator=torch.Generator().manual_seed(n_seed), self_factors="all")
    state = _session(image, trc)
    state.experiment_dir = Path(tempfile.mkdtemp(prefix="daami2i-explore-")) / "experiment"
    trc.to_experiment(state.experiment_dir, seed=n_seed, kind="real image")
    state.settings = {"prompt": caption, "seed": n_seed}
    return state


def experiment_settings(exp: Any) -> dict[str, Any]:
    """What an experiment was made with, as far as its manifest says: prompt, seed, steps, guidance
    and image size (a key is missing where the manifest does not say)."""
    info = exp.manifest.get("info") or {}
    gen = exp.generation
    out: dict[str, Any] = {"prompt": exp.prompts[0] or ""}
    if isinstance(info.get("seed"), int):
        out["seed"] = info["seed"]
    steps = info.get("steps") if isinstance(info.get("steps"), int) else gen.steps_run
    if isinstance(steps, int) and steps > 0:
        out["steps"] = steps
    if isinstance(info.get("guidance"), (int, float)) and not isinstance(info.get("guidance"), bool):
        out["guidance"] = float(info["guidance"])
    if gen.image_size:
        h, w = (int(v) for v in gen.image_size)  # (height, width); a video's: its token frames stacked
        out["size"] = (h // gen.frames.token_frames, w) if gen.frames is not None else (h, w)
        if gen.frames is not None:
            out["frames"] = gen.frames.video_frames
    return out


def open_experiment(path: Path) -> Session:
    """A saved experiment folder (checked by :func:`daami2i.load_experiment`) as a session."""
    from . import load_experiment

    exp = load_experiment(path)
    if exp.generation.frames is not None:  # a video: its saved frames, else grey frames of its size
        from .video import VideoError, experiment_frames, frame_pixels_of

        try:
            frames = experiment_frames(exp)
        except VideoError as exc:
            raise QueryError(str(exc)) from None
        if frames is None:
            size = frame_pixels_of(exp.generation)
            if size is None:
                raise QueryError(f"{path} records neither its video frames nor their size")
            frames = np.full((exp.generation.frames.video_frames, *size, 3), 128, np.uint8)
        state = _session(Image.fromarray(frames[0]), exp, frames)
        state.experiment_dir = Path(exp.path)
        state.settings = experiment_settings(exp)
        return state
    images = exp.images
    if not images:
        raise QueryError(f"{path} holds no image: the explorer needs the experiment's image")
    state = _session(images[0], exp)
    state.experiment_dir = Path(exp.path)
    state.settings = experiment_settings(exp)
    return state


def unzip_experiment(zip_path: Path, into: Path) -> Path:
    """Unpack an uploaded experiment zip into the empty folder ``into``; returns the experiment folder.

    Every entry is checked before anything is written: no absolute path, no ``..``, no link, nothing
    that would land outside ``into``, at most :data:`ZIP_MAX_FILES` files and :data:`ZIP_MAX_BYTES`
    unpacked. A QueryError says what is wrong."""
    name = Path(zip_path).name
    into.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise QueryError(f"{name} is not a zip file ({exc}): open the experiment.zip this page downloads") from exc
    root = into.resolve()
    with zf:
        members = zf.infolist()
        if len(members) > ZIP_MAX_FILES or sum(m.file_size for m in members) > ZIP_MAX_BYTES:
            raise QueryError(
                f"{name} unpacks to more than {ZIP_MAX_FILES} files or {ZIP_MAX_BYTES // 2**30} GiB: not an experiment"
            )
        for m in members:
            parts = PurePosixPath(m.filename).parts
            target = (root / m.filename).resolve()
            if (
                PurePosixPath(m.filename).is_absolute()
                or "\\" in m.filename
                or ".." in parts
                or (parts and ":" in parts[0])
                or stat.S_ISLNK(m.external_attr >> 16)
                or not target.is_relative_to(root)
            ):
                raise QueryError(
                    f"{name} holds {m.filename!r}, a link or a path outside the zip's folder: refused, "
                    "nothing was opened"
                )
        try:
            for m in members:
                target = root / m.filename
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise QueryError(f"{name} is damaged ({exc}): download the experiment again") from exc
    if not (root / "manifest.json").exists():
        tops = [p for p in root.iterdir()]
        if len(tops) == 1 and tops[0].is_dir():  # a zip of the folder itself rather than of its contents
            return tops[0]
    return root


def open_zip(zip_path: Path, into: Path) -> Session:
    """An uploaded experiment zip, unpacked into ``into`` and loaded; errors name the zip, not the folder."""
    folder = unzip_experiment(zip_path, into)
    try:
        return open_experiment(folder)
    except Daami2iError as exc:
        msg = str(exc).replace(str(folder), Path(zip_path).name).replace(str(into), Path(zip_path).name)
        raise QueryError(f"{msg}; open the experiment.zip this page downloads") from exc


def click(state: Session, mode: str, x: float, y: float) -> Session:
    """A click on the image at image pixel (x, y)."""
    if state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    ghm, image = state.ghm_high, state.image
    if mode == "point":
        p = pixel_of(ghm, image, x, y)
        state.last_heat, state.last_kind = ghm.compute_pixel_heat_map([p], **_at(state)), "self-high"
        state.last_map = at_frame(state, state.last_heat)
        gh, gw = grid_of(ghm)
        row, col = p // gw, p % gw
        cell = [
            col * image.width / gw,
            row * image.height / gh,
            (col + 1) * image.width / gw,
            (row + 1) * image.height / gh,
        ]
        state.selection = {"kind": "point", "at": [x + 0.5, y + 0.5], "cell": cell}
        state.last_title = f"pixel {p} (row {row}, column {col})" + _in_frame(state)
    elif mode == "box":
        state.clicks.append((x, y))
        if len(state.clicks) == 2:
            (xa, ya), (xb, yb) = state.clicks
            return drag_box(state, xa, ya, xb, yb)
    elif mode == "polygon":
        state.clicks.append((x, y))
    else:
        raise QueryError(f"mode must be point, box or polygon, got {mode!r}")
    return state


def drag_box(state: Session, x0: float, y0: float, x1: float, y1: float) -> Session:
    """A box from image pixel (x0, y0) to (x1, y1), dragged or two corners clicked: the
    self-attention map of every latent cell it touches."""
    from .heatmaps import regions

    if state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    ghm, image = state.ghm_high, state.image
    gh, gw = grid_of(ghm)
    xa, xb = sorted((min(gw - 1, max(0, int(x0 * gw / image.width))), min(gw - 1, max(0, int(x1 * gw / image.width)))))
    ya, yb = sorted(
        (min(gh - 1, max(0, int(y0 * gh / image.height))), min(gh - 1, max(0, int(y1 * gh / image.height))))
    )
    box = (xa, ya, xb, yb)
    state.clicks = []
    state.last_heat, state.last_kind = ghm.compute_bbox_heat_map(*box, **_at(state)), "self-high"
    state.last_map = at_frame(state, state.last_heat)
    cx0, cy0, cx1, cy1 = regions.box_cells(*box, (gh, gw))
    sx, sy = image.width / gw, image.height / gh
    rect = [cx0 * sx, cy0 * sy, cx1 * sx, cy1 * sy]
    state.selection = {"kind": "box", "rect": rect}
    px = f"{rect[0]:g}-{rect[2]:g} across, {rect[1]:g}-{rect[3]:g} down"
    state.last_title = f"box {box}: the {cx1 - cx0} x {cy1 - cy0} latent cells under image pixels {px}"
    state.last_title += _in_frame(state)
    return state


def _in_frame(state: Session) -> str:
    """' in frame t' for a video's region query; '' for an image."""
    return f" in frame {state.frame}" if state.frames is not None else ""


def close_polygon(state: Session) -> Session:
    """Close the pending polygon and show the map of every closed polygon so far."""
    if state.ghm is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    if len(state.clicks) < 3:
        n = len(state.clicks)
        todo = "click 3 in polygon mode" if n == 0 else f"click {3 - n} more"
        raise QueryError(f"a polygon needs at least 3 vertices, got {n}: {todo}, then 'close polygon'")
    state.polygons.append([[x + 0.5, y + 0.5] for x, y in state.clicks])
    state.clicks = []
    h, w = state.image.height, state.image.width
    assert state.ghm_high is not None
    state.last_heat = state.ghm_high.compute_segmentation_heat_map(state.polygons, h, w, **_at(state))
    state.last_kind = "self-high"
    state.last_map = at_frame(state, state.last_heat)
    state.selection = {"kind": "polygons"}
    state.last_title = f"{len(state.polygons)} polygon(s)" + _in_frame(state)
    return state


def word(
    state: Session, w: str, iterations: int, threshold: float, all_resolutions: bool = False, fixed: bool = False
) -> tuple[np.ndarray, np.ndarray, list[M.Instance]]:
    """Raw and refined (self-attention guided ``iterations`` times, at the highest resolution or at
    every captured one) maps of a word as coloured (stretched, or on the fixed scale), and the
    stretched refined map's instances at ``threshold``; the refined map becomes the current map."""
    if state.ghm is None or state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    raw = state.ghm.compute_word_heat_map(w)
    refiner = state.ghm if all_resolutions else state.ghm_high
    refined: HeatMap = raw
    for _ in range(int(iterations)):
        refined = refiner.compute_guided_heat_map(refined)
    kind = "word" if int(iterations) == 0 else ("self-all" if all_resolutions else "self-high")
    state.word_heats = (raw, refined, kind)
    state.last_heat, state.last_kind, state.selection = refined, kind, None
    raw_x, ref_x = coloured(state, raw, "word", fixed), coloured(state, refined, kind, fixed)
    state.last_map = ref_x
    state.last_title = f"{w!r} refined x{int(iterations)} ({'all resolutions' if all_resolutions else 'highest'})"
    return raw_x, ref_x, M.instances(mask_at(state, refined, float(threshold)))


def word_at_frame(
    state: Session, threshold: float, fixed: bool = False
) -> tuple[np.ndarray, np.ndarray, list[M.Instance]] | None:
    """The shown word's raw and refined maps as coloured, and the refined map's instances at
    ``threshold``, at the shown frame (after the frame slider moved); None when no word is shown."""
    if state.word_heats is None or state.image is None:
        return None
    raw, refined, kind = state.word_heats
    raw_x, ref_x = coloured(state, raw, "word", fixed), coloured(state, refined, kind, fixed)
    return raw_x, ref_x, M.instances(mask_at(state, refined, float(threshold)))


def coco_of(state: Session, instances: list[M.Instance], category: str) -> dict[str, Any]:
    """A COCO instances file for the current image and instances."""
    assert state.image is not None
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, **inst.annotation()} for i, inst in enumerate(instances)]
    image = {"id": 1, "file_name": "image.png", "height": state.image.height, "width": state.image.width}
    return {"images": [image], "annotations": anns, "categories": [{"id": 1, "name": category}]}


# -- the app -----------------------------------------------------------------------------------------
# Gradio's image gives click events only: this script turns a drag on the image into a box, written
# to a hidden text box (image-pixel coordinates of the displayed picture) that the app listens to,
# and swallows the click that ends a drag. It also draws the selection (the hidden #marks box, JSON
# from marks_of) on a layer over the image and the map, and the box being dragged: the pictures
# themselves stay the API's, and a click re-sends no image.
DRAG_JS = """
() => {
  let start = null, dragged = false, live = null;
  const at = (e, img) => {
    const r = img.getBoundingClientRect();
    return [(e.clientX - r.left) * img.naturalWidth / r.width, (e.clientY - r.top) * img.naturalHeight / r.height];
  };
  const frac = (e, img) => {
    const r = img.getBoundingClientRect();
    return [(e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height];
  };
  document.addEventListener('dragstart', e => {
    if (e.target.closest && e.target.closest('#image')) e.preventDefault();
  }, true);
  document.addEventListener('mousedown', e => {
    const img = e.target.closest && e.target.closest('#image img');
    start = img ? [img, ...at(e, img), ...frac(e, img)] : null;
  }, true);
  document.addEventListener('mousemove', e => {
    if (!start) return;
    const [img, x0, y0, f0, g0] = start;
    const [x1, y1] = at(e, img);
    live = Math.hypot(x1 - x0, y1 - y0) < 6 ? null : [f0, g0, ...frac(e, img)];
  }, true);
  document.addEventListener('mouseup', e => {
    if (!start) return;
    const [img, x0, y0] = start;
    start = null;
    live = null;
    const [x1, y1] = at(e, img);
    if (Math.hypot(x1 - x0, y1 - y0) < 6) return;  // a click, not a drag
    dragged = true;
    const box = document.querySelector('#drag textarea, #drag input');
    box.value = [x0, y0, x1, y1].map(v => v.toFixed(1)).join(',') + ',' + Date.now();
    box.dispatchEvent(new Event('input', {bubbles: true}));
  }, true);
  document.addEventListener('click', e => {
    if (dragged && e.target.closest && e.target.closest('#image')) { e.stopPropagation(); e.preventDefault(); }
    dragged = false;
  }, true);

  const NS = 'http://www.w3.org/2000/svg';
  const layer = id => {
    let svg = document.getElementById(id);
    if (!svg) {
      svg = document.createElementNS(NS, 'svg');
      svg.id = id;
      svg.setAttribute('class', 'daami2i-marks');
      svg.style.cssText = 'position:absolute;pointer-events:none;z-index:20;overflow:visible;display:none';
      document.body.appendChild(svg);
    }
    return svg;
  };
  const add = (svg, tag, attrs, cls) => {
    for (const [stroke, width] of [['black', 3.5], [attrs.stroke || 'white', 1.75]]) {  // legible on any colour
      const el = document.createElementNS(NS, tag);
      const all = {...attrs, stroke, 'stroke-width': width, fill: 'none'};
      for (const [k, v] of Object.entries(all)) el.setAttribute(k, v);
      if (stroke !== 'black') el.setAttribute('class', cls);
      svg.appendChild(el);
    }
  };
  const draw = (svg, img, m, onMap, drag) => {
    const r = img && img.getBoundingClientRect();
    if (!r || !r.width || !r.height || !m) { svg.style.display = 'none'; return; }
    const mode = document.querySelector('#mode input:checked');
    if (mode && mode.value === 'polygon') drag = null;  // drags are ignored there: none is drawn
    Object.assign(svg.style, {display: '', left: (r.left + scrollX) + 'px', top: (r.top + scrollY) + 'px',
                              width: r.width + 'px', height: r.height + 'px'});
    svg.setAttribute('viewBox', `0 0 ${r.width} ${r.height}`);
    svg.replaceChildren();
    const kx = r.width / m.size[0], ky = r.height / m.size[1];
    const pts = ps => ps.map(([x, y]) => `${x * kx},${y * ky}`).join(' ');
    const rect = ([x0, y0, x1, y1], cls, extra = {}) => add(svg, 'rect',
      {x: x0 * kx, y: y0 * ky, width: (x1 - x0) * kx, height: (y1 - y0) * ky, ...extra}, cls);
    const s = m.selection;
    if (s && s.kind === 'point') {
      rect(s.cell, 'mark-cell');
      add(svg, 'circle', {cx: s.at[0] * kx, cy: s.at[1] * ky, r: 5}, 'mark-point');
    }
    if (s && s.kind === 'box') rect(s.box || s.rect, 'mark-box');
    if (!onMap || (s && s.kind === 'polygons'))
      for (const p of m.polygons) add(svg, 'polygon', {points: pts(p)}, 'mark-polygon');
    if (!onMap) {
      const pink = '#ff00ff';
      if (m.pending.length > 1) add(svg, 'polyline', {points: pts(m.pending), stroke: pink}, 'mark-pending-line');
      for (const [x, y] of m.pending) add(svg, 'circle', {cx: x * kx, cy: y * ky, r: 5, stroke: pink}, 'mark-pending');
    }
    if (drag) rect(drag.map((v, i) => v * m.size[i % 2]), 'mark-drag', {'stroke-dasharray': '6 4'});
  };
  let last = '';
  setInterval(() => {
    const box = document.querySelector('#marks textarea, #marks input');
    const text = box ? box.value : '';
    let m = null;
    try { m = text ? JSON.parse(text) : null; } catch (err) { m = null; }
    const img = document.querySelector('#image img'), heat = document.querySelector('#heat img');
    const rects = [img, heat].map(el => el ? JSON.stringify(el.getBoundingClientRect()) + el.src.length : '');
    const key = text + rects.join() + JSON.stringify(live) + scrollX + ',' + scrollY;
    if (key === last) return;
    last = key;
    if (m && live) {  // the box being dragged, as fractions of the image
      const [a, b, c, d] = live;
      live.box = [Math.min(a, c), Math.min(b, d), Math.max(a, c), Math.max(b, d)];
    }
    draw(layer('marks-image'), img, m, false, live && live.box);
    draw(layer('marks-heat'), heat, m && m.selection ? m : null, true, null);
  }, 50);
}
"""
# The image has no corner buttons, but Gradio still lays their (empty) bar over its top edge, and its
# panel's rounded corners clip it: where the picture fills the panel (narrow pages) clicks on corner
# pixels would never reach it.
HIDDEN_CSS = """
.daami2i-hidden {display: none !important;}
#image .icon-button-wrapper {display: none !important;}
#image {border-radius: 0 !important;}
"""
MODE_HINTS = {
    "point": "point mode: click a pixel to see its map, or drag a box",
    "box": "box mode: click two opposite corners of the box, or drag it; the box covers every latent cell it touches",
    "polygon": "polygon mode: click the vertices, then 'close polygon' (drags are ignored here, the vertices stay)",
}


def launch(app: Any, **kwargs: Any) -> Any:
    """Launch the app with the explorer's script and style (``kwargs`` go to ``Blocks.launch``)."""
    return app.launch(js=DRAG_JS, css=HIDDEN_CSS, **kwargs)


def opened_note(state: Session, name: str) -> str:
    """The info line after opening an experiment: what it was made with, and what it does not say."""
    st = state.settings
    said = [f"{st['prompt']!r}"]
    said += [f"{k} {st[k]:g}" for k in ("seed", "steps", "guidance") if k in st]
    if "size" in st:
        said.append(f"{st['size'][1]}x{st['size'][0]} px")
    missing = [k for k in ("seed", "steps", "guidance") if k not in st]
    note = f"opened {name}: {', '.join(said)}; click the image or a word"
    return note + (f" (it does not record its {' or '.join(missing)}: those fields are unchanged)" if missing else "")


def build_app(pipe: Any, experiment: Path | None = None, defaults: dict[str, Any] | None = None) -> Any:
    """The Gradio Blocks app (not launched). ``defaults`` may set ``prompt``, ``seed``, ``steps``,
    ``guidance`` and ``frames`` (a video pipeline's frame count, :data:`FRAMES_DEFAULT` unless set:
    small, so that a generation on the explorer's pace is quick; the field is shown for a video
    pipeline only); an ``experiment`` folder opens at the start, its settings in the fields."""
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QueryError("the explorer needs Gradio: pip install 'daami2i[ui]'") from exc

    d = {"steps": 25, "guidance": 4.0, "prompt": DEFAULT_PROMPT, "seed": DEFAULT_SEED, **(defaults or {})}
    initial = open_experiment(experiment) if experiment is not None else Session()
    d.setdefault("size", default_size(pipe))
    d.update({k: v for k, v in initial.settings.items() if k in d})
    d["height"], d["width"] = d["size"] if d["size"] else (None, None)
    from .video import is_video_pipeline

    makes_video = is_video_pipeline(pipe)  # the frame-count field is shown for a video pipeline only
    d.setdefault("frames", len(initial.frames) if initial.frames is not None else FRAMES_DEFAULT)
    out_dir = Path(tempfile.mkdtemp(prefix="daami2i-explore-files-"))

    def guard(fn: Any) -> Any:
        """``fn`` (returning a dict of the outputs to update) for an event. On an error every output
        stays as it was (a raised ``gr.Error`` would blank them all behind "Error" badges) except the
        info line, which says what went wrong and what to do, as does a toast. Keeps ``fn``'s
        signature (Gradio reads it for SelectData)."""
        import functools
        import logging

        @functools.wraps(fn)
        def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except QueryError as exc:
                msg = str(exc)
            except Exception as exc:  # an unexpected failure must not blank the panels either
                logging.getLogger(__name__).exception("explorer event failed")
                msg = f"something went wrong ({type(exc).__name__}: {exc}); the panels are unchanged, try again"
            gr.Warning(msg)
            return {info: f"⚠ {msg}"}

        return wrapped

    def zip_of(s: Session) -> str | None:
        """The session's experiment folder as one zip file for download, made once per experiment."""
        if s.zip_path is None and s.experiment_dir is not None:
            base = Path(tempfile.mkdtemp(dir=out_dir)) / "experiment"
            s.zip_path = shutil.make_archive(str(base), "zip", root_dir=s.experiment_dir)
        return s.zip_path

    def frame_control(s: Session) -> Any:
        """The frame slider: shown for a video of several frames (0 .. frames - 1), hidden for an image
        and for a video of one frame (Gradio's slider needs a range; that frame is the one shown)."""
        n = len(s.frames) if s.frames is not None else 1
        return gr.Slider(
            0,
            max(n - 1, 1),  # (hidden when n is 1: no frame 1 to move to)
            value=s.frame if s.frames is not None else 0,
            step=1,
            label="video frame (clicks, boxes and polygons query this frame)",
            visible=s.frames is not None and n > 1,
            elem_id="frame",
        )

    def chips(state: Session) -> Any:
        """The word chips of what is open (none chosen)."""
        return gr.Radio(choices=word_chips(state), value=None, label="words (click one)", elem_id="words")

    def image_view(state: Session) -> Any:
        """The image as shown: enlarged, crisp pixels; None before any image."""
        return show(state.image) if state.image is not None else None

    def files(state: Session, inst: list[M.Instance] | None = None, category: str = "") -> list[str]:
        """Write the downloads into a fresh folder per call, so that sessions never share files."""
        where = Path(tempfile.mkdtemp(dir=out_dir))
        paths = []
        if state.last_map is not None and state.image is not None:
            p = where / "overlay.png"
            overlay(state.image, state.last_map).save(p)
            paths.append(str(p))
        if inst is not None and state.image is not None:
            mask = np.zeros((state.image.height, state.image.width), bool)
            for i in inst:
                mask |= i.mask
            p = where / "mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(p)
            paths.append(str(p))
            p = where / "coco.json"
            p.write_text(json.dumps(coco_of(state, inst, category)))
            paths.append(str(p))
        experiment_zip = zip_of(state)  # stays among the downloads whatever is shown
        if experiment_zip is not None:
            paths.append(experiment_zip)
        return paths

    with gr.Blocks(title="daami2i explorer") as app:
        state = gr.State(initial)
        gr.Markdown("## daami2i explorer · click the image to see what a pixel, box or polygon is tied to")
        with gr.Row():
            prompt = gr.Textbox(value=d["prompt"], label="prompt (Enter generates)", scale=6, elem_id="prompt", lines=1)
            # no precision: 2.5 reaches generate's checks as typed, rather than rounded to 2 unseen
            seed = gr.Number(value=d["seed"], label="seed", scale=1, min_width=80, elem_id="seed")
            steps = gr.Number(value=d["steps"], label="steps", scale=1, min_width=80, elem_id="steps")
            guidance = gr.Number(value=d["guidance"], label="guidance", scale=1, min_width=80, elem_id="guidance")
            height = gr.Number(value=d["height"], label="height", scale=1, min_width=80, elem_id="height")
            width = gr.Number(value=d["width"], label="width", scale=1, min_width=80, elem_id="width")
            frame_count = gr.Number(
                value=d["frames"] if makes_video else None,
                label="frames",
                scale=1,
                min_width=80,
                elem_id="frames",
                visible=makes_video,
            )
            go = gr.Button(
                "Generate", variant="primary", elem_id="generate", interactive=bool(str(d["prompt"]).strip())
            )
        with gr.Row():
            with gr.Accordion("or attribute your own image", open=False):
                with gr.Row():
                    upload = gr.Image(type="pil", sources=["upload"], label="image", elem_id="upload")
                    caption = gr.Textbox(label="its caption", elem_id="caption")
                    attribute_btn = gr.Button("Attribute this image", elem_id="attribute")
            with gr.Accordion("or open an experiment", open=False):
                open_file = gr.File(
                    label="experiment.zip (as this page downloads it)",
                    file_types=[".zip"],
                    file_count="single",
                    elem_id="open-experiment",
                )
        info = gr.Markdown(opened_note(initial, str(experiment)) if experiment is not None else "", elem_id="info")
        words = chips(initial)
        with gr.Row(equal_height=False):
            with gr.Column():
                image = gr.Image(
                    value=image_view(initial),
                    label="image (click it)",
                    interactive=False,
                    format="png",
                    elem_id="image",
                    buttons=[],  # corner buttons would lie over the image's corner pixels
                )
                with gr.Row():
                    mode = gr.Radio(
                        ["point", "box", "polygon"],
                        value="point",
                        label="click mode",
                        info="drag a box in point or box mode (polygon mode ignores drags); a new mode drops "
                        "pending clicks",
                        elem_id="mode",
                        scale=3,
                    )
                    with gr.Column(scale=2, min_width=160):
                        close = gr.Button(close_label(initial), elem_id="close-polygon", interactive=False, size="md")
                        clear = gr.Button("clear polygons", elem_id="clear-polygons", size="md")
                frame_slider = frame_control(initial)
            with gr.Column():
                with gr.Tabs(selected="map", elem_id="views", overflow_behavior="wrap") as tabs:
                    with gr.Tab("map", id="map", render_children=True):
                        heat = gr.Image(label="map", interactive=False, format="png", elem_id="heat")
                    with gr.Tab("raw word map", id="raw", render_children=True):
                        raw_view = gr.Image(label="raw word map", interactive=False, format="png", elem_id="raw")
                    with gr.Tab("refined word map", id="refined", render_children=True):
                        refined_view = gr.Image(
                            label="refined word map", interactive=False, format="png", elem_id="refined"
                        )
                    with gr.Tab("mask and boxes", id="mask", render_children=True):
                        mask_view = gr.Image(label="mask and boxes", interactive=False, format="png", elem_id="mask")
                legend = gr.HTML(legend_html(initial, False), elem_id="legend", js_on_load=None)
                fixed = gr.Checkbox(
                    value=False,
                    label="fixed scale (compare maps)",
                    info="off: each map stretched to its own range",
                    elem_id="fixed",
                )
        with gr.Row():
            iterations = gr.Slider(0, 5, value=1, step=1, label="refine with self-attention (iterations)")
            all_res = gr.Checkbox(value=False, label="refine with every resolution", elem_id="all-res")
            threshold = gr.Slider(0.05, 0.95, value=0.4, step=0.05, label="mask threshold", elem_id="threshold")
        downloads = gr.File(label="downloads", file_count="multiple", elem_id="downloads")
        drag = gr.Textbox(elem_id="drag", elem_classes=["daami2i-hidden"], show_label=False, container=False)
        marks = gr.Textbox(
            marks_of(initial), elem_id="marks", elem_classes=["daami2i-hidden"], show_label=False, container=False
        )

        word_views = [raw_view, refined_view, mask_view]
        quick = {"show_progress": "hidden"}  # milliseconds: no loading overlay over the panels

        def common(s: Session) -> dict[Any, Any]:
            """What follows every change of the session: its state, the drawn selection, the close button."""
            return {
                state: s,
                marks: marks_of(s),
                close: gr.Button(value=close_label(s), interactive=len(s.clicks) >= 3),
            }

        def fresh(s: Session, msg: str, fx: bool) -> dict[Any, Any]:
            """A new image (generated, attributed or opened): every panel starts afresh."""
            blank = dict.fromkeys([heat, *word_views])
            view = {image: image_view(s), words: chips(s), info: msg, downloads: files(s), legend: legend_html(s, fx)}
            view[frame_slider] = frame_control(s)
            return {**common(s), **blank, **view, tabs: gr.Tabs(selected="map")}

        def heat_view(s: Session, fx: bool) -> Any:
            """The current map coloured as the scale says (it becomes the overlay download)."""
            assert s.image is not None and s.last_heat is not None
            s.last_map = coloured(s, s.last_heat, s.last_kind, fx)
            return overlay(s.image, s.last_map)

        def shown(s: Session, fx: bool) -> dict[Any, Any]:
            """A selection's map on the map tab, with its title."""
            s.word_instances = None
            out = {heat: heat_view(s, fx), info: s.last_title, tabs: gr.Tabs(selected="map")}
            return {**common(s), **out, downloads: files(s)}

        everything = [state, image, heat, *word_views, words, info, downloads, legend, tabs, marks, close, frame_slider]
        fields = [prompt, seed, steps, guidance, height, width]

        def on_generate(s: Session, p: str, sd: Any, st: Any, g: Any, h: Any, w: Any, n: Any, fx: bool) -> Any:
            # checks the numbers as typed (an empty field is None); the frame count is a video pipeline's only
            s = generate(pipe, s, p, sd, st, g, h, w, num_frames=n if makes_video else None)
            return fresh(s, generated_note(s), fx)

        gen_in = [state, prompt, seed, steps, guidance, height, width, frame_count, fixed]
        for trigger in (go.click, prompt.submit):
            trigger(guard(on_generate), gen_in, everything, concurrency_limit=1, concurrency_id="generate")
        prompt.change(lambda p: gr.Button(interactive=bool(p and p.strip())), [prompt], [go], queue=False, **quick)

        def on_attribute(s: Session, im: Image.Image, cap: str, sd: Any, fx: bool) -> Any:
            s = attribute(pipe, im, cap, sd)
            return fresh(s, "attributed; click the image or a word", fx)

        attribute_btn.click(
            guard(on_attribute),
            [state, upload, caption, seed, fixed],
            everything,
            concurrency_limit=1,
            concurrency_id="generate",
        )

        def on_open(s: Session, file: Any, fx: bool) -> Any:
            if not file:  # the upload was removed: what is open stays
                return {state: s}
            path = Path(file if isinstance(file, str) else file.name)
            s = open_zip(path, Path(tempfile.mkdtemp(dir=out_dir)) / "experiment")
            st = s.settings
            filled = {
                prompt: st["prompt"],
                **{c: st[k] for c, k in zip(fields[1:4], ("seed", "steps", "guidance"), strict=True) if k in st},
            }
            if "size" in st:
                filled.update({height: st["size"][0], width: st["size"][1]})
            return {**fresh(s, opened_note(s, path.name), fx), **filled}

        opening = open_file.upload(
            guard(on_open), [state, open_file, fixed], [*everything, *fields], concurrency_limit=1
        )
        opening.then(lambda: None, None, [open_file], **quick)  # the upload box is ready for the next zip

        def on_click(s: Session, m: str, fx: bool, evt: gr.SelectData) -> Any:
            if s.image is None:
                raise QueryError("generate an image (or open an experiment) first")
            k = scale_of(s.image)
            x, y = float(evt.index[0]) / k, float(evt.index[1]) / k
            s = click(s, m, x, y)
            if s.clicks:  # a vertex or a first corner: marked on the image, the map stays
                todo = (
                    "polygon: click more vertices, then 'close polygon'"
                    if m == "polygon"
                    else "box: click the opposite corner"
                )
                return {**common(s), info: f"{todo} ({len(s.clicks)} click(s) pending)"}
            return shown(s, fx)

        on_click.__annotations__["evt"] = gr.SelectData  # a real class, not the postponed string
        click_outs = [state, heat, info, downloads, tabs, marks, close]
        image.select(guard(on_click), [state, mode, fixed], click_outs, **quick)

        def on_mode(s: Session, m: str) -> Any:
            """A new mode starts afresh: pending vertices or corner are dropped and undrawn."""
            dropped = len(s.clicks)
            s.clicks = []
            note = f" (dropped {dropped} unfinished click(s))" if dropped else ""
            return {**common(s), info: MODE_HINTS.get(m, "") + note}

        mode.change(guard(on_mode), [state, mode], click_outs, **quick)

        def on_drag(s: Session, value: str, m: str, fx: bool) -> Any:
            if s.image is None or not value:
                return {state: s}
            if m == "polygon":  # ignored, so that a shaky click does not lose the vertices
                msg = "drags are ignored in polygon mode (drag a box in point or box mode)"
                return {info: msg + f"; {len(s.clicks)} click(s) pending"}
            k = scale_of(s.image)
            x0, y0, x1, y1 = (float(v) / k for v in value.split(",")[:4])
            return shown(drag_box(s, x0, y0, x1, y1), fx)

        drag.change(guard(on_drag), [state, drag, mode, fixed], click_outs, **quick)

        def on_close(s: Session, fx: bool) -> Any:
            return shown(close_polygon(s), fx)

        close.click(guard(on_close), [state, fixed], click_outs, **quick)

        def on_clear(s: Session) -> Any:
            n = len(s.polygons)
            s.polygons, s.clicks = [], []
            if s.selection is not None and s.selection["kind"] == "polygons":
                s.selection = None  # the map stays, but no longer stands for a drawn selection
            return {**common(s), info: f"polygons cleared ({n} closed)"}

        clear.click(guard(on_clear), [state], click_outs, **quick)

        word_outs = [state, heat, *word_views, info, downloads, tabs, marks, close]
        word_in = [state, words, iterations, threshold, all_res, fixed]

        def on_word(tab: str) -> Any:
            """The handler for a chip or a word setting; it brings the ``tab`` view to the front."""

            def handler(s: Session, w: str | None, it: float, th: float, every: bool, fx: bool) -> Any:
                if not w:  # a slider moved with no word chosen: what is shown stays
                    return {state: s}
                raw_x, ref_x, inst = word(s, w, int(it), float(th), bool(every), bool(fx))
                assert s.image is not None
                m = np.zeros((s.image.height, s.image.width), bool)
                for i in inst:
                    m |= i.mask
                boxes = [i.bbox for i in inst]
                views = {
                    heat: overlay(s.image, ref_x),
                    raw_view: overlay(s.image, raw_x),
                    refined_view: overlay(s.image, ref_x),
                    mask_view: mask_image(s.image, m, boxes),
                }
                s.word_instances = (inst, w)
                msg = f"{s.last_title}: {len(inst)} instance(s), boxes {boxes}"
                return {**common(s), **views, info: msg, downloads: files(s, inst, w), tabs: gr.Tabs(selected=tab)}

            return handler

        for trigger, tab in (
            (words.change, "refined"),
            (iterations.change, "refined"),
            (all_res.change, "refined"),
            (threshold.change, "mask"),
        ):
            trigger(guard(on_word(tab)), word_in, word_outs, **quick)

        def on_fixed(s: Session, fx: bool) -> Any:
            """The scale changed: the legend, and every map shown, recoloured (masks stay)."""
            out: dict[Any, Any] = {legend: legend_html(s, bool(fx))}
            if s.word_heats is not None and s.image is not None:
                raw, refined, kind = s.word_heats
                out[raw_view] = overlay(s.image, coloured(s, raw, "word", bool(fx)))
                out[refined_view] = overlay(s.image, coloured(s, refined, kind, bool(fx)))
            if s.last_heat is not None:
                out[heat] = heat_view(s, bool(fx))
                out[downloads] = files(s, *s.word_instances) if s.word_instances is not None else files(s)
            return {**out, state: s}

        def on_frame(s: Session, t: Any, th: float, fx: bool) -> Any:
            """The frame slider moved: the frame, and every map shown, at that frame."""
            if s.frames is None:
                return {state: s}
            s = set_frame(s, t)
            assert s.frames is not None and s.image is not None
            out: dict[Any, Any] = {image: image_view(s), info: f"frame {s.frame} of {len(s.frames)}"}
            views = word_at_frame(s, float(th), bool(fx))
            if views is not None:
                raw_x, ref_x, inst = views
                m = np.zeros((s.image.height, s.image.width), bool)
                for i in inst:
                    m |= i.mask
                out.update(
                    {
                        raw_view: overlay(s.image, raw_x),
                        refined_view: overlay(s.image, ref_x),
                        mask_view: mask_image(s.image, m, [i.bbox for i in inst]),
                    }
                )
                if s.word_instances is not None:
                    s.word_instances = (inst, s.word_instances[1])
            if s.last_heat is not None:
                out[heat] = heat_view(s, bool(fx))
            out[downloads] = files(s, *s.word_instances) if s.word_instances is not None else files(s)
            return {**common(s), **out}

        frame_slider.release(
            guard(on_frame),
            [state, frame_slider, threshold, fixed],
            [state, image, heat, *word_views, info, downloads, marks, close],
            **quick,
        )

        fixed.change(
            guard(on_fixed), [state, fixed], [state, legend, heat, raw_view, refined_view, downloads, info], **quick
        )
    app.queue(default_concurrency_limit=4)
    return app

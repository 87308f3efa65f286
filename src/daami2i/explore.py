"""The daami2i explorer: a local web app (Gradio) to point at an image and see what it is tied to.

    daami2i explore                       # the embedded shapes model, http://127.0.0.1:7860
    daami2i explore outputs/shapes/experiment -m path/to/pipeline --port 7861

Generate from a prompt (or open a saved experiment), then click the image: in ``point`` mode the
clicked latent pixel's self-attention map appears; dragging on the image (in ``point`` or ``box``
mode) makes a box, as do two clicks in ``box`` mode; in ``polygon`` mode clicks add vertices (drags
are ignored there, so that a shaky click keeps them) and "close polygon" queries the contour (the
previous ones are kept for a multi-contour map until "new polygons"). Changing mode drops what is
pending. The prompt's words are chips: one click shows the word's map, raw and refined by
self-attention side by side, with the mask and boxes at the chosen threshold. Every map comes from
the public API on the finished trace (milliseconds; the model is not run again). Overlays, the mask,
the COCO annotation of the current mask and the experiment (a zip) can be downloaded. An error
leaves the panels as they were and says on the info line (and in a toast) what to do.

Each browser session has its own state; generation requests are queued one at a time.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import QueryError
from .heatmaps import masks as M
from .heatmaps.maps import GlobalHeatMap, HeatMap
from .sampling import GUIDANCE_MAX, SEED_LIMIT, STEPS_MAX

DISPLAY = 512  # the image is shown at least this large (nearest-neighbour), clicks are mapped back


@dataclass
class Session:
    """What one browser session is looking at."""

    image: Image.Image | None = None
    ghm: GlobalHeatMap | None = None  # every captured resolution: word maps, "all resolutions" refinement
    ghm_high: GlobalHeatMap | None = None  # self-attention at the highest resolution only: region queries
    experiment_dir: Path | None = None
    clicks: list[tuple[float, float]] = field(default_factory=list)  # image pixel coords of pending clicks
    polygons: list[list[list[float]]] = field(default_factory=list)
    last_map: np.ndarray | None = None  # (H, W) in [0, 1], the map shown last
    last_title: str = ""
    zip_path: str | None = None  # the experiment folder zipped for download, made once


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


def with_points(image: Image.Image, points: list[tuple[float, float]]) -> Image.Image:
    """The enlarged image with the pending polygon's vertices (image pixel coordinates) marked."""
    from PIL import ImageDraw

    out = show(image)
    k = scale_of(image)
    draw = ImageDraw.Draw(out)
    xy = [(x * k, y * k) for x, y in points]
    if len(xy) > 1:
        draw.line(xy, fill=(255, 0, 255), width=2)
    for x, y in xy:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=(255, 0, 255), width=2)
    return out


def pixel_of(ghm: GlobalHeatMap, image: Image.Image, x: float, y: float) -> int:
    """The row-major latent pixel id under image pixel (x, y)."""
    gh, gw = ghm.grid_size
    col = min(gw - 1, max(0, int(x * gw / image.width)))
    row = min(gh - 1, max(0, int(y * gh / image.height)))
    return row * gw + col


def expanded(heat: HeatMap, image: Image.Image) -> np.ndarray:
    return heat.expand_as(image).numpy()


# -- actions (each returns what the UI shows) -----------------------------------------------------
def _session(image: Image.Image, source: Any) -> Session:
    """Heat maps of a finished trace or a loaded experiment: all resolutions, and the highest alone."""
    gen = source.generation if hasattr(source, "generation") else source.last_generation
    finest = min(gen.self_attention) if gen.self_attention else None
    ghm = source.compute_global_heat_map()
    high = source.compute_global_heat_map(factors=[finest]) if finest is not None else ghm
    return Session(image=image, ghm=ghm, ghm_high=high)


def generate(pipe: Any, state: Session, prompt: str, seed: int, steps: int, guidance: float) -> Session:
    """Run the pipeline under the trace; the session then holds the image and its heat maps."""
    from . import trace

    if not prompt or not prompt.strip():
        raise QueryError("type a prompt first")
    n_steps = _whole(steps, "steps", 1, STEPS_MAX)
    n_seed = _whole(seed, "seed", 0, SEED_LIMIT - 1)
    try:
        scale = float(guidance)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or not 0 <= scale <= GUIDANCE_MAX:
        raise QueryError(
            f"guidance must be a number from 0 to {GUIDANCE_MAX:g} (1 or less turns guidance off), got {guidance!r}"
        )
    with trace(pipe, self_factors="all") as trc:
        out = pipe(
            prompt,
            num_inference_steps=n_steps,
            guidance_scale=scale,
            generator=torch.Generator(device="cpu").manual_seed(n_seed),
        )
    state = _session(out.images[0], trc)
    state.experiment_dir = Path(tempfile.mkdtemp(prefix="daami2i-explore-")) / "experiment"
    trc.to_experiment(state.experiment_dir, seed=n_seed)
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
    trc.to_experiment(state.experiment_dir, seed=n_seed)
    return state


def open_experiment(path: Path) -> Session:
    from . import load_experiment

    exp = load_experiment(path)
    state = _session(exp.images[0], exp)
    state.experiment_dir = Path(path)
    return state


def click(state: Session, mode: str, x: float, y: float) -> Session:
    """A click on the image at image pixel (x, y)."""
    if state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    ghm, image = state.ghm_high, state.image
    if mode == "point":
        p = pixel_of(ghm, image, x, y)
        state.last_map = expanded(ghm.compute_pixel_heat_map([p]), image)
        state.last_title = f"pixel {p} (row {p // ghm.grid_size[1]}, column {p % ghm.grid_size[1]})"
    elif mode == "box":
        state.clicks.append((x, y))
        if len(state.clicks) == 2:
            (xa, ya), (xb, yb) = state.clicks
            state.clicks = []
            gh, gw = ghm.grid_size
            x1, x2 = sorted((min(gw - 1, int(xa * gw / image.width)), min(gw - 1, int(xb * gw / image.width))))
            y1, y2 = sorted((min(gh - 1, int(ya * gh / image.height)), min(gh - 1, int(yb * gh / image.height))))
            box = (x1, y1, x2, y2)
            state.last_map = expanded(ghm.compute_bbox_heat_map(*box), image)
            state.last_title = f"box {box} (latent columns {x1}-{x2}, rows {y1}-{y2}, corners included)"
    elif mode == "polygon":
        state.clicks.append((x, y))
    else:
        raise QueryError(f"mode must be point, box or polygon, got {mode!r}")
    return state


def drag_box(state: Session, x0: float, y0: float, x1: float, y1: float) -> Session:
    """A box dragged on the image from image pixel (x0, y0) to (x1, y1): its self-attention map."""
    if state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    ghm, image = state.ghm_high, state.image
    gh, gw = ghm.grid_size
    xa, xb = sorted((min(gw - 1, max(0, int(x0 * gw / image.width))), min(gw - 1, max(0, int(x1 * gw / image.width)))))
    ya, yb = sorted(
        (min(gh - 1, max(0, int(y0 * gh / image.height))), min(gh - 1, max(0, int(y1 * gh / image.height))))
    )
    box = (xa, ya, xb, yb)
    state.clicks = []
    state.last_map = expanded(ghm.compute_bbox_heat_map(*box), image)
    state.last_title = f"box {box} (latent columns {xa}-{xb}, rows {ya}-{yb}, corners included)"
    return state


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
    heat = state.ghm_high.compute_segmentation_heat_map(state.polygons, h, w)
    state.last_map = expanded(heat, state.image)
    state.last_title = f"{len(state.polygons)} polygon(s)"
    return state


def word(
    state: Session, w: str, iterations: int, threshold: float, all_resolutions: bool = False
) -> tuple[np.ndarray, np.ndarray, list[M.Instance]]:
    """Raw and refined (self-attention guided ``iterations`` times, at the highest resolution or at
    every captured one) maps of a word, and the refined map's instances at ``threshold``; the
    refined map becomes the current map."""
    if state.ghm is None or state.ghm_high is None or state.image is None:
        raise QueryError("generate an image (or open an experiment) first")
    raw = state.ghm.compute_word_heat_map(w)
    refiner = state.ghm if all_resolutions else state.ghm_high
    refined: HeatMap = raw
    for _ in range(int(iterations)):
        refined = refiner.compute_guided_heat_map(refined)
    raw_x, ref_x = expanded(raw, state.image), expanded(refined, state.image)
    state.last_map = ref_x
    state.last_title = f"{w!r} refined x{int(iterations)} ({'all resolutions' if all_resolutions else 'highest'})"
    return raw_x, ref_x, M.instances(M.binarize(ref_x, "tau", float(threshold)))


def coco_of(state: Session, instances: list[M.Instance], category: str) -> dict[str, Any]:
    """A COCO instances file for the current image and instances."""
    assert state.image is not None
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, **inst.annotation()} for i, inst in enumerate(instances)]
    image = {"id": 1, "file_name": "image.png", "height": state.image.height, "width": state.image.width}
    return {"images": [image], "annotations": anns, "categories": [{"id": 1, "name": category}]}


# -- the app -----------------------------------------------------------------------------------------
# Gradio's image gives click events only: this script turns a drag on the image into a box, written
# to a hidden text box (image-pixel coordinates of the displayed picture) that the app listens to,
# and swallows the click that ends a drag.
DRAG_JS = """
() => {
  let start = null, dragged = false;
  const at = (e, img) => {
    const r = img.getBoundingClientRect();
    return [(e.clientX - r.left) * img.naturalWidth / r.width, (e.clientY - r.top) * img.naturalHeight / r.height];
  };
  document.addEventListener('dragstart', e => {
    if (e.target.closest && e.target.closest('#image')) e.preventDefault();
  }, true);
  document.addEventListener('mousedown', e => {
    const img = e.target.closest && e.target.closest('#image img');
    start = img ? [img, ...at(e, img)] : null;
  }, true);
  document.addEventListener('mouseup', e => {
    if (!start) return;
    const [img, x0, y0] = start;
    start = null;
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
    "box": "box mode: click two opposite corners, or drag a box",
    "polygon": "polygon mode: click the vertices, then 'close polygon' (drags are ignored here, the vertices stay)",
}


def launch(app: Any, **kwargs: Any) -> Any:
    """Launch the app with the explorer's script and style (``kwargs`` go to ``Blocks.launch``)."""
    return app.launch(js=DRAG_JS, css=HIDDEN_CSS, **kwargs)


def build_app(pipe: Any, experiment: Path | None = None, defaults: dict[str, Any] | None = None) -> Any:
    """The Gradio Blocks app (not launched)."""
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QueryError("the explorer needs Gradio: pip install 'daami2i[ui]'") from exc

    d = {"steps": 25, "guidance": 4.0, "prompt": "a red circle and a blue square", **(defaults or {})}
    initial = open_experiment(experiment) if experiment is not None else Session()
    out_dir = Path(tempfile.mkdtemp(prefix="daami2i-explore-files-"))

    def guard(fn: Any, outputs: list[Any]) -> Any:
        """``fn`` for an event that updates ``outputs``. On an error every output stays as it was (a
        raised ``gr.Error`` would blank them all behind "Error" badges) except the info line, which
        says what went wrong and what to do, as does a toast. Keeps ``fn``'s signature (Gradio reads
        it for SelectData)."""
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
            return tuple(f"⚠ {msg}" if o is info else gr.skip() for o in outputs)

        return wrapped

    def zip_of(s: Session) -> str | None:
        """The session's experiment folder as one zip file for download, made once per experiment."""
        import shutil

        if s.zip_path is None and s.experiment_dir is not None:
            base = Path(tempfile.mkdtemp(dir=out_dir)) / "experiment"
            s.zip_path = shutil.make_archive(str(base), "zip", root_dir=s.experiment_dir)
        return s.zip_path

    def chips(state: Session) -> Any:
        return gr.Radio(choices=word_chips(state), value=None, label="words (click one)", elem_id="words")

    def image_view(state: Session) -> Any:
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
        gr.Markdown("# daami2i explorer\nClick the image to see what a pixel, box or polygon is tied to.")
        with gr.Row():
            prompt = gr.Textbox(value=d["prompt"], label="prompt", scale=4, elem_id="prompt")
            # no precision: 2.5 reaches generate's checks as typed, rather than rounded to 2 unseen
            seed = gr.Number(value=0, label="seed", scale=1)
            steps = gr.Number(value=d["steps"], label="steps", scale=1)
            guidance = gr.Number(value=d["guidance"], label="guidance", scale=1)
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Accordion("or attribute your own image", open=False):
            with gr.Row():
                upload = gr.Image(type="pil", sources=["upload"], label="image", elem_id="upload")
                caption = gr.Textbox(label="its caption", elem_id="caption")
                attribute_btn = gr.Button("Attribute this image", elem_id="attribute")
        with gr.Row():
            image = gr.Image(
                value=image_view(initial),
                label="image (click it)",
                interactive=False,
                format="png",
                elem_id="image",
                buttons=[],  # corner buttons would lie over the image's corner pixels
            )
            heat = gr.Image(label="map", interactive=False, format="png", elem_id="heat")
        with gr.Row():
            mode = gr.Radio(
                ["point", "box", "polygon"],
                value="point",
                label="click mode",
                info="drag a box in point or box mode; polygon mode ignores drags; changing mode drops pending clicks",
                elem_id="mode",
            )
            close = gr.Button("close polygon", elem_id="close-polygon")
            clear = gr.Button("new polygons", elem_id="clear-polygons")
        info = gr.Markdown("", elem_id="info")
        drag = gr.Textbox(elem_id="drag", elem_classes=["daami2i-hidden"], show_label=False, container=False)
        words = chips(initial)
        with gr.Row():
            iterations = gr.Slider(0, 5, value=1, step=1, label="refine with self-attention (iterations)")
            all_res = gr.Checkbox(value=False, label="refine with every resolution", elem_id="all-res")
            threshold = gr.Slider(0.05, 0.95, value=0.4, step=0.05, label="mask threshold", elem_id="threshold")
        with gr.Row():
            raw_view = gr.Image(label="raw word map", interactive=False, format="png", elem_id="raw")
            refined_view = gr.Image(label="refined word map", interactive=False, format="png", elem_id="refined")
            mask_view = gr.Image(label="mask and boxes", interactive=False, format="png", elem_id="mask")
        downloads = gr.File(label="downloads", file_count="multiple", elem_id="downloads")

        word_views = [raw_view, refined_view, mask_view]

        def on_generate(s: Session, p: str, sd: Any, st: Any, g: Any) -> Any:
            s = generate(pipe, s, p, sd, st, g)  # checks the numbers as typed (an empty field is None)
            msg = generated_note(s)
            return s, image_view(s), None, chips(s), msg, files(s), None, None, None

        gen_outs = [state, image, heat, words, info, downloads, *word_views]
        go.click(guard(on_generate, gen_outs), [state, prompt, seed, steps, guidance], gen_outs, concurrency_limit=1)

        def on_click(s: Session, m: str, evt: gr.SelectData) -> Any:
            if s.image is None:
                raise QueryError("generate an image (or open an experiment) first")
            k = scale_of(s.image)
            x, y = float(evt.index[0]) / k, float(evt.index[1]) / k
            s = click(s, m, x, y)
            assert s.image is not None
            if s.clicks:  # a vertex or a first corner: marked on the image, the map stays
                todo = (
                    "polygon: click more vertices, then 'close polygon'"
                    if m == "polygon"
                    else "box: click the opposite corner"
                )
                return (
                    s,
                    gr.skip(),
                    f"{todo} ({len(s.clicks)} click(s) pending)",
                    gr.skip(),
                    with_points(s.image, s.clicks),
                )
            assert s.last_map is not None
            unmark = image_view(s) if m == "box" else gr.skip()  # a finished box: the corner mark goes
            return s, overlay(s.image, s.last_map), s.last_title, files(s), unmark

        on_click.__annotations__["evt"] = gr.SelectData  # a real class, not the postponed string
        click_outs = [state, heat, info, downloads, image]
        image.select(guard(on_click, click_outs), [state, mode], click_outs)

        def on_mode(s: Session, m: str) -> Any:
            """A new mode starts afresh: pending vertices or corner are dropped and undrawn."""
            dropped = len(s.clicks)
            s.clicks = []
            note = f" (dropped {dropped} unfinished click(s))" if dropped else ""
            return s, MODE_HINTS.get(m, "") + note, image_view(s) if dropped else gr.skip()

        mode_outs = [state, info, image]
        mode.change(guard(on_mode, mode_outs), [state, mode], mode_outs)

        def on_attribute(s: Session, im: Image.Image, cap: str, sd: Any) -> Any:
            s = attribute(pipe, im, cap, sd)
            msg = "attributed; click the image or a word"
            return s, image_view(s), None, chips(s), msg, files(s), None, None, None

        attribute_btn.click(
            guard(on_attribute, gen_outs), [state, upload, caption, seed], gen_outs, concurrency_limit=1
        )

        def on_drag(s: Session, value: str, m: str) -> Any:
            if s.image is None or not value:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            if m == "polygon":  # ignored, so that a shaky click does not lose the vertices
                msg = "drags are ignored in polygon mode (drag a box in point or box mode)"
                msg += f"; {len(s.clicks)} click(s) pending"
                return s, gr.skip(), msg, gr.skip(), gr.skip()
            k = scale_of(s.image)
            x0, y0, x1, y1 = (float(v) / k for v in value.split(",")[:4])
            marked = bool(s.clicks)
            s = drag_box(s, x0, y0, x1, y1)
            assert s.image is not None and s.last_map is not None
            return s, overlay(s.image, s.last_map), s.last_title, files(s), image_view(s) if marked else gr.skip()

        drag.change(guard(on_drag, click_outs), [state, drag, mode], click_outs)

        def on_close(s: Session) -> Any:
            s = close_polygon(s)
            assert s.image is not None and s.last_map is not None
            return s, overlay(s.image, s.last_map), s.last_title, files(s), image_view(s)

        close.click(guard(on_close, click_outs), [state], click_outs)

        def on_clear(s: Session) -> Any:
            marked = bool(s.clicks)
            s.polygons, s.clicks = [], []
            return s, "polygons cleared", image_view(s) if marked else gr.skip()

        clear.click(guard(on_clear, mode_outs), [state], mode_outs)

        outs = [state, heat, *word_views, info, downloads]

        def on_word(s: Session, w: str | None, it: float, th: float, every: bool) -> Any:
            if not w:  # a slider moved with no word chosen: what is shown stays
                return tuple(gr.skip() for _ in outs)
            raw_x, ref_x, inst = word(s, w, int(it), float(th), bool(every))
            assert s.image is not None
            m = np.zeros((s.image.height, s.image.width), bool)
            for i in inst:
                m |= i.mask
            boxes = [i.bbox for i in inst]
            views = overlay(s.image, raw_x), overlay(s.image, ref_x), mask_image(s.image, m, boxes)
            msg = f"{s.last_title}: {len(inst)} instance(s), boxes {boxes}"
            return (s, overlay(s.image, ref_x), *views, msg, files(s, inst, w))

        for trigger in (words.change, iterations.change, threshold.change, all_res.change):
            trigger(guard(on_word, outs), [state, words, iterations, threshold, all_res], outs)
    app.queue(default_concurrency_limit=4)
    return app

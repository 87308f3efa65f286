"""Video output on plain arrays: write frames (MP4, GIF, PNG folder), heat-map overlays per frame,
and instance tracks linked over frames.

Everything here works on arrays, not on traces: frames are a list of PIL images, a uint8 array
``(T, H, W, 3)`` or a float array in [0, 1]; maps are ``(T, H, W)`` in [0, 1] (what a frame-aware
heat map's ``expand_as`` gives). The heavy parts are imported lazily: MP4 and GIF need imageio with
its ffmpeg plugin (``pip install 'daami2i[video]'``: ``imageio``, ``imageio-ffmpeg``, which ships its
own ffmpeg binary), overlays need matplotlib's colour maps, tracks need OpenCV (and use scipy's
optimal assignment when scipy is installed). A PNG folder needs only Pillow.

>>> import numpy as np
>>> frames = np.zeros((3, 8, 8, 3), np.uint8)
>>> maps = np.zeros((3, 8, 8)); maps[:, 2:5, 2:5] = 1.0
>>> overlay_frames(frames, maps, alpha=0.5, cmap="gray")[0, 3, 3].tolist()
[128, 128, 128]
>>> masks = maps > 0.5
>>> np.unique(track_instances(masks)).tolist()
[0, 1]
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Daami2iError, UnsupportedPipelineError

SUFFIXES = (".mp4", ".gif")
MAX_SIDE = 16384  # pixels per side of a frame (ffmpeg's and Pillow's practical limit)


class VideoError(Daami2iError, ValueError):
    """Frames, maps or masks that cannot be written, overlaid or tracked (shape, range, count, path)."""


def _imageio() -> Any:
    try:
        import imageio.v3 as iio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VideoError("MP4 and GIF output need imageio: pip install 'daami2i[video]'") from exc
    return iio


def _ffmpeg_plugin() -> None:
    try:
        import imageio_ffmpeg  # noqa: F401  (imageio's FFMPEG plugin runs its bundled binary)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VideoError(
            "MP4 output needs imageio's ffmpeg plugin: pip install 'daami2i[video]' (imageio-ffmpeg, which ships "
            "its own ffmpeg binary)"
        ) from exc


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy, ints included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _frame_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """One frame (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8 or floats in [0, 1] -> uint8 (H, W, 3)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise VideoError(f"{where} has shape {arr.shape}: a frame is (height, width) or (height, width, 1 / 3 / 4)")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        raise VideoError(f"{where} is {arr.dtype}: frames are uint8 (0..255) or floats in [0, 1]")
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise VideoError(f"{where} holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise VideoError(
                f"{where} holds floats in [{lo:g}, {hi:g}]: float frames must lie in [0, 1] (divide uint8-range "
                "values by 255, or pass a uint8 array)"
            )
        out = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise VideoError(f"{where} is {arr.dtype}: frames are uint8 (0..255) or floats in [0, 1]")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:  # alpha is dropped: no video format here keeps it
        out = out[..., :3]
    if not (0 < out.shape[0] <= MAX_SIDE and 0 < out.shape[1] <= MAX_SIDE):
        raise VideoError(f"{where} is {out.shape[0]}x{out.shape[1]}: each side must be 1..{MAX_SIDE} pixels")
    return out


def as_frames(frames: Any) -> np.ndarray:
    """Frames as one uint8 array (T, H, W, 3).

    ``frames``: a list of PIL images / arrays / tensors, or an array (T, H, W, 3) (also 1 or 4
    channels, or (T, H, W) grey), uint8 or float in [0, 1]; alpha is dropped. An empty list, frames
    of different sizes, or values out of range are a :class:`VideoError`; so is a 3-D array whose
    last side is 3 or 4 (one RGB(A) image, not grey frames: pass ``image[None]``), as
    :func:`daami2i.heatmaps.maps.video_size_of` refuses it.

    >>> as_frames(np.ones((2, 4, 6))).shape
    (2, 4, 6, 3)
    """
    if isinstance(frames, (str, bytes, os.PathLike)):
        raise VideoError(f"frames must be images or an array, got the path {frames!r}")
    if hasattr(frames, "detach") or isinstance(frames, np.ndarray):
        arr = _to_numpy(frames)
        if arr.ndim not in (3, 4):
            raise VideoError(
                f"frames have shape {arr.shape}: expected (frames, height, width[, channels]) or a list of images"
            )
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # as daami2i.heatmaps.maps.video_size_of reads it
            raise VideoError(
                f"frames have shape {arr.shape}: that is one RGB(A) image (height, width, channels), not grey "
                "frames (frames, height, width); one image? pass frames[None]"
            )
        items: Sequence[Any] = list(arr)
    else:
        try:
            items = list(frames)
        except TypeError:
            raise VideoError(f"frames must be a list of images or an array, got {type(frames).__name__}") from None
    if not items:
        raise VideoError("no frames to write: the frame list is empty")
    out: list[np.ndarray] = []
    for i, item in enumerate(items):
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
            arr = np.asarray(item.convert("RGB"))
        else:
            arr = _to_numpy(item)
        f = _frame_uint8(arr, f"frame {i}")
        if out and f.shape != out[0].shape:
            raise VideoError(
                f"frame {i} is {f.shape[0]}x{f.shape[1]} but frame 0 is {out[0].shape[0]}x{out[0].shape[1]}: every "
                "frame of a video must have the same size"
            )
        out.append(f)
    return np.stack(out)  # (T, H, W, 3)


def _kind(path: Path, raw: str) -> str:
    if raw.endswith(("/", os.sep)) or path.is_dir() or path.suffix == "":
        return "folder"
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise VideoError(
            f"cannot write a video to {raw!r}: unknown suffix {path.suffix!r} (use .mp4, .gif, or a folder path "
            "without a suffix for one PNG per frame)"
        )
    return suffix[1:]


def pad_even(frames: np.ndarray) -> np.ndarray:
    """Frames (T, H, W, 3) with odd sides padded to even by repeating the last row / column.

    >>> pad_even(np.zeros((1, 3, 4, 3), np.uint8)).shape
    (1, 4, 4, 3)
    """
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(
    frames: Any,
    path: str | os.PathLike[str],
    fps: float = 8,
    *,
    quality: float = 8.0,
    pad_odd: bool = True,
    overwrite: bool = True,
) -> Path:
    """Write ``frames`` to ``path``; returns the path written.

    - ``.mp4``: H.264 (libx264, yuv420p, imageio's FFMPEG plugin) at ``fps``; ``quality`` 0..10
      (imageio's scale, 10 best). H.264 in yuv420p needs even sides: with ``pad_odd`` (default) an
      odd height or width is padded by one repeated row / column at the bottom / right (so the
      decoded video is that one pixel larger); ``pad_odd=False`` makes an odd side an error. Frames
      are never rescaled.
    - ``.gif``: through imageio's pillow plugin, looping forever, each frame shown ``1000 / fps`` ms
      (GIF stores hundredths of a second). Up to 256 colours per frame, exact for frames that have
      that few; Pillow merges consecutive identical frames into one shown for their summed duration.
    - a folder (a path without a suffix, ending in "/", or an existing folder): one PNG per frame,
      ``frame_00000.png`` ..., exact; needs only Pillow. With ``overwrite`` every ``frame_*.png``
      already there is removed first (none of an earlier, longer video stays behind); a folder that
      is a symbolic link is refused.

    ``fps`` and ``quality`` are real numbers (Python or NumPy, not bools).

    >>> import tempfile
    >>> out = write_video(np.zeros((2, 4, 4, 3), np.uint8), Path(tempfile.mkdtemp()) / "frames")
    >>> sorted(p.name for p in out.iterdir())
    ['frame_00000.png', 'frame_00001.png']
    """
    raw = os.fspath(path)
    if not raw:
        raise VideoError("the video path is empty")
    target = Path(raw)
    kind = _kind(target, raw)
    if not _is_real(fps) or not np.isfinite(float(fps)) or not 0 < float(fps) <= 240:
        raise VideoError(f"fps must be a number in (0, 240], got {fps!r}")
    if not _is_real(quality) or not 0 <= float(quality) <= 10:  # (NaN fails the comparison)
        raise VideoError(f"quality must be a number in [0, 10] (imageio's scale, 10 best), got {quality!r}")
    arr = as_frames(frames)  # (T, H, W, 3) uint8
    if kind != "folder" and target.exists() and not overwrite:
        raise VideoError(f"{target} exists (pass overwrite=True to replace it)")
    if not target.parent.exists() and kind != "folder":
        target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        from PIL import Image

        if target.is_symlink():
            raise VideoError(f"{target} is a symbolic link: refused (write the frames into a real folder)")
        if target.exists() and not target.is_dir():
            raise VideoError(f"{target} is a file, not a folder for per-frame PNGs")
        target.mkdir(parents=True, exist_ok=True)
        old = sorted(target.glob("frame_*.png"))
        if old and not overwrite:
            raise VideoError(f"{target} already holds frame_*.png files (pass overwrite=True to replace them)")
        for file in old:  # a link is removed, never followed; an earlier video's extra frames go too
            if file.is_dir() and not file.is_symlink():
                raise VideoError(f"{file} is a folder, not a frame: refused (remove it, or choose another folder)")
            file.unlink()
        for i, frame in enumerate(arr):
            Image.fromarray(frame).save(target / f"frame_{i:05d}.png")
        return target
    iio = _imageio()
    if kind == "gif":
        duration = 1000.0 / float(fps)  # ms per frame
        iio.imwrite(target, arr, plugin="pillow", extension=".gif", duration=duration, loop=0)
        return target
    _ffmpeg_plugin()
    _, h, w, _ = arr.shape
    if h % 2 or w % 2:
        if not pad_odd:
            raise VideoError(
                f"the frames are {h}x{w}: H.264 (yuv420p) needs an even height and width; pass pad_odd=True to pad "
                "one repeated row / column, or crop the frames"
            )
        arr = pad_even(arr)
    iio.imwrite(
        target,
        arr,
        plugin="FFMPEG",
        extension=".mp4",
        fps=float(fps),
        codec="libx264",
        pixelformat="yuv420p",
        quality=float(quality),
        macro_block_size=1,  # never rescale: the sides are even already
        ffmpeg_log_level="error",
    )
    return target


def _colormap(cmap: str) -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VideoError("overlays use matplotlib's colour maps: pip install 'daami2i[video]'") from exc
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise VideoError(f"unknown colour map {cmap!r} (matplotlib's names, e.g. 'jet', 'viridis', 'gray')") from None


def overlay_frames(
    frames: Any,
    maps: Any,
    alpha: float = 0.5,
    cmap: str = "jet",
    normalize: bool = False,
) -> np.ndarray:
    """``maps`` (T, H, W) coloured with ``cmap`` over ``frames`` -> uint8 (T, H, W, 3).

    The colouring is :func:`daami2i.viz.plot_overlay`'s (matplotlib's ``imshow`` of the map with
    ``cmap`` at ``alpha`` over the image): ``round((1 - alpha) * frame + alpha * 255 * cmap(value))``,
    with the colour map's 256-entry table. The colour scale is [0, 1] for every frame (plot_overlay's
    ``color_normalize=False``), so colours mean the same in every frame; ``normalize=True`` stretches
    the whole video's minimum..maximum to [0, 1] first (one scale for all frames, never per frame).
    Maps must be at the frames' size (a heat map's ``expand_as(frames)``); a different frame count
    or size is a :class:`VideoError`.

    >>> out = overlay_frames(np.zeros((1, 2, 2, 3), np.uint8), np.ones((1, 2, 2)), alpha=1.0)
    >>> out[0, 0, 0].tolist()  # jet at 1 is dark red
    [128, 0, 0]
    """
    rgb = as_frames(frames)  # (T, H, W, 3) uint8
    values = _to_numpy(maps).astype(np.float64)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3:
        raise VideoError(f"maps have shape {values.shape}: expected (frames, height, width)")
    if values.shape[0] != rgb.shape[0]:
        raise VideoError(f"{values.shape[0]} map(s) for {rgb.shape[0]} frame(s): give one map per frame")
    if values.shape[1:] != rgb.shape[1:3]:
        raise VideoError(
            f"the maps are {values.shape[1]}x{values.shape[2]} but the frames {rgb.shape[1]}x{rgb.shape[2]}: expand "
            "them to the frames first (heat_map.expand_as(frames))"
        )
    if not np.isfinite(values).all():
        raise VideoError("the maps hold NaN or infinite values")
    if not _is_real(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise VideoError(f"alpha must be in [0, 1], got {alpha!r}")
    if normalize:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    lut = _colormap(cmap)
    out = np.empty(rgb.shape, dtype=np.uint8)
    for t in range(rgb.shape[0]):  # frame by frame: float64 of one frame at a time
        colours = lut(np.clip(values[t], 0.0, 1.0))[..., :3] * 255.0  # (H, W, 3)
        blend = (1.0 - float(alpha)) * rgb[t] + float(alpha) * colours
        out[t] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return out


def _components(mask: np.ndarray, min_area: int, connectivity: int) -> list[np.ndarray]:
    """Connected components (OpenCV) of one binary mask (H, W) with at least ``min_area`` pixels, in
    OpenCV's label order (raster order of each component's first pixel)."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VideoError("tracks need OpenCV: pip install 'daami2i[datasets]' (opencv-python-headless)") from exc
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    return [labels == k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= min_area]


def _iou_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """IoU of every mask of ``a`` with every mask of ``b``: (len(a), len(b))."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    fa = np.stack([m.reshape(-1) for m in a]).astype(np.float32)  # (A, H*W)
    fb = np.stack([m.reshape(-1) for m in b]).astype(np.float32)  # (B, H*W)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _assign(iou: np.ndarray, threshold: float, optimal: bool | None) -> list[tuple[int, int]]:
    """Pairs (row, column) of ``iou`` matched one to one, each with IoU >= threshold (and > 0).

    Optimal (maximum total IoU over the links that reach the threshold, scipy's
    ``linear_sum_assignment`` on the IoU with the links below the threshold set to 0) when scipy is
    installed or ``optimal=True``; greedy (highest IoU first) when scipy is missing or ``optimal=False``.

    >>> _assign(np.array([[0.5, 0.4], [0.45, 0.0]]), 0.48, optimal=None)
    [(0, 0)]
    """
    if iou.size == 0:
        return []
    # links below the threshold are removed before assigning, so they cannot displace a valid one
    score = np.where(iou >= threshold, iou, 0.0)
    if optimal is not False:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            if optimal:
                raise VideoError("optimal assignment needs scipy: pip install scipy (or pass optimal=False)") from None
        else:
            rows, cols = linear_sum_assignment(score, maximize=True)
            return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if score[r, c] > 0]
    pairs: list[tuple[int, int]] = []
    used_r: set[int] = set()
    used_c: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        r, c = divmod(int(flat), iou.shape[1])
        if iou[r, c] < threshold or iou[r, c] <= 0:
            break
        if r not in used_r and c not in used_c:
            pairs.append((r, c))
            used_r.add(r)
            used_c.add(c)
    return pairs


def track_instances(
    masks: Any,
    min_area: int = 1,
    iou: float = 0.1,
    max_gap: int = 0,
    connectivity: int = 8,
    optimal: bool | None = None,
) -> np.ndarray:
    """Per-frame binary masks (T, H, W) -> int32 track labels (T, H, W); 0 is background.

    Each frame's connected components (OpenCV, ``connectivity`` 4 or 8) of at least ``min_area``
    pixels are linked to the tracks seen in the previous frame (or up to ``max_gap`` frames before
    it: a track missing for at most ``max_gap`` frames can resume, compared by its last mask) by
    mask IoU: a one-to-one assignment maximising the total IoU (scipy's ``linear_sum_assignment``;
    greedy, highest IoU first, when scipy is not installed or ``optimal=False``), each link needing
    IoU >= ``iou``. A component that matches nothing starts a new track; track ids count from 1 in
    order of first appearance. Components that touch are one component: objects that merge share
    one label while they touch (the larger overlap keeps the track) and a part that splits off
    starts a new track.

    >>> m = np.zeros((3, 6, 6), bool); m[:, 1:3, 0:2] = True; m[2, 4:6, 4:6] = True
    >>> track_instances(m)[2].tolist()[4]
    [0, 0, 0, 0, 2, 2]
    """
    arr = _to_numpy(masks)
    if arr.ndim != 3:
        raise VideoError(f"masks have shape {arr.shape}: expected (frames, height, width) binary masks")
    if arr.shape[0] == 0:
        raise VideoError("no masks to track: zero frames")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise VideoError("masks must be binary (bool or 0 / 1); threshold the maps first")
        arr = arr.astype(bool)
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise VideoError(f"min_area must be an integer >= 1 (pixels), got {min_area!r}")
    if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0.0 <= float(iou) <= 1.0:
        raise VideoError(f"iou must be in [0, 1], got {iou!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 0:
        raise VideoError(f"max_gap must be an integer >= 0 (frames), got {max_gap!r}")
    if connectivity not in (4, 8):
        raise VideoError(f"connectivity must be 4 or 8, got {connectivity!r}")
    labels = np.zeros(arr.shape, dtype=np.int32)  # (T, H, W)
    last: dict[int, tuple[int, np.ndarray]] = {}  # track id -> (frame last seen, its mask there)
    next_id = 1
    for t in range(arr.shape[0]):
        comps = _components(arr[t], min_area, connectivity)
        live = [k for k, (seen, _) in last.items() if t - seen <= max_gap + 1]
        pairs = _assign(_iou_matrix(comps, [last[k][1] for k in live]), float(iou), optimal)
        owner = {r: live[c] for r, c in pairs}
        for r, comp in enumerate(comps):
            if r not in owner:
                owner[r] = next_id
                next_id += 1
            labels[t][comp] = owner[r]
            last[owner[r]] = (t, comp)
    return labels


# -- from a trace: heat maps over the frames, pipelines, experiments ------------------------------------
FRAMES_FOLDER = "video_frames"  # an experiment's video frames, one PNG each (written by daami2i generate)


def is_video_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` (a pipeline, or a pipeline class) makes videos: its ``__call__`` takes
    ``num_frames`` (Wan, CogVideoX, AnimateDiff, HunyuanVideo, LTX-Video all do; no image pipeline
    of diffusers does).

    >>> is_video_pipeline(object())
    False
    """
    import inspect

    if isinstance(pipe, type):  # a class: its instances' call
        call = pipe.__call__ if "__call__" in {k for c in pipe.__mro__[:-1] for k in vars(c)} else None
    else:
        call = type(pipe).__call__ if callable(pipe) else None
    if call is None:
        return False
    try:
        return "num_frames" in inspect.signature(call).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False


def video_call(pipe: Any, num_frames: int | None) -> dict[str, Any]:
    """A video pipeline's extra call arguments, for ``daami2i generate`` and the explorer alike:
    frames as an array (``output_type="np"``); ``num_frames`` (when not None); and the text length
    the denoiser fixes (CogVideoX's ``transformer.config.max_text_seq_length``, as
    ``max_sequence_length``).

    >>> class Pipe:
    ...     def __call__(self, prompt, num_frames=49, output_type="pil"): ...
    >>> video_call(Pipe(), 9)
    {'output_type': 'np', 'num_frames': 9}
    """
    import inspect

    from .tracing.trace import denoiser_of

    params = inspect.signature(type(pipe).__call__).parameters
    out: dict[str, Any] = {"output_type": "np"} if "output_type" in params else {}
    if num_frames is not None:
        out["num_frames"] = num_frames
    try:
        denoiser = denoiser_of(pipe)[0]
    except UnsupportedPipelineError:  # no denoiser known (tracing it refuses the pipeline anyway)
        denoiser = None
    fixed = getattr(getattr(denoiser, "config", None), "max_text_seq_length", None)
    if isinstance(fixed, int) and not isinstance(fixed, bool) and "max_sequence_length" in params:
        out["max_sequence_length"] = fixed
    return out


def video_suffix() -> str:
    """``.mp4`` where imageio's ffmpeg plugin is installed, else ``.gif`` (Pillow only).

    >>> video_suffix() in (".mp4", ".gif")
    True
    """
    try:
        import imageio.v3  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return ".gif"
    return ".mp4"


def video_frames_of(output: Any) -> np.ndarray:
    """The first video of a pipeline's output (``.frames``: a (B, T, H, W, 3) array, a list of videos
    of PIL frames, or a (B, T, C, H, W) tensor) as uint8 (T, H, W, 3).

    >>> class Out: frames = np.zeros((1, 2, 4, 6, 3))
    >>> video_frames_of(Out()).shape
    (2, 4, 6, 3)
    """
    frames = getattr(output, "frames", output)
    if isinstance(frames, tuple) and frames:
        frames = frames[0]
    if hasattr(frames, "detach"):
        arr = _to_numpy(frames)
        if arr.ndim == 5 and arr.shape[2] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(0, 1, 3, 4, 2)  # (B, T, C, H, W) -> (B, T, H, W, C)
        frames = arr
    if isinstance(frames, np.ndarray):
        if frames.ndim != 5:
            raise VideoError(f"the pipeline's frames have shape {frames.shape}: expected (videos, frames, h, w, 3)")
        return as_frames(frames[0])
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], (list, tuple, np.ndarray)):
        return as_frames(frames[0])
    raise VideoError(
        f"cannot read a video from the pipeline's output ({type(frames).__name__}): expected .frames as an array "
        "(videos, frames, h, w, 3) or a list of videos of PIL frames"
    )


def _video_map(heat_map: Any) -> Any:
    if not hasattr(heat_map, "expand_as") or not hasattr(heat_map, "value"):
        raise VideoError(f"expected a heat map (a word or region map of a trace), got {type(heat_map).__name__}")
    return heat_map


def expand_heat_map(
    heat_map: Any, frames: Any, *, absolute: bool = False, threshold: float | None = None
) -> np.ndarray:
    """A heat map at the video's frames, float (T, H, W): ``heat_map.expand_as(frames)`` for a video's
    map (normalised over the whole video; ``threshold`` gives 0/1 masks, ``absolute`` raw values);
    an image's map (no frames) takes a video of one frame.

    >>> import torch
    >>> from daami2i.heatmaps.maps import HeatMap
    >>> expand_heat_map(HeatMap(torch.eye(2)), np.zeros((1, 4, 4, 3), np.uint8)).shape
    (1, 4, 4)
    """
    hm = _video_map(heat_map)
    rgb = as_frames(frames)  # (T, H, W, 3) uint8
    t, h, w = rgb.shape[:3]
    if getattr(hm, "frames", None) is None:
        if t != 1:
            raise VideoError(
                f"this map is of an image (one frame) but {t} frames were given: use a video generation's maps"
            )
        return hm.expand_as((h, w), absolute=absolute, threshold=threshold).numpy()[None]
    if hm.frames.video_frames != t:
        raise VideoError(
            f"this map is of a video of {hm.frames.video_frames} frames, but {t} frames were given: pass the frames "
            "this generation made"
        )
    return hm.expand_as((h, w), absolute=absolute, threshold=threshold).numpy()  # (T, H, W)


def heat_map_overlays(
    heat_map: Any,
    frames: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    absolute: bool = False,
    threshold: float | None = None,
) -> np.ndarray:
    """``heat_map`` coloured over every frame, uint8 (T, H, W, 3): :func:`overlay_frames` of
    :func:`expand_heat_map` (one colour scale for the whole video)."""
    return overlay_frames(
        frames, expand_heat_map(heat_map, frames, absolute=absolute, threshold=threshold), alpha=alpha, cmap=cmap
    )


def save_heat_map_video(
    heat_map: Any,
    frames: Any,
    path: str | os.PathLike[str],
    fps: float = 8,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    absolute: bool = False,
    threshold: float | None = None,
    **write_kwargs: Any,
) -> Path:
    """A word or region map of a video generation over its frames, written as MP4, GIF or a PNG folder
    (:func:`write_video`; ``write_kwargs`` go there): frame t shows :func:`heat_map_overlays`' frame t.

    >>> import tempfile, torch
    >>> from daami2i.heatmaps.frames import FrameLayout
    >>> from daami2i.heatmaps.maps import HeatMap
    >>> fox = HeatMap(torch.rand(4, 3), FrameLayout.causal(2, rows=2, temporal=4))  # 2 token frames -> 5 frames
    >>> out = save_heat_map_video(fox, np.zeros((5, 16, 24, 3), np.uint8), Path(tempfile.mkdtemp()) / "fox")
    >>> len(list(out.glob("frame_*.png")))
    5
    """
    overlays = heat_map_overlays(heat_map, frames, alpha=alpha, cmap=cmap, absolute=absolute, threshold=threshold)
    return write_video(overlays, path, fps, **write_kwargs)


def strip(frames: Any, count: int = 8) -> np.ndarray:
    """Up to ``count`` evenly spaced frames side by side, uint8 (H, n * W, 3) (a picture of a video).

    >>> strip(np.zeros((9, 4, 6, 3), np.uint8), count=3).shape
    (4, 18, 3)
    """
    rgb = as_frames(frames)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise VideoError(f"count must be a positive integer (frames in the strip), got {count!r}")
    return np.concatenate(list(rgb[strip_indices(len(rgb), count)]), axis=1)


def labelled_rows(rows: Sequence[np.ndarray], labels: Sequence[str], frame_ids: Sequence[int]) -> np.ndarray:
    """Strips (each uint8 (H, n * W, 3), as :func:`strip` makes them) one below the other, with each
    row's label in a white margin on the left and the video frame of each column above: uint8
    (top + rows * H, left + n * W, 3). The pictures themselves are unchanged (below ``top``, right
    of ``left``), so a test can compare them exactly.

    >>> grid = labelled_rows([np.zeros((4, 12, 3), np.uint8)] * 2, ["fox", "snow"], [0, 4, 8])
    >>> grid.shape[0] > 8 and grid.shape[1] > 12 and not grid[-8:, -12:].any()
    True
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows or len(rows) != len(labels):
        raise VideoError(f"labelled_rows needs one label per row, got {len(rows)} row(s) and {len(labels)} label(s)")
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        raise VideoError(f"the rows differ in shape: {sorted(shapes)[:3]}")
    h, total, _ = rows[0].shape
    if not frame_ids or total % len(frame_ids):
        raise VideoError(f"{len(frame_ids)} frame label(s) do not divide a row of {total} pixels")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + max(int(probe.textlength(str(t), font=font)) for t in labels)
    top = 16
    canvas = Image.new("RGB", (left + total, top + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    width = total // len(frame_ids)
    for j, f in enumerate(frame_ids):
        draw.text((left + j * width + 2, 2), f"frame {f}", fill="black", font=font)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        canvas.paste(Image.fromarray(row), (left, top + i * h))
        draw.text((4, top + i * h + max(0, h // 2 - 6)), str(label), fill="black", font=font)
    return np.asarray(canvas)


def strip_indices(n: int, count: int = 8) -> list[int]:
    """The frames :func:`strip` shows of ``n``: all when ``n <= count``, else ``count`` evenly spaced,
    the first and the last included.

    >>> strip_indices(81, 5)
    [0, 20, 40, 60, 80]
    """
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def frame_pixels_of(ghm: Any) -> tuple[int, int] | None:
    """(height, width) in pixels of one video frame of a video generation's heat map (its image size
    is that of the token frames stacked), or None where the size is not known. (``ghm.frame_size``
    is one frame's latent grid, in tokens.)"""
    size = getattr(ghm, "image_size", None)
    layout = getattr(ghm, "frames", None)
    if not size:
        return None
    if layout is None:
        return int(size[0]), int(size[1])
    return int(size[0]) // layout.token_frames, int(size[1])


def save_experiment_frames(frames: Any, experiment: str | os.PathLike[str]) -> Path:
    """Write a video's frames into an experiment folder (``video_frames/frame_00000.png`` ..., exact),
    where :func:`experiment_frames` finds them; the frames saved there before are replaced (a
    ``video_frames`` that is a symbolic link is refused: nothing is written outside the experiment)."""
    return write_video(frames, Path(experiment) / FRAMES_FOLDER, overwrite=True)


def experiment_frames(exp: Any) -> np.ndarray | None:
    """The video frames saved in an experiment (:func:`save_experiment_frames`) as uint8 (T, H, W, 3),
    checked as untrusted input: PNG files inside the folder, as many as the generation's video frames,
    all of one size; None when the experiment holds none. A damaged folder is a :class:`VideoError`."""
    from PIL import Image

    root = Path(exp.path)
    folder = root / FRAMES_FOLDER
    if not folder.is_dir():
        return None
    try:
        folder.resolve().relative_to(root.resolve())
    except ValueError:
        raise VideoError(f"{folder} leads outside the experiment folder {root}: refused") from None
    files = sorted(folder.glob("frame_*.png"))
    layout = exp.generation.frames
    want = layout.video_frames if layout is not None else 1
    if len(files) != want:
        raise VideoError(f"{folder} holds {len(files)} frame(s) but the generation made {want}: save the frames again")
    out = []
    for file in files:
        if file.is_symlink():
            raise VideoError(f"{file} is a link: refused (the frames must be files inside the experiment)")
        try:
            with Image.open(file, formats=["PNG"]) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as exc:
            raise VideoError(f"{file} is not a readable PNG image ({exc})") from None
    return as_frames(out)

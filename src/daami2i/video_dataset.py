"""Video instance-segmentation datasets: export frames and per-object mask tracks in the two formats a
video segmentation user loads, and read an export back with every field checked.

Layout of ``out_dir``::

    frames/<video name>/00000.jpg ...   one image per frame (JPEG or PNG)
    instances.json                      COCO, one image per frame: images carry ``video_id`` and
                                        ``frame_id``, annotations a ``track_id`` (the object); loads
                                        with pycocotools' ``COCO`` and evaluates with ``COCOeval``
    ytvis.json                          YouTube-VIS (the format of youtubevos/cocoapi's ``YTVOS``):
                                        one annotation per object with per-frame lists
                                        ``segmentations`` / ``areas`` / ``bboxes`` (None where the
                                        object is absent)

Every path in both files is relative to ``out_dir`` (``frames/<video>/00000.jpg``), so ``out_dir`` is
the image root for either loader. Masks are COCO compressed RLE, boxes ``[x, y, width, height]``
in pixels, areas in pixels. Ids count from 1: videos in the order given, categories by sorted name,
tracks (YouTube-VIS annotation ids, the COCO annotations' ``track_id``) in the order of the
videos and their objects, COCO images and annotations in frame order.

>>> import numpy as np, tempfile
>>> frames = np.zeros((2, 8, 8, 3), np.uint8)
>>> masks = np.zeros((2, 8, 8), bool); masks[:, 2:5, 2:6] = True
>>> out = Path(tempfile.mkdtemp()) / "vis"
>>> ds = export_video_dataset([{"frames": frames, "objects": [{"category": "fox", "masks": masks}]}], out)
>>> [len(ds.coco["images"]), len(ds.coco["annotations"]), len(ds.ytvis["annotations"])]
[2, 2, 1]
>>> bool((load_video_dataset(out).track_masks(1) == masks).all())
True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from .datasets import DatasetWarning
from .errors import Daami2iError, QueryError
from .heatmaps.regions import check_fraction
from .video import MAX_SIDE, VideoError, as_frames

FORMATS = ("jpg", "png")
MAX_JSON_BYTES = 2**31  # an annotation file larger than this is refused before it is read
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class VideoDatasetError(Daami2iError, ValueError):
    """A video dataset that cannot be written, or an export on disk that is damaged or unsafe."""


@contextlib.contextmanager
def _pillow_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to a frame of ``MAX_SIDE`` x ``MAX_SIDE`` pixels (the
    largest the annotations may state) while frames are read, so a legal frame is not refused by
    Pillow's default (89 M pixels) and the stated sizes decide; a header beyond twice that still
    raises Pillow's ``DecompressionBombError`` (reported by the callers, naming the file). Pillow's
    limit is one process-wide setting: it is restored on leaving."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    if old is not None:  # (None: the check is off already)
        Image.MAX_IMAGE_PIXELS = max(old, MAX_SIDE * MAX_SIDE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _read_frame(path: Path, name: str, where: str, size: tuple[int, int]) -> np.ndarray:
    """The frame image ``path`` (``name`` in the annotations) as uint8 (H, W, 3), checked to be a
    readable image of ``size`` (height, width)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise VideoDatasetError(f"{where}: frame file {name!r} is missing from {path.parent}")
    try:
        with _pillow_limit(), Image.open(path) as img:
            w, h = img.size
            arr = np.asarray(img.convert("RGB")) if (h, w) == size else None
    except Image.DecompressionBombError as exc:
        raise VideoDatasetError(f"{where}: {name!r} is refused: its header states an image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VideoDatasetError(f"{where}: {name!r} is not a readable image ({exc})") from None
    if arr is None:
        raise VideoDatasetError(f"{where}: {name!r} is {h}x{w} but the annotations say {size[0]}x{size[1]}")
    return arr


@dataclass
class VideoDataset:
    """An export: its folder and the two annotation files (as JSON objects)."""

    root: Path
    coco: dict[str, Any]  # instances.json
    ytvis: dict[str, Any]  # ytvis.json

    def coco_api(self) -> Any:
        """pycocotools' ``COCO`` on ``instances.json`` (quiet)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            api = COCO()
            api.dataset = json.loads(json.dumps(self.coco))  # pycocotools edits what it is given
            api.createIndex()
        return api

    def track_masks(self, track_id: int) -> np.ndarray:
        """The masks (T, H, W) bool of one track (a YouTube-VIS annotation id), False where it is absent."""
        from pycocotools import mask as cm

        ann = next((a for a in self.ytvis["annotations"] if a["id"] == track_id), None)
        if ann is None:
            raise VideoDatasetError(f"no track {track_id} in {self.root / 'ytvis.json'}")
        video = next(v for v in self.ytvis["videos"] if v["id"] == ann["video_id"])
        out = np.zeros((video["length"], video["height"], video["width"]), dtype=bool)
        for t, seg in enumerate(ann["segmentations"]):
            if seg is not None:
                out[t] = cm.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}).astype(bool)
        return out

    def frames(self, video_id: int) -> np.ndarray:
        """The frames (T, H, W, 3) uint8 of one video, read from disk; a frame file that is missing,
        unreadable or not of the video's size is a :class:`VideoDatasetError` (the loader checks
        them all up front unless ``check_images=False``)."""
        video = next((v for v in self.ytvis["videos"] if v["id"] == video_id), None)
        if video is None:
            raise VideoDatasetError(f"no video {video_id} in {self.root / 'ytvis.json'}")
        size = (video["height"], video["width"])
        where = f"{self.root / 'ytvis.json'}, video {video_id}"
        return np.stack(
            [
                _read_frame(self.root / name, name, f"{where}, frame {t}", size)
                for t, name in enumerate(video["file_names"])
            ]
        )


# -- export --------------------------------------------------------------------------------------------
def _binary(value: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if arr.shape != shape:
        raise VideoDatasetError(f"{where} has shape {arr.shape}, but the video's frames need {shape} (frames, h, w)")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise VideoDatasetError(f"{where} is not binary (bool or 0 / 1): threshold the maps first")
        arr = arr.astype(bool)
    return arr


def _objects(video: Mapping[str, Any], shape: tuple[int, int, int], where: str) -> list[tuple[str, np.ndarray]]:
    """(category, masks (T, H, W) bool) of every object of one video, from ``objects`` or ``tracks``."""
    if ("objects" in video) == ("tracks" in video):
        raise VideoDatasetError(
            f"{where} needs either 'objects' ([{{'category': ..., 'masks': (T, H, W)}}, ...]) or 'tracks' (a (T, H, W) "
            "label array, as track_instances gives, with 'categories'), not both or neither"
        )
    out: list[tuple[str, np.ndarray]] = []
    if "objects" in video:
        objects = video["objects"]
        if isinstance(objects, (str, bytes, Mapping)) or not isinstance(objects, Sequence):
            raise VideoDatasetError(
                f"{where}'s 'objects' must be a list of {{'category', 'masks'}}, got {objects!r:.80}"
            )
        for j, obj in enumerate(objects):
            if not isinstance(obj, Mapping) or "category" not in obj or "masks" not in obj:
                raise VideoDatasetError(f"{where}, object {j}: expected a dict with 'category' and 'masks'")
            out.append(
                (
                    _category(obj["category"], f"{where}, object {j}"),
                    _binary(obj["masks"], shape, f"{where}, object {j}"),
                )
            )
        return out
    tracks = video["tracks"]
    labels = tracks.detach().cpu().numpy() if hasattr(tracks, "detach") else np.asarray(tracks)
    if labels.shape != shape:
        raise VideoDatasetError(f"{where}'s tracks have shape {labels.shape}, but the frames need {shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise VideoDatasetError(f"{where}'s tracks must be integer labels >= 0 (0 = background)")
    cats = video.get("categories")
    for label in (int(v) for v in np.unique(labels) if v != 0):
        name = cats.get(label) if isinstance(cats, Mapping) else cats
        if name is None:
            raise VideoDatasetError(
                f"{where}: track label {label} has no category: pass 'categories' as one name for every track or a "
                "{label: name} dict"
            )
        out.append((_category(name, f"{where}, track {label}"), labels == label))
    return out


def _category(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise VideoDatasetError(f"{where}: a category is a non-empty string, got {name!r}")
    return " ".join(name.split())


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as cm

    rle = cm.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def export_video_dataset(
    videos: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    description: str = "daami2i synthetic video dataset",
) -> VideoDataset:
    """Write ``videos`` to ``out_dir`` as frames, ``instances.json`` (COCO) and ``ytvis.json``
    (YouTube-VIS); returns the export as :func:`load_video_dataset` reads it back.

    Each video is a dict: ``frames`` (what :func:`daami2i.video.as_frames` takes: T frames) and
    either ``objects`` (a list of ``{"category": str, "masks": (T, H, W) bool}``, one per object)
    or ``tracks`` (a (T, H, W) int label array, 0 = background, as
    :func:`daami2i.video.track_instances` gives) with ``categories`` (one name for every track, or
    ``{label: name}``); optionally ``name`` (the frame folder's name: letters, digits, ``_.-``;
    default ``00001`` ...) and ``caption`` (kept in both files' video entries). An object absent from
    every frame is skipped with a :class:`~daami2i.datasets.DatasetWarning`. ``out_dir`` must be new
    or empty unless ``overwrite`` (files of the same names are then replaced).
    """
    from PIL import Image

    if image_format not in FORMATS:
        raise VideoDatasetError(f"image_format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise VideoDatasetError(f"jpeg_quality must be an integer in 1..100, got {jpeg_quality!r}")
    if isinstance(videos, Mapping) or not isinstance(videos, Sequence) or not videos:
        raise VideoDatasetError("videos must be a non-empty list of dicts ({'frames': ..., 'objects': [...]})")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise VideoDatasetError(f"the output folder {root} is a file: choose a folder for the dataset")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise VideoDatasetError(f"{root} is not empty: choose a new folder, or pass overwrite=True")
    prepared: list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]], str | None]] = []
    names: set[str] = set()
    for v, video in enumerate(videos):
        where = f"video {v}"
        if not isinstance(video, Mapping) or "frames" not in video:
            raise VideoDatasetError(f"{where}: expected a dict with 'frames' and 'objects' (or 'tracks')")
        name = video.get("name", f"{v + 1:05d}")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in names:
            why = "is used twice" if name in names else "must be letters, digits and _.- (at most 128, no path)"
            raise VideoDatasetError(f"{where}: name {name!r} {why}")
        names.add(name)
        try:
            frames = as_frames(video["frames"])  # (T, H, W, 3) uint8
        except VideoError as exc:
            raise VideoDatasetError(f"{where}: {exc}") from None
        caption = video.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise VideoDatasetError(f"{where}: caption must be a string, got {caption!r:.80}")
        prepared.append((name, frames, _objects(video, frames.shape[:3], where), caption))
    categories = sorted({c for _, _, objs, _ in prepared for c, _ in objs})
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    cats = [{"id": cat_id[c], "name": c, "supercategory": "object"} for c in categories]
    coco: dict[str, Any] = {"info": {"description": description}, "videos": [], "images": [], "annotations": []}
    ytvis: dict[str, Any] = {"info": {"description": description}, "videos": [], "annotations": []}
    image_id = 0
    track_id = 0
    for v, (name, frames, objects, caption) in enumerate(prepared):
        video_id = v + 1
        length, h, w = frames.shape[:3]
        folder = root / "frames" / name
        folder.mkdir(parents=True, exist_ok=True)
        file_names = [f"frames/{name}/{t:05d}.{image_format}" for t in range(length)]
        first_image = image_id + 1
        for t, frame in enumerate(frames):
            image_id += 1
            img = Image.fromarray(frame)
            target = root / file_names[t]
            tmp = target.with_name(f".{target.name}.tmp")
            if image_format == "jpg":
                img.save(tmp, format="JPEG", quality=jpeg_quality)
            else:
                img.save(tmp, format="PNG")
            os.replace(tmp, target)
            coco["images"].append(
                {
                    "id": image_id,
                    "file_name": file_names[t],
                    "height": h,
                    "width": w,
                    "video_id": video_id,
                    "frame_id": t,
                }
            )
        entry: dict[str, Any] = {"id": video_id, "name": name, "height": h, "width": w, "length": length}
        if caption is not None:
            entry["caption"] = caption
        coco["videos"].append(dict(entry))
        ytvis["videos"].append({**entry, "file_names": file_names})
        for j, (category, masks) in enumerate(objects):
            if not masks.any():
                warnings.warn(
                    f"video {v} ({name}), object {j} ({category!r}) is empty in every frame: skipped", DatasetWarning, 2
                )
                continue
            track_id += 1
            segs: list[dict[str, Any] | None] = []
            areas: list[int | None] = []
            boxes: list[list[float] | None] = []
            for t in range(length):
                if not masks[t].any():
                    segs.append(None)
                    areas.append(None)
                    boxes.append(None)
                    continue
                rle, area, box = _rle(masks[t]), int(masks[t].sum()), _bbox(masks[t])
                segs.append(rle)
                areas.append(area)
                boxes.append(box)
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": first_image + t,
                        "video_id": video_id,
                        "track_id": track_id,
                        "category_id": cat_id[category],
                        "segmentation": rle,
                        "area": area,
                        "bbox": box,
                        "iscrowd": 0,
                    }
                )
            ytvis["annotations"].append(
                {
                    "id": track_id,
                    "video_id": video_id,
                    "category_id": cat_id[category],
                    "segmentations": segs,
                    "areas": areas,
                    "bboxes": boxes,
                    "iscrowd": 0,
                    "height": h,
                    "width": w,
                }
            )
    coco["annotations"].sort(key=lambda a: (a["image_id"], a["track_id"]))
    for i, ann in enumerate(coco["annotations"]):
        ann["id"] = i + 1
    coco["categories"] = cats
    ytvis["categories"] = [dict(c) for c in cats]
    _write_json(root / "instances.json", coco)
    _write_json(root / "ytvis.json", ytvis)
    return VideoDataset(root, coco, ytvis)


# -- from a trace ----------------------------------------------------------------------------------------
def objects_from_heat_maps(
    ghm: Any,
    frames: Any,
    words: Sequence[str],
    threshold: float = 0.4,
    *,
    merged: bool = False,
    min_area: int = 1,
    iou: float = 0.1,
    max_gap: int = 0,
) -> list[dict[str, Any]]:
    """The objects of one video from a trace's word maps, as :func:`export_video_dataset` takes them.

    Per word: its map (``merged``: refined once by self-attention, ``compute_guided_heat_map``) over
    the video, thresholded per video frame (``expand_as(frames, threshold=threshold)``: the map
    normalised over the whole video, so a frame where the word is weak has a smaller mask), split
    into connected instances and linked into tracks over the frames
    (:func:`daami2i.video.track_instances` with ``min_area``, ``iou``, ``max_gap``). Returns one
    ``{"category": word, "masks": (T, H, W) bool}`` per track, in track order per word; a word whose
    mask is empty everywhere gives none.
    """
    from .video import as_frames, expand_heat_map, track_instances

    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise VideoDatasetError(f"words must be a non-empty list of the prompt's words, got {words!r:.80}")
    try:
        cut = check_fraction(threshold)  # the range expand_as(threshold=...) takes
    except QueryError as exc:
        raise VideoDatasetError(str(exc)) from None
    try:
        rgb = as_frames(frames)  # (T, H, W, 3)
    except VideoError as exc:
        raise VideoDatasetError(str(exc)) from None
    out: list[dict[str, Any]] = []
    for word in words:
        category = _category(word, f"word {word!r}")
        heat = ghm.compute_word_heat_map(word)
        if merged:
            heat = ghm.compute_guided_heat_map(heat)
        masks = expand_heat_map(heat, rgb, threshold=cut) > 0.5  # (T, H, W) bool
        labels = track_instances(masks, min_area=min_area, iou=iou, max_gap=max_gap)
        for label in range(1, int(labels.max()) + 1):
            out.append({"category": category, "masks": labels == label})
    return out


def video_from_trace(
    ghm: Any,
    frames: Any,
    words: Sequence[str],
    threshold: float = 0.4,
    *,
    name: str | None = None,
    caption: str | None = None,
    **track_kwargs: Any,
) -> dict[str, Any]:
    """One video entry of :func:`export_video_dataset` (frames, objects, name, caption) from a
    trace's heat map: :func:`objects_from_heat_maps` (``track_kwargs`` go there).

    >>> # with daami2i.trace(pipe) as trc: frames = pipe(prompt, ...).frames[0]
    >>> # export_video_dataset([video_from_trace(trc.compute_global_heat_map(), frames, ["fox"])], "out")
    """
    entry: dict[str, Any] = {
        "frames": frames,
        "objects": objects_from_heat_maps(ghm, frames, words, threshold, **track_kwargs),
    }
    if name is not None:
        entry["name"] = name
    if caption is not None:
        entry["caption"] = caption
    return entry


# -- reading an export back (untrusted) -----------------------------------------------------------------
def rle_counts(counts: str, where: str | None = None) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' ``counts``), decoded here so a
    damaged string is an error instead of reaching pycocotools' C decoder; ``where`` (the file and
    entry) starts the error's message.

    >>> from pycocotools import mask as cm
    >>> m = np.zeros((4, 5), np.uint8); m[1:3, 1:4] = 1  # runs down the columns (Fortran order)
    >>> rle_counts(cm.encode(np.asfortranarray(m))["counts"].decode())
    [5, 2, 2, 2, 2, 2, 5]
    """
    at = f"{where}: " if where else ""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts) or k >= 13:
                raise VideoDatasetError(f"{at}the mask's RLE counts string is cut short or holds a number too large")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise VideoDatasetError(f"{at}the mask's RLE counts string holds the character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VideoDatasetError(f"{path} is missing: is {path.parent} a daami2i video dataset export?")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise VideoDatasetError(f"{path} is larger than {MAX_JSON_BYTES} bytes: refused")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise VideoDatasetError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VideoDatasetError(f"{path} is a JSON {type(data).__name__}, not an object")
    for key in ("videos", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise VideoDatasetError(f"{path} has no {key!r} list")
    return data


def _safe_file(root: Path, name: Any, where: str, check_images: bool, size: tuple[int, int]) -> None:
    """``name`` is a relative path inside ``root`` (no '..', absolute or drive paths, no escaping link)
    of an existing image of ``size`` (height, width)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise VideoDatasetError(f"{where}: file name {name!r:.80} is not a relative path")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or any(p in ("..", ".", "") for p in name.split("/")):
        raise VideoDatasetError(f"{where}: file name {name!r:.80} leaves the dataset folder (absolute or '..')")
    path = root / posix
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise VideoDatasetError(f"{where}: file {name!r:.80} resolves outside the dataset folder {root}") from None
    if not check_images:
        return
    if not path.is_file():
        raise VideoDatasetError(f"{where}: frame file {name!r} is missing from {root}")
    from PIL import Image, UnidentifiedImageError

    try:  # the header only: its size (Pillow's bomb check at the largest legal frame, _pillow_limit)
        with _pillow_limit(), Image.open(path) as img:
            w, h = img.size
    except Image.DecompressionBombError as exc:
        raise VideoDatasetError(f"{where}: {name!r} is refused: its header states an image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VideoDatasetError(f"{where}: {name!r} is not a readable image ({exc})") from None
    if (h, w) != size:
        raise VideoDatasetError(f"{where}: {name!r} is {h}x{w} but the annotations say {size[0]}x{size[1]}")


def _check_rle(seg: Any, size: tuple[int, int], where: str) -> tuple[int, list[float] | None]:
    """A compressed RLE of ``size`` (height, width); returns its area and its box ``[x, y, width,
    height]`` (None for an empty mask)."""
    if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str) or not isinstance(seg.get("size"), list):
        raise VideoDatasetError(f"{where}: a mask must be a compressed RLE {{'size': [h, w], 'counts': str}}")
    if seg["size"] != list(size):
        raise VideoDatasetError(f"{where}: the mask is {seg['size']} (height, width) but the frame is {list(size)}")
    runs = rle_counts(seg["counts"], where)
    if any(r < 0 for r in runs) or sum(runs) != size[0] * size[1]:
        raise VideoDatasetError(f"{where}: the mask's runs cover {sum(runs)} pixels, not {size[0]} x {size[1]}")
    return sum(runs[1::2]), _rle_box(runs, size[0])


def _rle_box(runs: list[int], height: int) -> list[float] | None:
    """The box ``[x, y, width, height]`` of the mask whose column-major runs are ``runs`` (background
    first) in a frame ``height`` pixels tall, as :func:`_bbox` gives it for the decoded mask; None
    when the mask is empty. A run that crosses a column's end covers the rows from its start down and
    from the top to its end, so the rows reach the frame's first and last."""
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    start = 0
    for k, run in enumerate(runs):
        if k % 2 and run > 0:
            end = start + run - 1  # the run's last pixel (flat, column-major)
            (ca, ra), (cb, rb) = divmod(start, height), divmod(end, height)
            x0, x1 = min(x0, ca), max(x1, cb)
            y0, y1 = (min(y0, 0), max(y1, height - 1)) if ca != cb else (min(y0, ra), max(y1, rb))
        start += run
    if x1 < 0:
        return None
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _check_box(box: Any, size: tuple[int, int], where: str, drawn: list[float] | None) -> None:
    """``box`` is ``[x, y, width, height]`` in the frame of ``size`` and is the mask's box ``drawn``."""
    ok = isinstance(box, list) and len(box) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not ok or box[0] < 0 or box[1] < 0 or box[2] <= 0 or box[3] <= 0:
        raise VideoDatasetError(f"{where}: bbox {box!r:.80} is not [x, y, width, height] with positive sides")
    if box[0] + box[2] > size[1] + 1e-6 or box[1] + box[3] > size[0] + 1e-6:
        raise VideoDatasetError(f"{where}: bbox {box!r} reaches past the {size[0]}x{size[1]} frame")
    if drawn is None or any(abs(float(a) - b) > 1e-6 for a, b in zip(box, drawn, strict=True)):
        raise VideoDatasetError(f"{where}: bbox {box!r} is not its mask's box ({drawn})")


def _check_crowd(value: Any, where: str) -> None:
    if not _int(value, 0, 1):
        raise VideoDatasetError(f"{where}: iscrowd must be 0 or 1, got {value!r:.80}")


def _check_categories(cats: dict[int, dict[str, Any]], path: Path) -> None:
    for cid, cat in cats.items():
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise VideoDatasetError(f"{path}, category {cid}: its name must be a non-empty string, got {name!r:.80}")


def _unique_ids(items: list[Any], what: str, path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict) or not _int(item.get("id"), 1, 2**53):
            raise VideoDatasetError(f"{path}: a {what} has no positive integer id: {str(item):.80}")
        if item["id"] in out:
            raise VideoDatasetError(f"{path}: {what} id {item['id']} is used twice")
        out[item["id"]] = item
    return out


def load_video_dataset(root: str | os.PathLike[str], *, check_images: bool = True) -> VideoDataset:
    """Read an export of :func:`export_video_dataset` and check it as untrusted input.

    Checked: both files are JSON objects with their lists; ids are unique positive integers; every
    video's sizes are 1..16384 and its frames are ``frame_id`` 0..length-1, each once, in both
    files alike; every file name is a relative path that stays inside ``root`` (no '..', absolute
    path or escaping link), no two frames share a file, and (``check_images``) each names an
    existing image of the stated size (Pillow's decompression-bomb limit raised to the largest
    legal frame while the headers are read); every mask is a compressed RLE of its frame's size
    whose runs cover the frame exactly and whose area is the stated one; every box is its mask's
    box; categories are named by non-empty strings; ``iscrowd`` is 0 or 1; every annotation's
    image, video, category and track exist and agree. The first problem found is a
    :class:`VideoDatasetError` naming the file and the entry.
    """
    root = Path(root)
    if not root.is_dir():
        raise VideoDatasetError(f"{root} is not a folder: pass the export's folder")
    coco_path, ytvis_path = root / "instances.json", root / "ytvis.json"
    coco, ytvis = _read(coco_path), _read(ytvis_path)
    if not isinstance(coco.get("images"), list):
        raise VideoDatasetError(f"{coco_path} has no 'images' list")
    cats = _unique_ids(coco["categories"], "category", coco_path)
    _check_categories(cats, coco_path)
    if {c: v.get("name") for c, v in _unique_ids(ytvis["categories"], "category", ytvis_path).items()} != {
        c: v.get("name") for c, v in cats.items()
    }:
        raise VideoDatasetError(f"{coco_path} and {ytvis_path} list different categories")
    videos = _unique_ids(ytvis["videos"], "video", ytvis_path)
    coco_videos = _unique_ids(coco["videos"], "video", coco_path)
    if set(videos) != set(coco_videos):
        raise VideoDatasetError(f"{coco_path} and {ytvis_path} list different videos")
    sizes: dict[int, tuple[int, int, int]] = {}
    used: dict[str, str] = {}  # file name -> the frame that has it
    for vid, v in videos.items():
        where = f"{ytvis_path}, video {vid}"
        if not all(_int(v.get(k), 1, MAX_SIDE) for k in ("height", "width")) or not _int(v.get("length"), 1, 10**6):
            raise VideoDatasetError(f"{where}: height and width must be integers in 1..{MAX_SIDE}, length >= 1")
        names = v.get("file_names")
        if not isinstance(names, list) or len(names) != v["length"]:
            raise VideoDatasetError(f"{where}: 'file_names' must list its {v['length']} frames")
        if any(coco_videos[vid].get(k) != v[k] for k in ("height", "width", "length")):
            raise VideoDatasetError(f"video {vid}: its sizes differ between {coco_path} and {ytvis_path}")
        sizes[vid] = (v["length"], v["height"], v["width"])
        for t, name in enumerate(names):
            _safe_file(root, name, f"{where}, frame {t}", check_images, (v["height"], v["width"]))
            if name in used:
                raise VideoDatasetError(f"{where}, frame {t}: its file {name!r:.80} is also {used[name]}'s")
            used[name] = f"video {vid}, frame {t}"
    images = _unique_ids(coco["images"], "image", coco_path)
    frame_of: dict[tuple[int, int], dict[str, Any]] = {}
    for img in images.values():
        where = f"{coco_path}, image {img['id']}"
        video: Any = img.get("video_id")
        frame: Any = img.get("frame_id")
        if video not in sizes:
            raise VideoDatasetError(f"{where}: video_id {video!r} is not one of the videos")
        length, h, w = sizes[video]
        if not _int(frame, 0, length - 1):
            raise VideoDatasetError(f"{where}: frame_id {frame!r} is not in 0..{length - 1} of video {video}")
        if (video, frame) in frame_of:
            raise VideoDatasetError(f"{where}: frame {frame} of video {video} is listed twice")
        if (img.get("height"), img.get("width")) != (h, w):
            raise VideoDatasetError(f"{where}: it is {img.get('height')}x{img.get('width')}, its video {h}x{w}")
        if img.get("file_name") != videos[video]["file_names"][frame]:
            raise VideoDatasetError(
                f"{where}: file {img.get('file_name')!r:.80} is not frame {frame} of video {video} in {ytvis_path}"
            )
        frame_of[(video, frame)] = img
    for vid, (length, _, _) in sizes.items():
        missing = [t for t in range(length) if (vid, t) not in frame_of]
        if missing:
            raise VideoDatasetError(f"{coco_path}: video {vid} has no image for frame(s) {missing[:5]}")
    tracks = _unique_ids(ytvis["annotations"], "annotation", ytvis_path)
    for tid, a in tracks.items():
        where = f"{ytvis_path}, annotation {tid}"
        if a.get("video_id") not in sizes or a.get("category_id") not in cats:
            raise VideoDatasetError(f"{where}: its video_id or category_id is not in the file")
        length, h, w = sizes[a["video_id"]]
        segs: Any = a.get("segmentations")
        areas: Any = a.get("areas")
        boxes: Any = a.get("bboxes")
        if not all(isinstance(x, list) and len(x) == length for x in (segs, areas, boxes)):
            raise VideoDatasetError(
                f"{where}: segmentations, areas and bboxes must each list its video's {length} frames"
            )
        _check_crowd(a.get("iscrowd"), where)
        for t, (seg, area, box) in enumerate(zip(segs, areas, boxes, strict=True)):
            if seg is None:
                if area is not None or box is not None:
                    raise VideoDatasetError(f"{where}, frame {t}: no mask but an area or a box")
                continue
            drawn, drawn_box = _check_rle(seg, (h, w), f"{where}, frame {t}")
            if area != drawn:
                raise VideoDatasetError(f"{where}, frame {t}: area {area!r} but the mask has {drawn} pixels")
            _check_box(box, (h, w), f"{where}, frame {t}", drawn_box)
    seen: set[tuple[int, int]] = set()
    for ann in _unique_ids(coco["annotations"], "annotation", coco_path).values():
        where = f"{coco_path}, annotation {ann['id']}"
        image = images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if image is None:
            raise VideoDatasetError(f"{where}: image_id {ann.get('image_id')!r} is not one of the images")
        track = tracks.get(ann.get("track_id"))  # type: ignore[arg-type]
        if track is None or track["video_id"] != image["video_id"] or track["category_id"] != ann.get("category_id"):
            raise VideoDatasetError(
                f"{where}: track_id {ann.get('track_id')!r} is not a track of video {image['video_id']} with category "
                f"{ann.get('category_id')!r} in {ytvis_path}"
            )
        if ann.get("video_id") != image["video_id"] or (track["id"], image["frame_id"]) in seen:
            raise VideoDatasetError(f"{where}: its video_id differs from its image's, or its track has two masks there")
        seen.add((track["id"], image["frame_id"]))
        size = (image["height"], image["width"])
        drawn, drawn_box = _check_rle(ann.get("segmentation"), size, where)
        if ann.get("area") != drawn or ann.get("segmentation") != track["segmentations"][image["frame_id"]]:
            raise VideoDatasetError(f"{where}: its mask or area differs from track {track['id']}'s in {ytvis_path}")
        _check_box(ann.get("bbox"), size, where, drawn_box)
        _check_crowd(ann.get("iscrowd"), where)
    if len(seen) != sum(s is not None for a in tracks.values() for s in a["segmentations"]):
        raise VideoDatasetError(f"{coco_path} lacks per-frame annotations that {ytvis_path}'s tracks have")
    return VideoDataset(root, coco, ytvis)

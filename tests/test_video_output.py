"""Video output (``daami2i.video``) and the video dataset export (``daami2i.video_dataset``): MP4 / GIF /
PNG folders decode to what was written, overlays equal an independent computation, tracks link
synthetic moving squares, and exports load with pycocotools, self-evaluate to AP 1.0 and refuse
damaged files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daami2i.errors import Daami2iError
from daami2i.video import (
    VideoError,
    as_frames,
    overlay_frames,
    save_experiment_frames,
    track_instances,
    write_video,
)
from daami2i.video_dataset import VideoDatasetError, export_video_dataset, load_video_dataset, rle_counts

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255], [255, 255, 255], [0, 0, 0]],
    np.uint8,
)


def solid_frames(h: int, w: int, colours: np.ndarray = COLOURS) -> np.ndarray:
    """One solid colour per frame: (T, H, W, 3) uint8."""
    return np.broadcast_to(colours[:, None, None, :], (len(colours), h, w, 3)).copy()


# -- writing ---------------------------------------------------------------------------------------------
def test_mp4_decodes_to_the_frames_in_order(tmp_path: Path) -> None:
    frames = solid_frames(32, 48)
    frames[:, 8:16, 8:24] = [40, 80, 120]  # an edge, so the lossy coder has something to blur
    path = write_video(frames, tmp_path / "v.mp4", fps=8)
    got = iio.imread(path, plugin="FFMPEG", index=None)  # (T, H, W, 3)
    assert got.shape == frames.shape
    # the encoder is deterministic: the same frames encode to the same video, bit for bit
    assert np.array_equal(got, iio.imread(write_video(frames, tmp_path / "w.mp4", fps=8), plugin="FFMPEG", index=None))
    # H.264 / yuv420p is lossy, so what it decodes to is bounded, not exact. The bounds follow from the
    # format, not from a run: RGB -> 8-bit YCbCr -> RGB rounds each channel by at most ~2 levels, and
    # yuv420p keeps one chroma sample per 2 x 2 pixels, so only the pixels next to a colour edge (here
    # the box's 48 edge pixels of 1536, and the frame changes between solid colours) move further. A
    # frame's centre, far from the box, keeps its colour to within the rounding (< 8 levels), so each
    # frame is its own colour, in order.
    assert np.abs(got.astype(int) - frames).mean() < 4.0
    for t, colour in enumerate(COLOURS):
        centre = got[t, 20:30, 30:44].reshape(-1, 3).mean(0)
        assert np.abs(centre - colour).max() < 8, (t, centre, colour)
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == 8.0


def test_mp4_odd_sizes_are_padded_or_refused(tmp_path: Path) -> None:
    frames = solid_frames(17, 23)
    path = write_video(frames, tmp_path / "odd.mp4")
    got = iio.imread(path, plugin="FFMPEG", index=None)
    assert got.shape == (len(COLOURS), 18, 24, 3)  # one repeated row and column
    # exactly the encoding of the frames padded by hand (the last row and column repeated) ...
    padded = np.concatenate([frames, frames[:, -1:]], axis=1)
    padded = np.concatenate([padded, padded[:, :, -1:]], axis=2)
    assert np.array_equal(got, iio.imread(write_video(padded, tmp_path / "even.mp4"), plugin="FFMPEG", index=None))
    # ... which, solid colours with no edge inside a frame, decode to within the YCbCr rounding (~2 levels)
    assert np.abs(got[:, :17, :23].astype(int) - frames).mean() < 3.0
    with pytest.raises(VideoError, match="even height and width"):
        write_video(frames, tmp_path / "odd2.mp4", pad_odd=False)


def test_gif_of_a_palette_image_is_exact_and_loops(tmp_path: Path) -> None:
    frames = solid_frames(17, 23)
    frames[:, 3:9, 4:12] = [10, 20, 30]  # 2 colours per frame: fits GIF's palette
    path = write_video(list(frames), tmp_path / "v.gif", fps=10)
    got = iio.imread(path, plugin="pillow", index=None, mode="RGB")
    assert got.shape == frames.shape
    assert np.array_equal(got, frames)
    meta = iio.immeta(path, plugin="pillow", index=None)
    assert meta["loop"] == 0 and meta["duration"] == 100


def test_png_folder_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    folder = write_video(frames, str(tmp_path / "out") + "/")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    got = np.stack([np.asarray(Image.open(folder / n)) for n in names])
    assert np.array_equal(got, frames)


def test_frame_inputs_pil_float_and_grey() -> None:
    pil = [Image.new("RGB", (4, 2), (10, 20, 30)), Image.new("L", (4, 2), 7)]
    arr = as_frames(pil)
    assert arr.shape == (2, 2, 4, 3) and arr[0, 0, 0].tolist() == [10, 20, 30] and arr[1, 0, 0].tolist() == [7, 7, 7]
    assert as_frames(np.full((1, 2, 2, 3), 0.5))[0, 0, 0].tolist() == [128, 128, 128]
    import torch

    grey = as_frames(torch.linspace(0, 1, 30).reshape(2, 3, 5))  # (T, H, W) grey: its last side is not 3 or 4
    assert (
        grey.shape == (2, 3, 5, 3) and grey[1, 2, 4].tolist() == [255, 255, 255] and grey[0, 0, 0].tolist() == [0] * 3
    )


def test_one_rgb_image_is_not_read_as_grey_frames() -> None:
    """(H, W, 3) is one picture (as daami2i.heatmaps.maps.video_size_of reads it), not 3-pixel-wide grey frames."""
    from daami2i.errors import QueryError
    from daami2i.heatmaps.maps import video_size_of

    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0] = 200
    for arr in (image, image.astype(np.float32) / 255, np.zeros((4, 6, 4), np.uint8)):
        with pytest.raises(VideoError, match=r"one image\? pass frames\[None\]"):
            as_frames(arr)
        with pytest.raises(QueryError):
            video_size_of(arr)
    got = as_frames(image[None])
    assert got.shape == (1, 4, 6, 3) and np.array_equal(got[0], image)
    assert video_size_of(image[None]) == (1, (4, 6))


@pytest.mark.parametrize(
    ("frames", "path", "match"),
    [
        ([], "v.mp4", "empty"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], "v.mp4", "same size"),
        (np.full((2, 4, 4, 3), 2.0), "v.gif", r"\[0, 1\]"),
        (np.full((2, 4, 4, 3), np.nan), "v.gif", "NaN"),
        (np.zeros((2, 4, 4, 3), np.int64), "v.gif", "uint8"),
        (np.zeros((2, 4, 4, 3), np.uint8), "v.avi", "unknown suffix"),
        (np.zeros((4, 4), np.uint8), "v.mp4", "frames have shape"),
    ],
)
def test_bad_frames_and_paths_are_clear_errors(tmp_path: Path, frames: Any, path: str, match: str) -> None:
    with pytest.raises(VideoError, match=match):
        write_video(frames, tmp_path / path)


def test_video_error_is_a_daami2i_error_and_bad_fps(tmp_path: Path) -> None:
    with pytest.raises(Daami2iError, match="fps"):
        write_video(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / "v.gif", fps=0)


@pytest.mark.parametrize("quality", ["x", None, True, float("nan"), 11])
def test_bad_quality_is_a_video_error(tmp_path: Path, quality: Any) -> None:
    for name in ("v.mp4", "v.gif", "pngs"):
        with pytest.raises(VideoError, match="quality must be a number in"):
            write_video(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / name, quality=quality)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_numpy_numbers_are_accepted_for_fps_and_quality(tmp_path: Path) -> None:
    frames = solid_frames(16, 16)
    gif = write_video(frames, tmp_path / "v.gif", fps=np.float32(10))
    assert iio.immeta(gif, plugin="pillow", index=None)["duration"] == 100  # 1000 / 10 ms (GIF keeps 1/100 s)
    mp4 = write_video(frames, tmp_path / "v.mp4", fps=np.int64(8), quality=np.float64(8))
    assert iio.immeta(mp4, plugin="FFMPEG")["fps"] == 8.0
    same = write_video(frames, tmp_path / "w.mp4", fps=8, quality=8.0)
    assert np.array_equal(iio.imread(mp4, plugin="FFMPEG", index=None), iio.imread(same, plugin="FFMPEG", index=None))
    for bad in (True, np.bool_(True), "8", None):
        with pytest.raises(VideoError, match="fps"):
            write_video(frames, tmp_path / "x.gif", fps=bad)


def _pngs(folder: Path) -> tuple[list[str], np.ndarray]:
    files = sorted(folder.glob("frame_*.png"))
    return [p.name for p in files], np.stack([np.asarray(Image.open(p)) for p in files])


def test_png_folder_overwrite_removes_the_frames_of_a_longer_video(tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    write_video(solid_frames(4, 4), folder)  # 8 frames
    (folder / "notes.txt").write_text("kept")
    short = solid_frames(4, 4, COLOURS[5:7])
    write_video(short, folder)
    names, got = _pngs(folder)
    assert names == ["frame_00000.png", "frame_00001.png"] and np.array_equal(got, short)
    assert (folder / "notes.txt").read_text() == "kept"  # only frame_*.png files are replaced
    with pytest.raises(VideoError, match="overwrite=True"):
        write_video(short, folder, overwrite=False)


def test_png_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_video(solid_frames(4, 4), outside)
    os.symlink(outside, tmp_path / "link")
    with pytest.raises(VideoError, match="symbolic link"):
        write_video(solid_frames(4, 4, COLOURS[:2]), tmp_path / "link")
    assert np.array_equal(_pngs(outside)[1], solid_frames(4, 4))  # untouched


def test_a_frame_that_is_a_link_is_removed_not_followed(tmp_path: Path) -> None:
    folder, victim = tmp_path / "pngs", tmp_path / "victim.png"
    Image.new("RGB", (2, 2), (1, 2, 3)).save(victim)
    folder.mkdir()
    os.symlink(victim, folder / "frame_00000.png")
    write_video(solid_frames(4, 4, COLOURS[:1]), folder)
    assert not (folder / "frame_00000.png").is_symlink()
    assert np.asarray(Image.open(victim))[0, 0].tolist() == [1, 2, 3]
    assert np.array_equal(_pngs(folder)[1], solid_frames(4, 4, COLOURS[:1]))


def test_experiment_frames_are_replaced_and_never_written_outside(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    save_experiment_frames(solid_frames(4, 4), exp)
    save_experiment_frames(solid_frames(4, 4, COLOURS[2:5]), exp)
    names, got = _pngs(exp / "video_frames")
    assert len(names) == 3 and np.array_equal(got, solid_frames(4, 4, COLOURS[2:5]))
    outside = tmp_path / "outside"
    write_video(solid_frames(4, 4), outside)
    shutil.rmtree(exp / "video_frames")
    os.symlink(outside, exp / "video_frames")
    with pytest.raises(VideoError, match="symbolic link"):
        save_experiment_frames(solid_frames(4, 4, COLOURS[:1]), exp)
    names, got = _pngs(outside)
    assert len(names) == 8 and np.array_equal(got, solid_frames(4, 4))  # the outside frames are all still there


def test_missing_extra_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_imageio(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("imageio"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imageio)
    with pytest.raises(VideoError, match=r"pip install 'daami2i\[video\]'"):
        write_video(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / "v.mp4")
    write_video(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / "pngs")  # a folder needs only Pillow


# -- overlays --------------------------------------------------------------------------------------------
def test_overlay_equals_an_independent_blend() -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    maps = rng.random((3, 5, 6))
    alpha = 0.3
    got = overlay_frames(frames, maps, alpha=alpha, cmap="gray")
    # matplotlib's 256-entry grey table: entry floor(v * 256) (the last for v = 1) is that entry / 255
    level = np.minimum(np.floor(maps * 256), 255)
    want = np.round((1 - alpha) * frames + alpha * level[..., None])
    assert np.array_equal(got, want)


def test_overlay_jet_ends_match_plot_overlay_colours() -> None:
    frames = np.zeros((2, 1, 2, 3), np.uint8)
    maps = np.array([[[0.0, 1.0]], [[1.0, 0.0]]])
    got = overlay_frames(frames, maps, alpha=1.0)
    assert got[0, 0, 0].tolist() == [0, 0, 128] and got[0, 0, 1].tolist() == [128, 0, 0]  # jet: dark blue, dark red
    assert got[1, 0, 0].tolist() == [128, 0, 0]


def test_overlay_normalize_uses_one_scale_for_the_video() -> None:
    frames = np.zeros((2, 1, 1, 3), np.uint8)
    got = overlay_frames(frames, np.array([[[0.2]], [[0.4]]]), alpha=1.0, cmap="gray", normalize=True)
    assert got[:, 0, 0, 0].tolist() == [0, 255]


def test_overlay_bad_input() -> None:
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(VideoError, match="2 map"):
        overlay_frames(frames, np.zeros((2, 4, 4)))
    with pytest.raises(VideoError, match="expand"):
        overlay_frames(frames, np.zeros((3, 2, 2)))
    with pytest.raises(VideoError, match="colour map"):
        overlay_frames(frames, np.zeros((3, 4, 4)), cmap="nope")
    with pytest.raises(VideoError, match="alpha"):
        overlay_frames(frames, np.zeros((3, 4, 4)), alpha=2)


# -- tracks ----------------------------------------------------------------------------------------------
def crossing_squares(t_len: int = 8) -> tuple[np.ndarray, dict[str, list[tuple[int, int]]]]:
    """A moves right along rows 2..6, B moves left along rows 8..12 (their x ranges cross at t ~ 3-4),
    C (rows 16..19) is there for frames 0..2 only. Returns masks (T, 24, 32) and each square's
    (row, col) top-left corners."""
    masks = np.zeros((t_len, 24, 32), bool)
    corners: dict[str, list[tuple[int, int]]] = {"A": [], "B": [], "C": []}
    for t in range(t_len):
        a, b = (2, 2 + 3 * t), (8, 24 - 3 * t)
        for name, (r, c) in (("A", a), ("B", b)):
            masks[t, r : r + 5, c : c + 5] = True
            corners[name].append((r, c))
        if t < 3:
            masks[t, 16:20, 10:14] = True
            corners["C"].append((16, 10))
    return masks, corners


@pytest.mark.parametrize("optimal", [None, False])
def test_tracks_follow_crossing_squares_and_a_disappearing_one(optimal: bool | None) -> None:
    masks, corners = crossing_squares()
    labels = track_instances(masks, iou=0.1, optimal=optimal)
    assert labels.dtype == np.int32 and labels.shape == masks.shape
    ids = {name: {int(labels[t, r + 1, c + 1]) for t, (r, c) in enumerate(pos)} for name, pos in corners.items()}
    assert ids == {"A": {1}, "B": {2}, "C": {3}}  # raster order in frame 0: A, B, C
    assert set(np.unique(labels[3:]).tolist()) == {0, 1, 2}  # C gone: no label after frame 2
    assert np.array_equal(labels > 0, masks)


def test_tracks_a_gap_starts_a_new_track_unless_max_gap() -> None:
    masks = np.zeros((4, 8, 8), bool)
    masks[[0, 1, 3], 2:5, 2:5] = True  # absent in frame 2
    assert np.unique(track_instances(masks)[3]).tolist() == [0, 2]
    assert np.unique(track_instances(masks, max_gap=1)[3]).tolist() == [0, 1]


def test_assignment_optimal_and_greedy() -> None:
    from daami2i.video import _assign

    # components X, Y (rows) against tracks P, Q (columns): greedy takes X-P (0.5) and leaves Y alone;
    # the optimal assignment takes X-Q + Y-P (0.85)
    iou = np.array([[0.5, 0.4], [0.45, 0.0]])
    assert sorted(_assign(iou, 0.1, optimal=True)) == [(0, 1), (1, 0)]
    assert _assign(iou, 0.1, optimal=False) == [(0, 0)]
    # at 0.48 only X-P may link: the assignment is over the links that reach the threshold, so X-P is
    # kept (not lost to the X-Q + Y-P pairing that only the links below the threshold would make)
    assert _assign(iou, 0.48, optimal=True) == [(0, 0)]
    assert _assign(iou, 0.48, optimal=False) == [(0, 0)]
    assert _assign(iou, 0.6, optimal=True) == [] and _assign(iou, 0.6, optimal=False) == []
    # a 3 x 3 case: of the links >= 0.3, the best total is X-P + Y-R + Z-Q (0.9 + 0.3 + 0.8)
    iou = np.array([[0.9, 0.29, 0.0], [0.29, 0.0, 0.3], [0.0, 0.8, 0.29]])
    assert sorted(_assign(iou, 0.3, optimal=True)) == [(0, 0), (1, 2), (2, 1)]


def test_tracks_bad_input() -> None:
    with pytest.raises(VideoError, match="binary"):
        track_instances(np.full((2, 3, 3), 2))
    with pytest.raises(VideoError, match="frames, height, width"):
        track_instances(np.zeros((3, 3), bool))
    with pytest.raises(VideoError, match="min_area"):
        track_instances(np.zeros((1, 3, 3), bool), min_area=0)


# -- the dataset export ----------------------------------------------------------------------------------
def make_export(root: Path, image_format: str = "png") -> Any:
    masks, _ = crossing_squares(5)
    tracks = track_instances(masks)
    frames = solid_frames(24, 32, COLOURS[:5])
    square = np.zeros((3, 16, 16), bool)
    square[:, 4:9, 4:10] = True
    square[1] = False  # absent in frame 1
    videos = [
        {"frames": frames, "tracks": tracks, "categories": {1: "fox", 2: "dog", 3: "cat"}, "name": "crossing"},
        {"frames": np.zeros((3, 16, 16, 3)), "objects": [{"category": "fox", "masks": square}], "caption": "a fox"},
    ]
    return export_video_dataset(videos, root, image_format=image_format), masks, tracks, square


def quiet(fn: Any, *args: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_export_loads_with_pycocotools_and_self_evaluates_to_ap_1(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds, masks, tracks, square = make_export(tmp_path / "vis")
    gt = quiet(COCO, str(tmp_path / "vis" / "instances.json"))
    assert len(gt.getImgIds()) == 5 + 3 and len(gt.getCatIds()) == 3
    assert len(gt.getAnnIds()) == 5 * 2 + 3 + 2  # A, B in 5 frames, C in 3, the square in 2
    img = gt.loadImgs(gt.getImgIds())[0]
    assert (img["video_id"], img["frame_id"], img["file_name"]) == (1, 0, "frames/crossing/00000.png")
    for ann in gt.loadAnns(gt.getAnnIds(imgIds=[img["id"]])):
        want = tracks[0] == {1: 1, 2: 2, 3: 3}[ann["track_id"]]
        assert np.array_equal(gt.annToMask(ann).astype(bool), want)
    results = [{**a, "score": 1.0} for a in gt.dataset["annotations"]]
    for r in results:
        r.pop("id")
    dt = quiet(gt.loadRes, results)
    for kind in ("segm", "bbox"):
        ev = COCOeval(gt, dt, kind)
        quiet(ev.evaluate)
        quiet(ev.accumulate)
        quiet(ev.summarize)
        assert ev.stats[0] == pytest.approx(1.0), kind


def test_export_youtube_vis_structure_and_round_trip(tmp_path: Path) -> None:
    ds, masks, tracks, square = make_export(tmp_path / "vis")
    y = json.loads((tmp_path / "vis" / "ytvis.json").read_text())
    assert set(y) >= {"videos", "annotations", "categories"}
    v = y["videos"][0]
    assert set(v) >= {"id", "width", "height", "length", "file_names"} and v["length"] == len(v["file_names"]) == 5
    a = y["annotations"][3]  # the second video's square
    assert set(a) >= {"id", "video_id", "category_id", "segmentations", "areas", "bboxes", "iscrowd"}
    assert a["segmentations"][1] is None and a["areas"][1] is None and a["bboxes"][1] is None
    assert a["areas"][0] == 30 and a["bboxes"][0] == [4.0, 4.0, 6.0, 5.0]
    loaded = load_video_dataset(tmp_path / "vis")
    for label in (1, 2, 3):
        assert np.array_equal(loaded.track_masks(label), tracks == label)
    assert np.array_equal(loaded.track_masks(4), square)
    assert np.array_equal(loaded.frames(1), solid_frames(24, 32, COLOURS[:5]))  # PNG: exact
    assert loaded.ytvis["videos"][1]["caption"] == "a fox"
    assert [c["name"] for c in loaded.ytvis["categories"]] == ["cat", "dog", "fox"]


def test_export_jpeg_frames_and_refuses_a_full_folder(tmp_path: Path) -> None:
    ds, *_ = make_export(tmp_path / "vis", image_format="jpg")
    assert (tmp_path / "vis" / "frames" / "crossing" / "00004.jpg").is_file()
    load_video_dataset(tmp_path / "vis")
    with pytest.raises(VideoDatasetError, match="not empty"):
        make_export(tmp_path / "vis")


def test_export_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "x"
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(VideoDatasetError, match="shape"):
        export_video_dataset([{"frames": frames, "objects": [{"category": "a", "masks": np.zeros((3, 4, 4))}]}], out)
    with pytest.raises(VideoDatasetError, match="name"):
        export_video_dataset([{"frames": frames, "objects": [], "name": "../up"}], out)
    with pytest.raises(VideoDatasetError, match="no category"):
        export_video_dataset([{"frames": frames, "tracks": np.ones((2, 4, 4), int), "categories": {2: "a"}}], out)
    with pytest.raises(VideoDatasetError, match="empty"):
        export_video_dataset([{"frames": [], "objects": []}], out)
    assert not out.exists()


def test_rle_counts_match_pycocotools() -> None:
    from pycocotools import mask as cm

    rng = np.random.default_rng(3)
    for _ in range(20):
        m = rng.random((37, 29)) > rng.random()
        rle = cm.encode(np.asfortranarray(m.astype(np.uint8)))
        runs = rle_counts(rle["counts"].decode())
        assert sum(runs) == m.size and sum(runs[1::2]) == m.sum()
    with pytest.raises(VideoDatasetError):
        rle_counts("\x7f")


def _corrupt(root: Path, name: str, edit: Any) -> None:
    path = root / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("ytvis.json", lambda d: d["videos"][0]["file_names"].__setitem__(0, "../../etc/passwd"), "leaves the dataset"),
        ("ytvis.json", lambda d: d["videos"][0]["file_names"].__setitem__(0, "/etc/passwd"), "leaves the dataset"),
        ("ytvis.json", lambda d: d["videos"][0].__setitem__("width", 40), "differ"),
        ("instances.json", lambda d: d["images"].pop(2), "no image for frame"),
        ("instances.json", lambda d: d["annotations"][0]["segmentation"].__setitem__("size", [5, 5]), "frame is"),
        ("instances.json", lambda d: d["annotations"][0].__setitem__("track_id", 99), "track_id"),
        ("instances.json", lambda d: d["annotations"][0].__setitem__("bbox", [0, 0, 99, 1]), "reaches past"),
        ("ytvis.json", lambda d: d["annotations"][0]["segmentations"][0].__setitem__("counts", "0"), "cover"),
        ("ytvis.json", lambda d: d["annotations"][0]["areas"].__setitem__(0, 7), "area"),
        ("ytvis.json", lambda d: d["annotations"][0].__setitem__("segmentations", []), "segmentations"),
        ("instances.json", lambda d: d["images"][1].__setitem__("frame_id", 0), "twice"),
    ],
)
def test_corrupt_exports_are_clear_errors(tmp_path: Path, name: str, edit: Any, match: str) -> None:
    make_export(tmp_path / "vis")
    _corrupt(tmp_path / "vis", name, edit)
    with pytest.raises(VideoDatasetError, match=match):
        load_video_dataset(tmp_path / "vis")


def test_corrupt_frame_files(tmp_path: Path) -> None:
    root = tmp_path / "vis"
    make_export(root)
    first = root / "frames" / "crossing" / "00000.png"
    Image.new("RGB", (5, 5)).save(first)  # a wrong size
    with pytest.raises(VideoDatasetError, match="is 5x5"):
        load_video_dataset(root)
    first.unlink()  # a missing frame file
    with pytest.raises(VideoDatasetError, match="missing"):
        load_video_dataset(root)
    load_video_dataset(root, check_images=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(root / "frames" / "crossing")
    os.symlink(outside, root / "frames" / "crossing")  # a link out of the folder
    with pytest.raises(VideoDatasetError, match="outside"):
        load_video_dataset(root)
    (root / "ytvis.json").write_text("[1]")
    with pytest.raises(VideoDatasetError, match="not an object"):
        load_video_dataset(root)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk stating ``width`` x ``height`` (RGB, 8 bits), then IEND: a header
    as a hostile file would carry, without the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("side", "match"), [(16000, "is 16000x16000 but the annotations say 24x32"), (60000, "too large")]
)
def test_a_frame_with_a_huge_header_is_a_clear_error(tmp_path: Path, side: int, match: str) -> None:
    root = tmp_path / "vis"
    make_export(root)
    (root / "frames" / "crossing" / "00002.png").write_bytes(_png_header(side, side))
    with pytest.raises(
        VideoDatasetError, match=r"ytvis\.json, video 1, frame 2: 'frames/crossing/00002\.png'.*" + match
    ):
        load_video_dataset(root)
    ds = load_video_dataset(root, check_images=False)
    with pytest.raises(VideoDatasetError, match=r"video 1, frame 2: 'frames/crossing/00002\.png'"):
        ds.frames(1)
    assert np.array_equal(ds.frames(2), np.zeros((3, 16, 16, 3), np.uint8))  # the other video reads


def test_a_frame_of_the_largest_legal_size_reads(tmp_path: Path) -> None:
    """Pillow's default limit (89 M pixels) would refuse a 10000 x 10000 frame; the annotations allow
    up to MAX_SIDE a side, so the loader reads the header under that limit: the stated size decides."""
    from PIL import Image as PILImage

    from daami2i.video_dataset import _safe_file

    root = tmp_path / "big"
    root.mkdir()
    (root / "f.png").write_bytes(_png_header(10_000, 10_000))
    limit = PILImage.MAX_IMAGE_PIXELS
    _safe_file(root, "f.png", "frame 0", True, (10_000, 10_000))
    assert PILImage.MAX_IMAGE_PIXELS == limit  # restored


def test_frames_after_check_images_false_are_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "vis"
    make_export(root)
    (root / "frames" / "crossing" / "00003.png").unlink()
    ds = load_video_dataset(root, check_images=False)
    with pytest.raises(
        VideoDatasetError, match=r"video 1, frame 3: frame file 'frames/crossing/00003\.png' is missing"
    ):
        ds.frames(1)
    Image.new("RGB", (5, 5)).save(root / "frames" / "crossing" / "00003.png")
    with pytest.raises(VideoDatasetError, match="is 5x5 but the annotations say 24x32"):
        ds.frames(1)
    (root / "frames" / "crossing" / "00003.png").write_bytes(b"not an image")
    with pytest.raises(VideoDatasetError, match="not a readable image"):
        ds.frames(1)


def test_rle_box_equals_pycocotools() -> None:
    from pycocotools import mask as cm

    from daami2i.video_dataset import _rle_box

    rng = np.random.default_rng(5)
    for k in range(40):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        m = rng.random((h, w)) > (0.97 if k % 3 == 0 else rng.random())
        rle = cm.encode(np.asfortranarray(m.astype(np.uint8)))
        got = _rle_box(rle_counts(rle["counts"].decode()), h)
        if not m.any():
            assert got is None
            continue
        assert got == [float(v) for v in cm.toBbox(rle)], (m, got)


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        # a box inside the frame, but not its mask's (frame 0's square A is at x 2..6, y 2..6)
        ("ytvis.json", lambda d: d["annotations"][0]["bboxes"].__setitem__(0, [2.0, 2.0, 5.0, 4.0]), "mask's box"),
        ("instances.json", lambda d: d["annotations"][0].__setitem__("bbox", [1.0, 2.0, 5.0, 5.0]), "mask's box"),
        ("instances.json", lambda d: d["categories"][0].__setitem__("name", 7), "name must be a non-empty string"),
        ("ytvis.json", lambda d: d["categories"][0].__setitem__("name", 7), "different categories"),
        ("instances.json", lambda d: d["annotations"][0].__setitem__("iscrowd", 2), "iscrowd must be 0 or 1"),
        ("instances.json", lambda d: d["annotations"][0].__setitem__("iscrowd", True), "iscrowd must be 0 or 1"),
        ("ytvis.json", lambda d: d["annotations"][0].__setitem__("iscrowd", "no"), "iscrowd must be 0 or 1"),
        (
            "ytvis.json",
            lambda d: d["videos"][0]["file_names"].__setitem__(1, d["videos"][0]["file_names"][0]),
            r"frame 1: its file 'frames/crossing/00000\.png' is also video 1, frame 0's",
        ),
        (
            "ytvis.json",
            lambda d: d["annotations"][0]["segmentations"][0].__setitem__("counts", "\x7f"),
            r"ytvis\.json, annotation 1, frame 0: the mask's RLE counts string holds",
        ),
        (
            "instances.json",
            lambda d: d["annotations"][0]["segmentation"].__setitem__("counts", "P"),  # a continued number
            r"instances\.json, annotation 1: the mask's RLE counts string is cut short",
        ),
    ],
)
def test_inconsistent_exports_are_refused(tmp_path: Path, name: str, edit: Any, match: str) -> None:
    make_export(tmp_path / "vis")
    load_video_dataset(tmp_path / "vis")  # valid as written
    _corrupt(tmp_path / "vis", name, edit)
    with pytest.raises(VideoDatasetError, match=match):
        load_video_dataset(tmp_path / "vis", check_images=False)

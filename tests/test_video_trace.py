"""From a trace to video outputs: heat-map videos over the generated frames, masks and tracks per word,
a video dataset export, `daami2i generate` / `show` on a video pipeline, and the explorer's frame
slider. Every output is checked against an independent computation from the public map API
(``expand_as``) and the array-level functions of :mod:`daami2i.video`."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from daami2i.video import (
    VideoError,
    experiment_frames,
    heat_map_overlays,
    overlay_frames,
    save_experiment_frames,
    save_heat_map_video,
    strip,
    track_instances,
    video_frames_of,
    write_video,
)
from daami2i.video_dataset import VideoDatasetError, export_video_dataset, load_video_dataset, objects_from_heat_maps

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

PROMPT = "a red fox runs on snow"
KW = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def wan() -> Any:
    from daami2i.testing import tiny_wan_pipeline

    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def traced(wan: Any) -> tuple[Any, Any, np.ndarray]:
    """A traced Wan generation: the trace, its heat map and the video frames (9, 32, 48, 3) uint8."""
    with daami2i.trace(wan) as trc:
        out = wan(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **KW)
    frames = video_frames_of(out)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8
    return trc, trc.compute_global_heat_map(), frames


def test_png_folder_and_mp4_of_a_word_map_equal_the_overlays(traced: Any, tmp_path: Path) -> None:
    _, ghm, frames = traced
    fox = ghm.compute_word_heat_map("fox")
    want = overlay_frames(frames, fox.expand_as(frames).numpy())  # (9, 32, 48, 3)
    assert np.array_equal(heat_map_overlays(fox, frames), want)
    folder = save_heat_map_video(fox, frames, tmp_path / "fox")
    got = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])
    assert np.array_equal(got, want)  # PNG: exact
    mp4 = save_heat_map_video(fox, frames, tmp_path / "fox.mp4", fps=4)
    video = iio.imread(mp4, plugin="FFMPEG", index=None)
    assert video.shape == (9, 32, 48, 3)
    # H.264 is lossy but deterministic: the MP4 is exactly the encoding of the overlays (written apart)
    assert np.array_equal(
        video, iio.imread(write_video(want, tmp_path / "want.mp4", fps=4), plugin="FFMPEG", index=None)
    )
    assert iio.immeta(mp4, plugin="FFMPEG")["fps"] == 4.0


def test_gif_of_a_thresholded_map_is_exact(traced: Any, tmp_path: Path) -> None:
    """A mask over solid frames has 2 colours per frame: the GIF decodes to exactly the overlays."""
    _, ghm, _ = traced
    solid = np.zeros((9, 32, 48, 3), np.uint8)
    solid[..., 0] = np.arange(9)[:, None, None] * 20  # every frame its own colour (none is merged)
    box = ghm.compute_bbox_heat_map(0, 0, 1, 1, frame=3)
    mask = box.expand_as(solid, threshold=0.5).numpy()
    want = overlay_frames(solid, mask)
    gif = save_heat_map_video(box, solid, tmp_path / "box.gif", threshold=0.5)
    got = iio.imread(gif, plugin="pillow", index=None, mode="RGB")
    assert np.array_equal(got, want)


def test_map_and_frames_must_agree(traced: Any, tmp_path: Path) -> None:
    _, ghm, frames = traced
    fox = ghm.compute_word_heat_map("fox")
    with pytest.raises(VideoError, match="9 frames, but 4"):
        save_heat_map_video(fox, frames[:4], tmp_path / "x.gif")
    with pytest.raises(VideoError, match="expected a heat map"):
        heat_map_overlays("fox", frames)
    with pytest.raises(daami2i.QueryError):
        save_heat_map_video(fox, frames, tmp_path / "x.gif", threshold=1.5)


def test_objects_are_the_thresholded_expansion_split_into_tracks(traced: Any) -> None:
    _, ghm, frames = traced
    objects = objects_from_heat_maps(ghm, frames, ["fox", "snow"], threshold=0.4)
    for word in ("fox", "snow"):
        mine = [o["masks"] for o in objects if o["category"] == word]
        mask = ghm.compute_word_heat_map(word).expand_as(frames, threshold=0.4).numpy() > 0.5  # (9, 32, 48)
        assert mine and np.array_equal(np.logical_or.reduce(mine), mask)
        labels = track_instances(mask)
        assert len(mine) == labels.max()
        for k, m in enumerate(mine):
            assert np.array_equal(m, labels == k + 1)
    merged = objects_from_heat_maps(ghm, frames, ["fox"], 0.4, merged=True)
    mask = ghm.compute_guided_heat_map(ghm.compute_word_heat_map("fox")).expand_as(frames, threshold=0.4).numpy()
    assert np.array_equal(np.logical_or.reduce([o["masks"] for o in merged]), mask > 0.5)
    with pytest.raises(VideoDatasetError, match=r"threshold must be a number in \[0, 1\)"):
        objects_from_heat_maps(ghm, frames, ["fox"], threshold=1)
    # the threshold is read as expand_as reads it (check_fraction): NumPy numbers and 0 are cuts too
    same = objects_from_heat_maps(ghm, frames, ["fox"], threshold=np.float32(0.5))
    mask = ghm.compute_word_heat_map("fox").expand_as(frames, threshold=float(np.float32(0.5))).numpy() > 0.5
    assert np.array_equal(np.logical_or.reduce([o["masks"] for o in same]), mask)
    everything = objects_from_heat_maps(ghm, frames, ["fox"], threshold=0)
    mask = ghm.compute_word_heat_map("fox").expand_as(frames, threshold=0.0).numpy() > 0.5
    assert np.array_equal(np.logical_or.reduce([o["masks"] for o in everything]), mask)
    with pytest.raises(VideoDatasetError, match="words"):
        objects_from_heat_maps(ghm, frames, "fox")
    with pytest.raises(daami2i.QueryError):
        objects_from_heat_maps(ghm, frames, ["zebra"])


def test_export_from_a_trace_self_evaluates_to_ap_1(traced: Any, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from daami2i.video_dataset import video_from_trace

    _, ghm, frames = traced
    entry = video_from_trace(ghm, frames, ["fox", "snow"], 0.4, name="fox", caption=PROMPT)
    export_video_dataset([entry], tmp_path / "vis", image_format="png")
    ds = load_video_dataset(tmp_path / "vis")
    assert ds.ytvis["videos"][0]["length"] == 9 and ds.ytvis["videos"][0]["caption"] == PROMPT
    assert np.array_equal(ds.frames(1), frames)
    for track, obj in zip(ds.ytvis["annotations"], [o for o in entry["objects"] if o["masks"].any()], strict=True):
        assert np.array_equal(ds.track_masks(track["id"]), obj["masks"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "vis" / "instances.json"))
        results = [{k: v for k, v in a.items() if k != "id"} | {"score": 1.0} for a in gt.dataset["annotations"]]
        dt = gt.loadRes(results)
        for kind in ("segm", "bbox"):
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0), kind


def test_experiment_frames_round_trip_and_damage(traced: Any, tmp_path: Path) -> None:
    trc, _, frames = traced
    trc.to_experiment(tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")
    assert experiment_frames(exp) is None
    save_experiment_frames(frames, tmp_path / "exp")
    exp = daami2i.load_experiment(tmp_path / "exp")  # extra files do not disturb the experiment
    assert np.array_equal(experiment_frames(exp), frames)
    (tmp_path / "exp" / "video_frames" / "frame_00008.png").unlink()
    with pytest.raises(VideoError, match="8 frame"):
        experiment_frames(exp)
    (tmp_path / "exp" / "video_frames" / "frame_00008.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match="PNG"):
        experiment_frames(exp)


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(wan: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from typer.testing import CliRunner

    from daami2i.cli import app

    root = tmp_path_factory.mktemp("cli")
    wan.save_pretrained(root / "model")
    args = ["generate", PROMPT, "-m", str(root / "model"), "--steps", "2", "--height", "32", "--width", "48"]
    res = CliRunner().invoke(app, [*args, "--num-frames", "9", "--fps", "4", "-o", str(root / "out")])
    assert res.exit_code == 0, res.output
    assert "9 frames at 4 fps" in res.output
    return root, app


def decode(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG", index=None)


def gif_quantised(frames: np.ndarray) -> np.ndarray:
    """What a GIF of ``frames`` decodes to: each frame reduced to Pillow's adaptive palette of at most
    256 colours (what Pillow's GIF writer does to an RGB frame), computed here without the writer."""
    return np.stack(
        [np.asarray(Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB")) for f in frames]
    )


def test_cli_generate_writes_the_video_word_videos_and_experiment(generated: Any, tmp_path: Path) -> None:
    root = tmp_path
    out = generated[0] / "out"
    video = decode(out / "video.mp4")
    assert video.shape == (9, 32, 48, 3) and iio.immeta(out / "video.mp4", plugin="FFMPEG")["fps"] == 4.0
    exp = daami2i.load_experiment(out / "experiment")
    frames = experiment_frames(exp)
    assert frames is not None and frames.shape == (9, 32, 48, 3)
    # H.264 is lossy (noise-like frames of a random model lose ~9 levels), but deterministic: the MP4
    # decodes to what the saved frames encode to
    assert np.array_equal(video, decode(write_video(frames, root / "again.mp4", fps=4)))
    ghm = exp.compute_global_heat_map()
    assert ghm.words == ["a", "red", "fox", "runs", "on", "snow"]
    rows = []
    for word in ghm.words:
        want = overlay_frames(frames, ghm.compute_word_heat_map(word).expand_as(frames).numpy())
        got = decode(out / "words" / f"{word}.mp4")
        assert got.shape == want.shape
        assert np.array_equal(got, decode(write_video(want, root / f"again-{word}.mp4", fps=4))), word
        rows.append(strip(want))
    picture = np.asarray(Image.open(out / "words.png"))  # a labelled grid: words on the left, frames on top
    want = np.concatenate(rows)
    assert picture.shape[0] > want.shape[0] and picture.shape[1] > want.shape[1]
    assert np.array_equal(picture[-want.shape[0] :, -want.shape[1] :], want)


def test_cli_show_on_a_video_experiment(generated: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    root, app = generated
    exp_dir = root / "out" / "experiment"
    exp = daami2i.load_experiment(exp_dir)
    ghm, frames = exp.compute_global_heat_map(), experiment_frames(exp)
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--word", "fox", "-o", str(tmp_path / "fox.png")])
    assert res.exit_code == 0, res.output
    want = overlay_frames(frames, ghm.compute_word_heat_map("fox").expand_as(frames).numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fox.png")), strip(want))  # 9 frames side by side
    args = ["show", str(exp_dir), "--box", "0,0,1,1", "--frame", "3", "-o", str(tmp_path / "b.gif")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = iio.imread(tmp_path / "b.gif", plugin="pillow", index=None, mode="RGB")
    assert got.shape == (9, 32, 48, 3)
    # the region query is the API's box in video frame 3 (both corners included: columns 0-1, rows 0-1)
    box = ghm.compute_bbox_heat_map(0, 0, 2, 2, half_open=True, frame=3)
    want = overlay_frames(frames, box.expand_as(frames).numpy())
    # GIF keeps up to 256 colours a frame: each frame is Pillow's own adaptive palette of the overlay
    assert np.array_equal(got, gif_quantised(want))
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--pixel", "1,1", "--frame", "8", "--threshold", "0.5"])
    assert res.exit_code == 0, res.output
    assert (exp_dir / "show-pixel-1x1-frame8-mask0.5.png").is_file()
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--word", "fox", "--frame", "1"])
    assert res.exit_code == 2 and "--frame places" in res.output
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--box", "0,0,1,1", "--frame", "9"])
    assert res.exit_code == 2 and "outside this video's 9 frames" in res.output


def test_cli_show_on_a_video_checks_the_output_suffix(generated: Any, tmp_path: Path) -> None:
    """The strip is written by Pillow: a suffix it cannot write (svg, which matplotlib writes) is a
    usage error naming what works; one it writes (bmp, which matplotlib does not) is written exactly."""
    from typer.testing import CliRunner

    root, app = generated
    exp_dir = root / "out" / "experiment"
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--word", "fox", "-o", str(tmp_path / "x.svg")])
    assert res.exit_code == 2, res.output
    assert "'.svg' is neither a video (.gif, .mp4" in res.output and ".png" in res.output and ".bmp" in res.output
    assert not (tmp_path / "x.svg").exists()
    res = CliRunner().invoke(app, ["show", str(exp_dir), "--word", "fox", "-o", str(tmp_path / "x.bmp")])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(exp_dir)
    frames = experiment_frames(exp)
    want = overlay_frames(frames, exp.compute_global_heat_map().compute_word_heat_map("fox").expand_as(frames).numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.bmp")), strip(want))


def test_cli_generate_video_options_are_checked_first(generated: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    root, app = generated
    base = ["generate", PROMPT, "-m", str(root / "model"), "--steps", "1", "-o", str(tmp_path / "o")]
    for extra, match in ((["--fps", "0"], "--fps"), (["--video-format", "avi"], "--video-format")):
        res = CliRunner().invoke(app, [*base, *extra])
        assert res.exit_code == 2 and match in res.output, res.output
    res = CliRunner().invoke(app, [*base, "--height", "32"])
    assert res.exit_code == 2 and "both --height and --width" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_generate_pipeline_kind_options_are_checked_before_loading(
    generated: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--num-frames on an image pipeline and --height without --width on a video pipeline are refused
    from the class a local folder's model_index.json names (or the built-in model's), never loaded."""
    import json

    from typer.testing import CliRunner

    import daami2i.cli as cli

    root, app = generated
    loaded: list[str] = []

    def no_loading(model: str, device: Any) -> Any:
        loaded.append(model)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load_pipeline", no_loading)
    image_model = tmp_path / "sd"
    image_model.mkdir()
    (image_model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out = ["-o", str(tmp_path / "o")]
    cases = [
        (["-m", str(root / "model"), "--height", "32"], "a video pipeline needs both --height and --width"),
        (["-m", str(root / "model"), "--width", "48"], "a video pipeline needs both --height and --width"),
        (["-m", str(image_model), "--num-frames", "9"], "(StableDiffusionPipeline) is an image pipeline"),
        (["-m", "tiny", "--num-frames", "9"], "--num-frames is for video pipelines; tiny (StableDiffusionPipeline)"),
    ]
    for args, match in cases:
        res = CliRunner().invoke(app, ["generate", PROMPT, "--steps", "1", *args, *out])
        assert res.exit_code == 2 and match in res.output, (args, res.output)
    assert loaded == [] and not (tmp_path / "o").exists()
    # a class that cannot be told without loading (a hub id, an unknown name) is checked once loaded
    (image_model / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    res = CliRunner().invoke(app, ["generate", PROMPT, "-m", str(image_model), "--num-frames", "9", *out])
    assert loaded == [str(image_model)] and res.exit_code == 1


def test_cli_info_on_a_video_experiment(generated: Any) -> None:
    """`daami2i info` says it is a video: its frames, their size, the token frames and how they map."""
    from typer.testing import CliRunner

    from daami2i.cli import app

    res = CliRunner().invoke(app, ["info", str(generated[0] / "out" / "experiment")])
    assert res.exit_code == 0, res.output
    assert "video       9 frames of 32x48, 3 token frames of 2x3 (causal VAE" in res.output
    assert "3 token frames stacked" in res.output

"""The explorer on a video (Wan): a video experiment opens with its frames, the frame slider shows each
frame, and clicks, boxes and polygons query the shown frame (``frame=``); every map equals the public
API's map expanded over the video at that frame. Image sessions are unchanged (tests/test_explorer.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import daami2i
from daami2i import explore as E
from daami2i.video import save_experiment_frames, video_frames_of

KW = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16)
PROMPT = "a red fox runs on snow"


@pytest.fixture(scope="module")
def wan() -> Any:
    from daami2i.testing import tiny_wan_pipeline

    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def video_experiment(wan: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    with daami2i.trace(wan, self_factors="all") as trc:
        out = wan(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **KW)
    frames = video_frames_of(out)
    path = tmp_path_factory.mktemp("exp") / "experiment"
    trc.to_experiment(path, seed=0, steps=2)
    save_experiment_frames(frames, path)
    return path, frames


def expanded_at(heat: Any, t: int, absolute: bool = False) -> np.ndarray:
    return heat.expand_as((32, 48), absolute=absolute)[t].numpy()


def component(app: Any, elem_id: str) -> Any:
    """The app's component of ``elem_id``."""
    return next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def handler(app: Any, name: str) -> Any:
    """The (guarded) event function ``name`` of the app, as Gradio calls it."""
    return next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", None) == name)


def test_open_a_video_experiment_and_move_the_frame(video_experiment: Any) -> None:
    path, frames = video_experiment
    s = E.open_experiment(path)
    assert s.frames is not None and np.array_equal(s.frames, frames) and s.frame == 0
    assert np.array_equal(np.asarray(s.image), frames[0])
    raw_x, ref_x, inst = E.word(s, "fox", 1, 0.4)
    ghm = daami2i.load_experiment(path).compute_global_heat_map()
    fox = ghm.compute_word_heat_map("fox")
    assert np.allclose(raw_x, expanded_at(fox, 0), atol=1e-6)
    s = E.set_frame(s, 6)
    assert s.frame == 6 and np.array_equal(np.asarray(s.image), frames[6])
    views = E.word_at_frame(s, 0.4)
    assert views is not None
    raw6, ref6, inst6 = views
    assert np.allclose(raw6, expanded_at(fox, 6), atol=1e-6)
    refined = s.word_heats[1]
    mask = sum((i.mask for i in inst6), np.zeros((32, 48), bool)).astype(bool)
    assert np.array_equal(mask, refined.expand_as((32, 48), threshold=0.4)[6].numpy() > 0.5)
    with pytest.raises(daami2i.QueryError, match="frame must be a whole number from 0 to 8"):
        E.set_frame(s, 9)


def test_region_queries_are_in_the_shown_frame(video_experiment: Any) -> None:
    path, _ = video_experiment
    s = E.set_frame(E.open_experiment(path), 5)
    high = s.ghm_high
    assert high is not None and E.grid_of(high) == (2, 3)  # one frame's grid, not the stacked (6, 3)
    s = E.click(s, "point", 40.0, 20.0)  # column 2, row 1 of the 2 x 3 grid
    want = high.compute_pixel_heat_map([5], frame=5)
    assert torch.equal(s.last_heat.value, want.value) and "in frame 5" in s.last_title
    assert np.allclose(s.last_map, expanded_at(want, 5), atol=1e-6)
    s = E.drag_box(s, 0, 0, 20, 10)
    want = high.compute_bbox_heat_map(0, 0, 1, 0, frame=5)
    assert torch.equal(s.last_heat.value, want.value)
    s = E.set_frame(s, 1)  # the box's map stays, at the new frame
    assert np.allclose(E.at_frame(s, s.last_heat), expanded_at(want, 1), atol=1e-6)
    for x, y in ((2, 2), (30, 2), (2, 25)):
        s = E.click(s, "polygon", x, y)
    s = E.close_polygon(s)
    pts = [[2.5, 2.5], [30.5, 2.5], [2.5, 25.5]]
    want = high.compute_segmentation_heat_map([pts], 32, 48, frame=1)
    assert torch.equal(s.last_heat.value, want.value)
    # the fixed scale colours video maps too: the raw map at the shown frame over the fixed 1 (the
    # 90th percentile of single pixels' peaks, E.pixel_top), clipped to [0, 1]
    got = E.coloured(s, s.last_heat, "self-high", True)
    top = E.pixel_top(high)
    assert top > 0 and np.allclose(got, np.clip(expanded_at(want, 1, absolute=True) / top, 0, 1), atol=1e-6)
    assert np.allclose(E.coloured(s, s.last_heat, "self-high", False), expanded_at(want, 1), atol=1e-6)


def test_generate_a_video_and_build_the_app(wan: Any, video_experiment: Any) -> None:
    s = E.generate(wan, E.Session(), PROMPT, 0, 2, 5.0, 32, 48, num_frames=9)
    assert s.frames is not None and s.frames.shape == (9, 32, 48, 3)
    assert (s.experiment_dir / "video_frames" / "frame_00008.png").is_file()
    opened = E.open_experiment(s.experiment_dir)
    assert np.array_equal(opened.frames, s.frames)
    pytest.importorskip("gradio")
    app = E.build_app(wan, video_experiment[0])  # builds with the slider shown for a video
    slider = component(app, "frame")
    assert slider.visible and (slider.minimum, slider.maximum) == (0, 8)


def test_the_frame_slider_handler_shows_the_frame_and_its_maps(video_experiment: Any, wan: Any) -> None:
    """on_frame, as Gradio calls it when the slider is released: the image, the word views and the
    map become the API's maps expanded over the video, at that frame."""
    pytest.importorskip("gradio")
    path, frames = video_experiment
    app = E.build_app(wan, path)
    s = E.open_experiment(path)
    E.word(s, "fox", 1, 0.4)
    s = E.click(s, "point", 40.0, 20.0)  # a pixel map in frame 0 on the map tab
    out = handler(app, "on_frame")(s, 4, 0.4, False)
    views = {getattr(k, "elem_id", None): v for k, v in out.items()}
    state = out[next(k for k in out if type(k).__name__ == "State")]
    assert state.frame == 4 and views["info"] == "frame 4 of 9"
    frame4 = Image.fromarray(frames[4])
    assert np.array_equal(np.asarray(views["image"]), np.asarray(E.show(frame4)))
    fox = daami2i.load_experiment(path).compute_global_heat_map().compute_word_heat_map("fox")
    assert np.array_equal(np.asarray(views["raw"]), np.asarray(E.overlay(frame4, expanded_at(fox, 4))))
    pixel = s.ghm_high.compute_pixel_heat_map([5], frame=0)  # the click's map stays, drawn at frame 4
    assert np.array_equal(np.asarray(views["heat"]), np.asarray(E.overlay(frame4, expanded_at(pixel, 4))))


def test_a_one_frame_video_hides_the_slider(wan: Any, tmp_path: Path) -> None:
    """A video of one frame has no frame to move to: the slider is hidden (Gradio's needs a range)."""
    with daami2i.trace(wan, self_factors="all") as trc:
        out = wan(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **{**KW, "num_frames": 1}
        )
    frames = video_frames_of(out)
    assert frames.shape == (1, 32, 48, 3)
    trc.to_experiment(tmp_path / "one", seed=0, steps=2)
    save_experiment_frames(frames, tmp_path / "one")
    s = E.open_experiment(tmp_path / "one")
    assert s.frames is not None and len(s.frames) == 1 and E.set_frame(s, 0).frame == 0
    with pytest.raises(daami2i.QueryError, match="frame must be a whole number from 0 to 0"):
        E.set_frame(s, 1)
    pytest.importorskip("gradio")
    assert not component(E.build_app(wan, tmp_path / "one"), "frame").visible


def test_the_generate_form_has_a_frame_count_for_video_pipelines(wan: Any) -> None:
    """The frames field (default E.FRAMES_DEFAULT) is shown for a video pipeline, and on_generate
    passes it on: the video has that many frames, those of the pipeline called directly."""
    pytest.importorskip("gradio")
    app = E.build_app(wan)
    field = component(app, "frames")
    assert field.visible and field.value == E.FRAMES_DEFAULT == 17
    out = handler(app, "on_generate")(E.Session(), PROMPT, 0, 2, 5.0, 32, 48, 5, False)
    s = out[next(k for k in out if type(k).__name__ == "State")]
    assert s.frames is not None and s.frames.shape == (5, 32, 48, 3)
    kw = {**KW, "num_frames": 5, "max_sequence_length": 512}  # Wan's own default text length
    direct = wan(prompt=PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=5.0, output_type="np", **kw)
    assert np.array_equal(s.frames, video_frames_of(direct))


def test_an_image_pipeline_has_no_frame_count(tmp_path: Path) -> None:
    from daami2i.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd2", sample_size=64)
    with pytest.raises(daami2i.QueryError, match="frame count is for video pipelines"):
        E.generate(pipe, E.Session(), PROMPT, 0, 1, 5.0, 64, 64, num_frames=9)
    pytest.importorskip("gradio")
    assert not component(E.build_app(pipe), "frames").visible


def test_generate_on_cogvideox_uses_its_fixed_text_length() -> None:
    """CogVideoX's denoiser fixes the text length (transformer.config.max_text_seq_length): the
    explorer calls it as daami2i generate does (daami2i.video.video_call), and its maps are the
    API's of that call."""
    from daami2i.testing import tiny_cogvideox_pipeline
    from daami2i.video import video_call

    cog = tiny_cogvideox_pipeline()
    fixed = cog.transformer.config.max_text_seq_length
    assert video_call(cog, 9) == {"output_type": "np", "num_frames": 9, "max_sequence_length": fixed}
    s = E.generate(cog, E.Session(), PROMPT, 0, 1, 5.0, 32, 48, num_frames=9)
    assert s.frames is not None and s.frames.shape == (9, 32, 48, 3)
    with daami2i.trace(cog, self_factors="all") as trc:
        out = cog(
            prompt=PROMPT,
            num_inference_steps=1,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            height=32,
            width=48,
            num_frames=9,
            output_type="np",
            max_sequence_length=fixed,
        )
    assert np.array_equal(s.frames, video_frames_of(out))
    ghm = trc.compute_global_heat_map()
    assert s.ghm is not None and torch.equal(
        s.ghm.compute_word_heat_map("fox").value, ghm.compute_word_heat_map("fox").value
    )


def test_an_image_session_refuses_the_slider() -> None:
    with pytest.raises(daami2i.QueryError, match="for videos"):
        E.set_frame(E.Session(), 0)


def test_a_video_experiment_fills_the_form_with_one_frame_s_size(video_experiment: Any) -> None:
    """The form shows the size of one frame (32 x 48) and the frame count, not the stacked token frames'."""
    path, _ = video_experiment
    settings = E.experiment_settings(daami2i.load_experiment(path))
    assert settings["size"] == (32, 48) and settings["frames"] == 9

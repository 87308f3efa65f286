"""The explorer on a video (Wan): a video experiment opens with its frames, the frame slider shows each
frame, and clicks, boxes and polygons query the shown frame (``frame=``); every map equals the public
API's map expanded over the video at that frame. Image sessions are unchanged (tests/test_explorer.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

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


def expanded_at(heat: Any, t: int) -> np.ndarray:
    return heat.expand_as((32, 48))[t].numpy()


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
    # the fixed scale colours video maps too
    assert E.coloured(s, s.last_heat, "self-high", True).shape == (32, 48)


def test_generate_a_video_and_build_the_app(wan: Any, video_experiment: Any) -> None:
    s = E.generate(wan, E.Session(), PROMPT, 0, 2, 5.0, 32, 48, num_frames=9)
    assert s.frames is not None and s.frames.shape == (9, 32, 48, 3)
    assert (s.experiment_dir / "video_frames" / "frame_00008.png").is_file()
    opened = E.open_experiment(s.experiment_dir)
    assert np.array_equal(opened.frames, s.frames)
    pytest.importorskip("gradio")
    E.build_app(wan, video_experiment[0])  # builds with the slider shown for a video


def test_an_image_session_refuses_the_slider() -> None:
    with pytest.raises(daami2i.QueryError, match="for videos"):
        E.set_frame(E.Session(), 0)

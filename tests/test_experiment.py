"""Experiments on disk: saved-then-loaded answers every query with the live trace's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import daami2i
from daami2i import ExperimentError
from reference import batch_rows, dense_cross, recording
from test_dense_reference import assert_close, selected_layers


def all_queries(ghm):
    h, w = ghm.image_size
    word = ghm.tokens[1].replace("</w>", "")
    wm = ghm.compute_word_heat_map(word)
    tri = [[0, h * 0.6 + 0.3], [w * 0.5 + 0.2, h * 0.2 + 0.1], [w, h * 0.7 + 0.3]]
    return {
        "pixel": ghm.compute_pixel_heat_map([0, 7, 20]).value,
        "rows": ghm.compute_pixel_heat_map([0, 7, 20], direction="attends_to").value,
        "box": ghm.compute_bbox_heat_map(1, 1, 4, 3).value,
        "contour": ghm.compute_contour_heat_map(tri, h, w).value,
        "segmentation": ghm.compute_segmentation_heat_map([tri, [[1, 1], [20, 1], [20, 20]]], h, w, wm).value,
        "guided": ghm.compute_guided_heat_map(wm).value,
        "diffused": ghm.compute_grown_heat_map(wm, iterations=3).value,
        "pixel-diffused": ghm.compute_pixel_grown_heat_map([3], iterations=3).value,
        "word": wm.value,
        "tokens": ghm.token_maps,
    }


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_saved_experiment_answers_like_the_live_trace(style, request, tmp_path):
    pipe = request.getfixturevalue(style)
    size = dict(height=64, width=96) if style == "sd1" else dict(height=128, width=96)
    with daami2i.trace(pipe, self_factors="all") as trc:
        out = pipe(
            ["a red cat", "a blue dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(5), **size
        )
    folder = trc.to_experiment(tmp_path / "exp", seed=5, note="test run")
    exp = daami2i.load_experiment(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "attention.safetensors",
        "image_0.png",
        "image_1.png",
        "manifest.json",
    ]
    for i in range(2):
        live = all_queries(trc.compute_global_heat_map(image_idx=i))
        saved = all_queries(exp.compute_global_heat_map(image_idx=i))
        for name in live:
            assert torch.equal(live[name], saved[name]), name
        assert np.array_equal(np.asarray(exp.images[i]), np.asarray(out.images[i]))
    m = exp.manifest
    assert m["format"] == "daami2i-experiment" and m["version"] == 1
    assert m["info"]["seed"] == 5 and m["info"]["note"] == "test run"
    assert m["info"]["pipeline"] == type(pipe).__name__ and m["info"]["scheduler"] == "DDIMScheduler"
    assert m["generation"]["image_tokens"][1] == ["a</w>", "blue</w>", "dog</w>"]
    assert exp.prompts == ["a red cat", "a blue dog"]
    assert m["tokenizer"] == "clip-bpe-49408"


def test_experiment_folder_safety(sd2, tmp_path):
    with daami2i.trace(sd2) as trc:
        sd2("a cat", num_inference_steps=1, height=64, width=64)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(ExperimentError, match="not a daami2i experiment: refusing"):
        trc.to_experiment(other)
    assert (other / "notes.txt").read_text() == "precious"
    folder = trc.to_experiment(tmp_path / "exp")
    with pytest.raises(ExperimentError, match="overwrite=True"):
        trc.to_experiment(folder)
    trc.to_experiment(folder, overwrite=True)
    with pytest.raises(ExperimentError, match="manifest.json is missing"):
        daami2i.load_experiment(other)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExperimentError, match="version 99"):
        daami2i.load_experiment(folder)


def test_loading_never_unpickles(sd2, tmp_path):
    """The only binary file is safetensors; a pickle planted beside it is never opened."""
    with daami2i.trace(sd2) as trc:
        sd2("a cat", num_inference_steps=1, height=64, width=64)
    folder = trc.to_experiment(tmp_path / "exp")
    (folder / "attention.pt").write_bytes(b"\x80\x04not a real pickle")
    exp = daami2i.load_experiment(folder)
    assert exp.compute_global_heat_map().compute_pixel_heat_map([0]).value.shape == (8, 8)
    with open(folder / "attention.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert header["__metadata__"] == {"format": "daami2i-experiment", "version": "1"}


def test_word_maps_for_a_range_of_steps(sd1, tmp_path):
    with recording(sd1.unet) as book:
        with daami2i.trace(sd1, cross_steps=True) as trc:
            sd1("a red cat", num_inference_steps=4, height=64, width=64)
    book = dict(book)
    gen = trc.last_generation
    # per-step maps keep only the prompt's rows: start token, 3 tokens, end token
    assert all(s.step_tokens == 5 and len(s.per_step) == 4 for s in gen.cross_attention.values())
    exp = daami2i.load_experiment(trc.to_experiment(tmp_path / "exp"))
    rows = batch_rows(1, True, "cond", 0)
    for source in (trc, exp):
        for steps in ([1, 2], [3], range(4)):
            ghm = source.compute_global_heat_map(steps=steps)
            ref = dense_cross(
                book, selected_layers(sd1, trc, "cross"), gen.latent_size, gen.grid_size, rows, set(steps)
            )
            assert_close(ghm.compute_word_heat_map("cat").value, ref[3])
    with pytest.raises(daami2i.QueryError, match="none of the steps"):
        trc.compute_global_heat_map(steps=[9])


def test_steps_need_per_step_capture(sd1):
    with daami2i.trace(sd1) as trc:
        sd1("a red cat", num_inference_steps=2, height=64, width=64)
    with pytest.raises(daami2i.QueryError, match="cross_steps=True"):
        trc.compute_global_heat_map(steps=[0])


def test_store_limit_refuses_before_denoising(sd2):
    trc = daami2i.trace(sd2, max_store_mb=1)
    need = trc.estimate_nbytes((64, 64))
    steps_done = []
    with pytest.raises(daami2i.TraceError, match=r"would store 74\.8 MiB .*self 64\.0 MiB.*max_store_mb=1"):
        with trc:
            sd2("a cat", num_inference_steps=2, callback_on_step_end=lambda *a: steps_done.append(1) or {})
    assert steps_done == []  # refused before the first denoising step finished
    assert need["total"] == 4096**2 * 4 + need["cross"] and need["total"] > 2**20


def test_estimate_matches_the_stores(sd2):
    with daami2i.trace(sd2, cross_steps=True, self_factors="all") as trc:
        sd2(["a red cat", "a dog"], num_inference_steps=3, height=64, width=96)
    gen = trc.last_generation
    est = trc.estimate_nbytes(gen.latent_size, n_images=2, n_steps=3, step_tokens=5)
    assert est["self"] == gen.nbytes("self")
    assert est["cross"] == gen.nbytes("cross")
    assert est["cross_steps"] == gen.nbytes("cross_steps")

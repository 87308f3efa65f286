"""The command line end to end, through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import daami2i
from daami2i.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(app, ["generate", "a red circle and a blue square", "--steps", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_generate_writes_image_word_maps_and_experiment(generated):
    out, res = generated
    assert "experiment:" in res.output
    image = Image.open(out / "image.png")
    assert image.size == (64, 64)
    assert sorted(p.name for p in (out / "words").iterdir()) == [
        "a.png",
        "and.png",
        "blue.png",
        "circle.png",
        "red.png",
        "square.png",
    ]
    assert (out / "words.png").is_file()
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.prompts == ["a red circle and a blue square"]
    assert exp.manifest["info"]["seed"] == 0 and exp.manifest["info"]["steps"] == 3
    assert np.array_equal(np.asarray(exp.images[0]), np.asarray(image))


def test_generate_is_reproducible_and_matches_the_api(generated, tmp_path):
    """The CLI's experiment holds the same maps as the library run with the same seed."""
    from daami2i.shapes.model import load_pipeline

    out, _ = generated
    pipe = load_pipeline()
    with daami2i.trace(pipe) as trc:
        pipe(
            "a red circle and a blue square",
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        )
    live = trc.compute_global_heat_map()
    saved = daami2i.load_experiment(out / "experiment").compute_global_heat_map()
    assert torch.allclose(live.compute_word_heat_map("circle").value, saved.compute_word_heat_map("circle").value)
    assert torch.allclose(live.compute_pixel_heat_map([5]).value, saved.compute_pixel_heat_map([5]).value)


@pytest.mark.parametrize(
    "args, name",
    [
        (["--word", "circle"], "show-word-circle.png"),
        (["--word", "square", "--merged"], "show-word-square-merged.png"),
        (["--pixel", "3,4 5,6"], "show-pixel-3x4-5x6.png"),
        (["--box", "1,2,6,7", "--guide-word", "circle"], "show-box-1-2-6-7-guided-circle.png"),
        (["--contour", "0,20 50,10 64,60 10,60"], "show-contour.png"),
        (["--word", "red", "--threshold", "0.5"], "show-word-red-mask0.5.png"),
    ],
)
def test_show_answers_queries_without_the_model(generated, args, name):
    out, _ = generated
    res = runner.invoke(app, ["show", str(out / "experiment"), *args])
    assert res.exit_code == 0, res.output
    png = out / "experiment" / name
    assert png.is_file() and Image.open(png).size[0] > 100


def test_show_pixel_matches_the_api(generated, tmp_path):
    out, _ = generated
    target = tmp_path / "p.png"
    res = runner.invoke(app, ["show", str(out / "experiment"), "--pixel", "3,4", "-o", str(target)])
    assert res.exit_code == 0 and target.is_file()
    ghm = daami2i.load_experiment(out / "experiment").compute_global_heat_map()
    v = ghm.compute_pixel_heat_map([4 * ghm.grid_size[1] + 3]).value
    assert f"min {float(v.min()):.4g}, max {float(v.max()):.4g}" in res.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--word", "horse"], 2, "'horse'.*not in the prompt"),
        (["--box", "1,2,99,9"], 2, "outside the 16x16"),
        (["--pixel", "3"], 2, "needs 2 numbers"),
        (["--pixel", "30,1"], 2, "outside the 16x16"),
        (["--box", "1,2,x,4"], 2, "must be numbers"),
        ([], 2, "exactly one of"),
        (["--word", "circle", "--pixel", "1,1"], 2, "exactly one of"),
        (["--word", "circle", "--guide-word", "red"], 2, "--merged"),
        (["--contour", "0,0 1,1"], 2, "at least 3"),
    ],
)
def test_show_bad_arguments(generated, args, code, message):
    out, _ = generated
    res = runner.invoke(app, ["show", str(out / "experiment"), *args])
    assert res.exit_code == code, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    import re

    assert re.search(message, res.output), res.output
    assert "Traceback" not in res.output


def test_missing_experiment_and_debug(tmp_path):
    res = runner.invoke(app, ["show", str(tmp_path / "nope"), "--word", "a"])
    assert res.exit_code == 3 and "manifest.json is missing" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["--debug", "show", str(tmp_path / "nope"), "--word", "a"])
    assert res.exit_code == 1 and isinstance(res.exception, daami2i.ExperimentError)


def test_info(generated):
    out, _ = generated
    res = runner.invoke(app, ["info", str(out / "experiment")])
    assert res.exit_code == 0, res.output
    for text in [
        "'a red circle and a blue square'",
        "64x64 (height x width)",
        "grid 16x16",
        "steps       3 run",
        "self-attn   factor 1: 16x16",
        "cross-attn  factor 2",
        "stores      self",
        "seed 0",
    ]:
        assert text in res.output, text


def test_generate_bad_arguments(tmp_path):
    res = runner.invoke(app, ["generate", "a cat", "--height", "100", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "multiple of 8" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["generate", "a cat", "-o", str(tmp_path / "full")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["generate", "a cat", "-m", str(tmp_path / "full"), "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "model_index.json" in res.output
    res = runner.invoke(app, ["generate", "a cat", "--steps", "0"])
    assert res.exit_code == 2


def test_unknown_hub_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["generate", "a cat", "-m", "nobody/no-such-model", "-o", str(tmp_path / "z")])
    assert res.exit_code == 1 and "could not load model" in res.output and "HF_HUB_OFFLINE" in res.output


def test_help_reads_well():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("generate", "show", "info"):
        assert cmd in res.output
    res = runner.invoke(app, ["show", "--help"])
    assert "--guide-word" in res.output and "both corners included" in " ".join(res.output.split())


def test_console_script_and_module_entry_points(generated):
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "daami2i"]
    assert ep.value == "daami2i.cli:main"
    out, _ = generated
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "daami2i", "info", str(out / "experiment")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and "grid 16x16" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "daami2i", "show", str(out / "experiment"), "--word", "zebra"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: word 'zebra'")
    manifest = json.loads((out / "experiment" / "manifest.json").read_text())
    assert manifest["format"] == "daami2i-experiment"


def test_generate_with_the_tiny_random_model(tmp_path):
    out = tmp_path / "tiny"
    args = ["generate", "a red cat", "-m", "tiny", "--steps", "1", "--height", "64", "--width", "96", "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert Image.open(out / "image.png").size == (96, 64)
    assert daami2i.load_experiment(out / "experiment").manifest["info"]["model_arg"] == "tiny"


def test_generate_from_a_local_pipeline_folder(tmp_path):
    """-m takes any diffusers pipeline folder; here the embedded model's, loaded as float32 on the CPU."""
    from daami2i.shapes.model import model_path

    out = tmp_path / "local"
    res = runner.invoke(app, ["generate", "a blue square", "-m", str(model_path()), "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    exp = daami2i.load_experiment(out / "experiment")
    assert exp.manifest["info"]["dtype"] == "torch.float32" and exp.prompts == ["a blue square"]

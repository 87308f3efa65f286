"""The command line's checks and promises (issue 13): options validated before the model loads,
no half-written output folder, `show -o` writes (and prints) the file it says, readable help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import daami2i
from daami2i import cli
from daami2i.cli import app

runner = CliRunner()
TINY = ["-m", "tiny", "--steps", "1"]  # random weights, one step: the fastest real run


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run of the embedded model (2 steps): its folder and what generate printed."""
    out = tmp_path_factory.mktemp("checks") / "run"
    res = runner.invoke(app, ["generate", "a red circle and a blue square", "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)


# -- generate: every option checked before the model loads -------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", ""], "has no words"),
        (["generate", " ,.; "], "has no words"),
        (["generate", "a cat", "--guidance", "nan"], "--guidance must be a number from 0 to 100"),
        (["generate", "a cat", "--guidance", "inf"], "--guidance must be a number from 0 to 100"),
        (["generate", "a cat", "--guidance", "-1"], "--guidance must be a number from 0 to 100"),
        (["generate", "a cat", "--guidance", "1e308"], "--guidance must be a number from 0 to 100"),
        (["generate", "a cat", "--steps", "1000"], "--steps must be from 1 to 999"),
        (["generate", "!!!"], "has no words"),
        (["generate", "a cat", "--seed", "-1"], "--seed must be an integer from 0"),
        (["generate", "a cat", "--seed", str(2**64)], "--seed must be an integer from 0"),
        (["generate", "a cat", "--device", "nope"], "not a torch device"),
    ],
)
def test_generate_checks_options_before_loading(tmp_path: Path, no_model: None, args: list[str], message: str) -> None:
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert message in res.output
    assert _leftovers(tmp_path) == []


def test_generate_refuses_a_cuda_device_it_does_not_have(tmp_path: Path, no_model: None) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = runner.invoke(app, ["generate", "a cat", "--device", "cuda", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "sees no CUDA device" in res.output and "--device cpu" in res.output


def test_generate_refuses_an_out_that_is_a_file(tmp_path: Path, no_model: None) -> None:
    (tmp_path / "out").write_text("mine")
    res = runner.invoke(app, ["generate", "a cat", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    assert (tmp_path / "out").read_text() == "mine"


# -- generate: nothing half-written ------------------------------------------------------------------
def _fail_while_saving(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from daami2i import viz

    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(viz, "plot_word_grid", broken)


def test_a_failed_generate_leaves_nothing_and_can_be_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "new" / "deeper" / "run"
    _fail_while_saving(monkeypatch, RuntimeError("disk on fire"))
    res = runner.invoke(app, ["generate", "a cat", *TINY, "-o", str(out)])
    assert res.exit_code == 1 and "disk on fire" in res.output
    assert _leftovers(tmp_path) == []  # no run folder, no temporary sibling, no parent made for it
    monkeypatch.undo()
    res = runner.invoke(app, ["generate", "a cat", *TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output  # not refused as "not empty"
    assert _leftovers(out) == ["experiment", "image.png", "words", "words.png"]
    assert _leftovers(out.parent) == ["run"]


def test_an_interrupted_generate_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_while_saving(monkeypatch, KeyboardInterrupt())
    res = runner.invoke(app, ["generate", "a cat", *TINY, "-o", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert _leftovers(tmp_path) == []


def test_a_failed_overwrite_keeps_the_earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "image.png").write_text("earlier")
    (out / "notes.txt").write_text("mine")
    _fail_while_saving(monkeypatch, RuntimeError("disk on fire"))
    res = runner.invoke(app, ["generate", "a cat", *TINY, "--overwrite", "-o", str(out)])
    assert res.exit_code == 1
    assert _leftovers(tmp_path) == ["run"] and _leftovers(out) == ["image.png", "notes.txt"]
    assert (out / "image.png").read_text() == "earlier"


def test_overwrite_replaces_the_runs_files_and_keeps_others(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "words").mkdir(parents=True)
    (out / "words" / "dog.png").write_text("stale")
    (out / "image.png").write_text("earlier")
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["generate", "a cat", *TINY, "--overwrite", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert _leftovers(out) == ["experiment", "image.png", "notes.txt", "words", "words.png"]
    assert _leftovers(out / "words") == ["a.png", "cat.png"]  # the earlier run's word maps are gone
    assert Image.open(out / "image.png").format == "PNG" and (out / "notes.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == ["run"]


def test_generate_a_prompt_longer_than_the_text_encoder(tmp_path: Path) -> None:
    """It failed after generating (a word past the 77 tokens), left a half-written folder and refused
    the rerun. Words past the window are dropped (with a warning) and the run is written."""
    prompt = " ".join(["a red circle and a blue square"] * 14 + ["zebra"])
    res = runner.invoke(app, ["generate", prompt, *TINY, "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "zebra" not in daami2i.load_experiment(tmp_path / "run" / "experiment").compute_global_heat_map().words
    assert re.search(r"(^|\r)warning: .*was cut", res.output, re.M), res.output  # one line, past the bar
    assert _leftovers(tmp_path) == ["run"]


def test_generate_shows_no_loading_noise(shapes_run: tuple[Path, str]) -> None:
    """Only our own bars: not the per-component bars of diffusers / transformers, not their warnings."""
    _, output = shapes_run
    assert "load model" in output and "sampling" in output
    for noise in ("Loading pipeline components", "Loading weights", "torchvision"):
        assert noise not in output


# -- show --------------------------------------------------------------------------------------------
def _wrote(output: str) -> Path:
    match = re.search(r"^wrote (.+?)  \(", output, re.M)
    assert match, output
    return Path(match.group(1))


@pytest.mark.parametrize("trailing", ["/", ""])
def test_show_into_a_folder_writes_a_file_inside(shapes_run: tuple[Path, str], tmp_path: Path, trailing: str) -> None:
    run, _ = shapes_run
    folder = tmp_path / "maps"
    if not trailing:
        folder.mkdir()  # an existing folder, named without the slash
    res = runner.invoke(app, ["show", str(run / "experiment"), "--word", "red", "-o", f"{folder}{trailing}"])
    assert res.exit_code == 0, res.output
    assert _wrote(res.output) == folder / "show-word-red.png" and (folder / "show-word-red.png").is_file()
    assert _leftovers(tmp_path) == ["maps"]


def test_show_adds_png_and_prints_it(shapes_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = shapes_run
    res = runner.invoke(app, ["show", str(run / "experiment"), "--word", "red", "-o", str(tmp_path / "noext")])
    assert res.exit_code == 0, res.output
    assert _wrote(res.output) == tmp_path / "noext.png" and _leftovers(tmp_path) == ["noext.png"]


def test_show_refuses_an_unknown_extension(shapes_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = shapes_run
    res = runner.invoke(app, ["show", str(run / "experiment"), "--word", "red", "-o", str(tmp_path / "map.v2")])
    assert res.exit_code == 2 and "'.v2' is not an image format" in res.output and "map.png" in res.output
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("value", ["1.5", "-1", "nan", "0", "1", "inf"])
def test_show_threshold_must_be_inside_0_1(shapes_run: tuple[Path, str], value: str) -> None:
    run, _ = shapes_run
    res = runner.invoke(app, ["show", str(run / "experiment"), "--word", "red", "--threshold", value])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --threshold must be a number strictly between 0 and 1"), res.output


@pytest.mark.parametrize("args", [["--box", "1,2,nan,4"], ["--contour", "0,0 inf,5 30,50"]])
def test_show_coordinates_must_be_finite(shapes_run: tuple[Path, str], args: list[str]) -> None:
    run, _ = shapes_run
    res = runner.invoke(app, ["show", str(run / "experiment"), *args])
    assert res.exit_code == 2 and "must be finite numbers" in res.output, res.output


def test_show_box_corners_are_included(shapes_run: tuple[Path, str], tmp_path: Path) -> None:
    """One latent cell is the box 'X,Y,X,Y'; a corner one past the grid is clipped."""
    run, _ = shapes_run
    ghm = daami2i.load_experiment(run / "experiment").compute_global_heat_map()
    for box, api in (("3,4,3,4", (3, 4, 3, 4)), ("8,0,16,16", (8, 0, 15, 15))):
        res = runner.invoke(app, ["show", str(run / "experiment"), "--box", box, "-o", str(tmp_path / "b.png")])
        assert res.exit_code == 0, res.output
        v = ghm.compute_bbox_heat_map(*api).value
        assert f"min {float(v.min()):.4g}, max {float(v.max()):.4g}" in res.output


def test_show_region_with_threshold_draws_region_map_and_mask(shapes_run: tuple[Path, str], tmp_path: Path) -> None:
    """`--contour ... --threshold` drew the mask alone: now the polygon, the map and the mask."""
    run, _ = shapes_run
    query = ["show", str(run / "experiment"), "--contour", "0,0 32,0 32,64 0,64"]
    res = runner.invoke(app, [*query, "-o", str(tmp_path / "map.png")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*query, "--threshold", "0.5", "-o", str(tmp_path / "mask.png")])
    assert res.exit_code == 0, res.output
    two, three = Image.open(tmp_path / "map.png").size, Image.open(tmp_path / "mask.png").size
    assert three[0] > 1.4 * two[0] and abs(three[1] - two[1]) < 0.1 * two[1]  # a third panel beside the two


def test_show_word_with_threshold_draws_map_and_mask(shapes_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = shapes_run
    query = ["show", str(run / "experiment"), "--word", "red"]
    assert runner.invoke(app, [*query, "-o", str(tmp_path / "map.png")]).exit_code == 0
    assert runner.invoke(app, [*query, "--threshold", "0.5", "-o", str(tmp_path / "mask.png")]).exit_code == 0
    one, two = Image.open(tmp_path / "map.png").size, Image.open(tmp_path / "mask.png").size
    assert two[0] > 1.4 * one[0]  # the mask beside the map


def test_show_guided_title_names_the_guide(
    shapes_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daami2i import viz

    titles: list[str] = []
    original = viz.plot_region

    def spy(*args: object, **kwargs: object) -> object:
        titles.append(str(kwargs.get("title")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(viz, "plot_region", spy)
    run, _ = shapes_run
    res = runner.invoke(
        app, ["show", str(run / "experiment"), "--box", "8,0,15,15", "--guide-word", "circle", "-o", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert titles and "guided by 'circle'" in titles[0]


# -- --debug after the command, help ------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [["show", "{missing}", "--word", "a", "--debug"], ["info", "{missing}", "--debug"], ["generate", "", "--debug"]],
)
def test_debug_after_the_command(tmp_path: Path, args: list[str]) -> None:
    res = runner.invoke(app, [a.format(missing=tmp_path / "nope") for a in args])
    assert res.exit_code == 1 and res.exception is not None, res.output  # the exception, not one line
    assert "No such option" not in res.output


def test_no_debug_state_leaks_into_the_next_command(tmp_path: Path) -> None:
    runner.invoke(app, ["info", str(tmp_path / "nope"), "--debug"])
    res = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert res.exit_code == 3 and res.output.startswith("error: ")


def test_help_shows_defaults_and_flags_without_values() -> None:
    res = runner.invoke(app, ["generate", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())  # undo the wrapping
    for default in ("[default: 25 for shapes, else 20]", "[default: outputs/<prompt>]", "[default: 0]"):
        assert default in text, default
    assert "<bool>" not in res.output
    assert re.search(r"^\s+--overwrite\s+Replace", res.output, re.M), res.output  # a flag takes no value
    assert "--debug" in res.output
    res = runner.invoke(app, ["show", "--help"])
    text = " ".join(res.output.split())
    assert "both corners included" in text and "[default: show-<query>.png inside the experiment]" in text


def test_generate_takes_an_emoji_prompt_as_words(tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", "\U0001f642 café", "--steps", "1", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    # each word its own file, named by its letters or code point, and the names printed
    files = sorted(p.name for p in (tmp_path / "out" / "words").iterdir())
    assert files == sorted(["u1f642.png", "café.png"]), files
    assert "u1f642.png (\U0001f642)" in res.output


def test_word_files_never_overwrite_each_other() -> None:
    from daami2i.cli import _unique_names

    names = _unique_names(["café", "cafe", "caf", "\U0001f642", "\U0001f44d", "prompt", "u1f642"])
    assert len(set(names.values())) == len(names)


def test_a_width_alone_keeps_the_models_height(tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", "a red circle", "--steps", "1", "--width", "128", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    from PIL import Image

    assert Image.open(tmp_path / "o" / "image.png").size == (128, 64)  # (width, height); the model makes 64


def test_show_half_open_boxes(tmp_path: Path, shapes_run: tuple[Path, str]) -> None:
    out, _ = shapes_run
    res = runner.invoke(app, ["show", str(out), "--box", "0,0,4,4", "--half-open", "-o", str(tmp_path / "b.png")])
    assert res.exit_code == 0 and (tmp_path / "b.png").is_file(), res.output
    res = runner.invoke(app, ["show", str(out), "--box", "0,0,16,4"])  # inclusive: x2 = 16 is clipped
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["show", str(out), "--box", "0,0,17,4", "--half-open"])
    assert res.exit_code == 2 and "x2 and y2 are exclusive" in res.output
    res = runner.invoke(app, ["show", str(out), "--word", "circle", "--half-open"])
    assert res.exit_code == 2 and "give a --box" in res.output

"""Datasets: numbers a run cannot use, an output folder it cannot write, and ground truth of another
dataset, each refused (or told) before pycocotools or the model sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daami2i import cli
from daami2i.datasets import DatasetWarning, evaluate
from test_datasets_cli import _prompts, _usage_error, no_model  # noqa: F401 - the fixture is used by name
from test_datasets_evaluate import _instances, _write

runner = CliRunner()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--guidance", "1e308"], "guidance"),
        (["--steps", "1000"], "steps"),
        (["-k", "100000000000000000000"], "images per prompt"),
    ],
)
def test_numbers_a_run_cannot_use(tmp_path, no_model, args, needle):  # noqa: F811
    out = tmp_path / "ds"
    res = runner.invoke(cli.app, ["dataset", str(_prompts(tmp_path, "a red circle")), "-o", str(out), *args])
    _usage_error(res, needle)
    assert not out.exists()


def test_an_output_folder_in_proc(tmp_path, no_model):  # noqa: F811
    """/proc takes no new folders, even for root: refused before the model loads."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    res = runner.invoke(cli.app, ["dataset", str(_prompts(tmp_path, "a red circle")), "-o", "/proc/daami2i-x"])
    _usage_error(res, "cannot be written")


def test_ground_truth_of_another_dataset(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1, 2, 3, 4]))
    part = _write(tmp_path, "part.json", _instances(64, [1, 2]))
    with pytest.warns(DatasetWarning, match=r"cover 2 of the ground truth's 4 images"):
        evaluate(part, gt)
    other = _instances(64, [1, 2, 3, 4])
    other["images"][0]["file_name"] = "elsewhere.png"
    with pytest.raises(Exception, match=r"image 1 is 'elsewhere.png' in the predictions .* but '1.png'"):
        evaluate(_write(tmp_path, "other.json", other), gt)
    json.loads(gt.read_text())  # the files are left as they were


def test_a_folder_given_as_a_coco_file(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1]))
    res = runner.invoke(cli.app, ["evaluate", str(gt), "--gt", str(tmp_path)])
    _usage_error(res, "is a folder", "instances.json")
    res = runner.invoke(cli.app, ["evaluate", str(tmp_path / "nope.json"), "--gt", str(gt)])
    _usage_error(res, "does not exist")

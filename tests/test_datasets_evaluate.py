"""`evaluate` on files that do not belong together says what does not match (instead of
pycocotools' AssertionError, numpy's broadcast error or a KeyError)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from daami2i.datasets import DatasetWarning, evaluate
from daami2i.errors import ConfigError
from daami2i.heatmaps import masks as M


def _instances(size: int, image_ids: list[int], names: tuple[str, ...] = ("circle",)) -> dict:
    mask = np.zeros((size, size), bool)
    mask[size // 4 : size // 2, size // 4 : size // 2] = True
    inst = M.instances(mask)[0]
    ann = inst.annotation("rle")
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": size, "width": size} for i in image_ids],
        "annotations": [{"id": j + 1, "image_id": i, "category_id": 1, **ann} for j, i in enumerate(image_ids)],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }


def _write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_matching_files_evaluate(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1, 2]))
    res = evaluate(gt, gt)
    assert res["segm_AP"] == pytest.approx(1.0) and res["segm_mIoU"] == pytest.approx(1.0)


def test_predictions_for_other_images(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1, 2]))
    pred = _write(tmp_path, "pred.json", _instances(64, [3, 4]))
    with pytest.raises(ConfigError, match=r"image ids the ground truth .* does not have \(3, 4; .* ids 1, 2\)"):
        evaluate(pred, gt)
    results = [{**a, "score": 0.9} for a in _instances(64, [7])["annotations"]]  # a results list, too
    with pytest.raises(ConfigError, match=r"does not have \(7;"):
        evaluate(_write(tmp_path, "res.json", results), gt)


def test_predictions_of_another_size(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1]))
    pred = _instances(32, [1])
    with pytest.raises(ConfigError, match=r"image 1 is 32x32 in the predictions .* but 64x64 in the ground truth"):
        evaluate(_write(tmp_path, "pred.json", pred), gt)
    results = [{**a, "score": 1.0} for a in pred["annotations"]]
    with pytest.raises(ConfigError, match=r"RLE mask for image 1 is \[32, 32\] .* at \[64, 64\]"):
        evaluate(_write(tmp_path, "res.json", results), gt)


def test_a_ground_truth_that_is_not_an_instances_file(tmp_path):
    pred = _write(tmp_path, "pred.json", _instances(64, [1]))
    captions = {"images": _instances(64, [1])["images"], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}
    with pytest.raises(ConfigError, match=r"has no 'categories' list .*: --gt needs a COCO instances file"):
        evaluate(pred, _write(tmp_path, "captions.json", captions))
    with pytest.raises(ConfigError, match="is a results list"):
        evaluate(pred, _write(tmp_path, "list.json", _instances(64, [1])["annotations"]))
    with pytest.raises(ConfigError, match="is not JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        evaluate(pred, bad)


def test_predictions_without_categories_or_shared_names(tmp_path):
    gt = _write(tmp_path, "gt.json", _instances(64, [1]))
    pred = _instances(64, [1])
    del pred["categories"]
    with pytest.raises(ConfigError, match="without 'categories'"):
        evaluate(_write(tmp_path, "pred.json", pred), gt)
    other = _instances(64, [1], names=("dog",))
    no_shared = pytest.raises(ConfigError, match=r"no predictions for the ground truth's categories \(circle\)")
    with pytest.warns(DatasetWarning, match="categories the ground truth does not: dog"), no_shared:
        evaluate(_write(tmp_path, "other.json", other), gt)


def test_cli_evaluate_reports_the_mismatch_in_one_line(tmp_path):
    from daami2i.cli import app

    gt = _write(tmp_path, "gt.json", _instances(64, [1, 2]))
    pred = _write(tmp_path, "pred.json", _instances(64, [5]))
    res = CliRunner().invoke(app, ["evaluate", str(pred), "--gt", str(gt)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not have (5;" in lines[0], res.output

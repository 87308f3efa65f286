"""COCO datasets from the embedded shapes model: pycocotools reads and evaluates them; a killed run
resumes to the same dataset; two accelerate processes make the same dataset as one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from daami2i.datasets import DatasetConfig, evaluate, generate_shard, merge
from daami2i.errors import ConfigError

PROMPTS = ["a red circle", "a blue square and a green triangle", "a yellow triangle"]
WORDS = ["circle", "square", "triangle"]
CONFIG = dict(images_per_prompt=2, steps=8, guidance=4.0)


@pytest.fixture(scope="module")
def clean_run(shapes_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "ds"
    made = generate_shard(shapes_pipe, PROMPTS, out, DatasetConfig(**CONFIG), WORDS, progress=False)
    assert made == 6
    merge(out)
    return out


def _content(out: Path) -> dict:
    data = json.loads((out / "instances.json").read_text())
    data.pop("info")
    return data


def test_coco_files_load_and_evaluate(clean_run):
    coco = COCO(str(clean_run / "instances.json"))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5, 6]
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} <= set(WORDS)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns, "the shapes model's word maps should give at least one instance"
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:  # every annotation's area is its mask's area
        assert coco.annToMask(a).sum() == a["area"]
    captions = json.loads((clean_run / "captions.json").read_text())
    assert [c["caption"] for c in captions["annotations"]] == [p for p in PROMPTS for _ in range(2)]
    for img in coco.loadImgs(coco.getImgIds()):
        assert (clean_run / img["file_name"]).is_file()
    # evaluated against itself, the dataset is perfect: this exercises the whole pycocotools path
    res = evaluate(clean_run / "instances.json", clean_run / "instances.json")
    assert res["segm_AP"] == pytest.approx(1.0) and res["bbox_AP"] == pytest.approx(1.0)
    assert res["segm_mIoU"] == pytest.approx(1.0) and res["bbox_mIoU"] == pytest.approx(1.0)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_dataset(shapes_pipe, clean_run, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    cls = type(shapes_pipe)
    original, calls = cls.__call__, []

    def dies_on_fifth(self, *args, **kwargs):  # the process is killed while making the fifth image
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", dies_on_fifth)
    with pytest.raises(Killed):
        generate_shard(shapes_pipe, PROMPTS, out, DatasetConfig(**CONFIG), WORDS, progress=False)
    monkeypatch.setattr(cls, "__call__", original)
    # a line cut short by the kill must not break the resume
    with (out / "shards" / "rank-0.jsonl").open("a") as f:
        f.write('{"image_id": 6, "annot')
    made = generate_shard(shapes_pipe, PROMPTS, out, DatasetConfig(**CONFIG), WORDS, progress=False)
    assert made == 2
    assert generate_shard(shapes_pipe, PROMPTS, out, DatasetConfig(**CONFIG), WORDS, progress=False) == 0
    merge(out)
    assert _content(out) == _content(clean_run)


def test_a_folder_holds_one_dataset(shapes_pipe, clean_run, tmp_path):
    with pytest.raises(ConfigError, match="other prompts"):
        generate_shard(shapes_pipe, PROMPTS[:2], clean_run, DatasetConfig(**CONFIG), WORDS, progress=False)
    # every setting that changes the output is recorded, the model's identity and the words included
    with pytest.raises(ConfigError, match=r"words \(--words\): \['circle', 'square', 'triangle'\] there, \['circle'\]"):
        generate_shard(shapes_pipe, PROMPTS, clean_run, DatasetConfig(**CONFIG), ["circle"], progress=False)
    with pytest.raises(ConfigError, match=r"model \(-m\): 'shapes@.*' there, 'hub:other/model' in this run"):
        cfg = DatasetConfig(**CONFIG, model="hub:other/model")
        generate_shard(shapes_pipe, PROMPTS, clean_run, cfg, WORDS, progress=False)
    with pytest.raises(ConfigError, match=r"steps \(--steps\): 8 there, 9"):
        generate_shard(shapes_pipe, PROMPTS, clean_run, DatasetConfig(**{**CONFIG, "steps": 9}), WORDS, progress=False)
    # a folder of the first format (no model, no words recorded) cannot be resumed safely
    old = tmp_path / "old"
    old.mkdir()
    (old / "dataset.json").write_text(json.dumps({"format": "daami2i-dataset", "version": 1, "prompts": PROMPTS}))
    with pytest.raises(ConfigError, match="older daami2i"):
        generate_shard(shapes_pipe, PROMPTS, old, DatasetConfig(**CONFIG), WORDS, progress=False)
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        generate_shard(shapes_pipe, PROMPTS, other, DatasetConfig(**CONFIG), WORDS, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_two_accelerate_processes_make_the_same_dataset(clean_run, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate is part of the test extra"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\n" + "\n".join(PROMPTS) + "\n")
    out = tmp_path / "ds"
    # the subprocess computes with this process's thread count: the same reductions, the same masks
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    # on a machine without GPUs, --multi_gpu makes accelerate start a torchrun-style group; the CLI
    # then forms a gloo process group of CPU workers
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "daami2i", "dataset", str(prompts), "-o", str(out)]
    cmd += ["--words", ",".join(WORDS), "-k", "2", "--steps", "8", "--guidance", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert _content(out) == _content(clean_run)


def test_nouns_by_spacy_become_lemma_categories(shapes_pipe, tmp_path):
    """A real spaCy pipeline (built here: a blank English one whose attribute ruler tags the shape
    nouns and their lemmas, standing in for en_core_web_sm, which is not on PyPI) finds the nouns;
    categories are their lemmas, so 'circles' and 'circle' are one category."""
    import spacy

    from daami2i.datasets import nouns

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for word, lemma in (("circle", "circle"), ("circles", "circle"), ("square", "square"), ("triangle", "triangle")):
        ruler.add([[{"LOWER": word}]], {"POS": "NOUN", "LEMMA": lemma})
    nlp.to_disk(tmp_path / "nlp")
    model = str(tmp_path / "nlp")
    assert nouns("two red circles and a blue square", model) == [("circles", "circle"), ("square", "square")]
    prompts = ["a red circle", "two red circles and a blue square"]
    out = tmp_path / "ds"
    cfg = DatasetConfig(images_per_prompt=1, steps=8, guidance=4.0, spacy_model=model)
    generate_shard(shapes_pipe, prompts, out, cfg, None, progress=False)
    merge(out)
    data = json.loads((out / "instances.json").read_text())
    names = {c["name"] for c in data["categories"]}
    assert names <= {"circle", "square"} and "circle" in names
    with pytest.raises(ConfigError, match="no spaCy pipeline"):
        nouns("a cat", str(tmp_path / "missing"))


def test_nouns_need_spacy_or_words(shapes_pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # as if spaCy were not installed
    with pytest.raises(ConfigError, match="--words"):
        generate_shard(shapes_pipe, PROMPTS[:1], tmp_path / "ds", DatasetConfig(**CONFIG), None, progress=False)
    assert not (tmp_path / "ds").exists()  # refused before anything is written


def test_cli_evaluate_prints_and_writes_figures(clean_run, tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    out = tmp_path / "eval.json"
    inst = str(clean_run / "instances.json")
    res = CliRunner().invoke(app, ["evaluate", inst, "--gt", inst, "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "segm AP 1.000" in res.output and "bbox AP 1.000" in res.output
    assert json.loads(out.read_text())["segm_mIoU"] == pytest.approx(1.0)
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing.json"), "--gt", inst])
    assert res.exit_code == 2 and "does not exist" in res.output

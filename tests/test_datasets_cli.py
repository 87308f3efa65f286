"""`daami2i dataset` on the embedded model: the folder is never mixed or poisoned. Options, prompt
files and the output folder are checked before the model loads and before anything is written; a
resume with another model or other words is refused, naming the setting; the embedded model needs
no spaCy; a word past the text encoder's 77 tokens is reported, never silently dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daami2i import cli

runner = CliRunner()
FAST = ["--steps", "2", "-k", "1"]


def _prompts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the command must stop before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)


def _usage_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output  # one clear line
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_the_embedded_model_needs_no_spacy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # as if spaCy were not installed (no English pipeline is)
    out = tmp_path / "ds"
    prompts = _prompts(tmp_path, "a red circle and a blue square")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "instances.json").read_text())
    assert data["annotations"] and {c["name"] for c in data["categories"]} <= {"circle", "square", "triangle"}
    settings = json.loads((out / "dataset.json").read_text())["settings"]
    assert settings["words"] == ["circle", "square", "triangle"]
    assert settings["model"].startswith("shapes@")


def test_other_models_keep_the_clear_spacy_error(tmp_path, monkeypatch, no_model):
    monkeypatch.setitem(sys.modules, "spacy", None)
    prompts = _prompts(tmp_path, "a red circle")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(tmp_path / "ds"), "-m", "tiny", *FAST])
    _usage_error(res, "spaCy", "--words")
    assert not (tmp_path / "ds").exists()


def test_a_resume_with_another_model_or_other_words_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    prompts = _prompts(tmp_path, "a red circle")
    first = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", "circle", *FAST])
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mismatch was reported")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", "circle", "-m", "tiny", *FAST])
    _usage_error(res, "model (-m)", "shapes@", "tiny")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", "circle,square", *FAST])
    _usage_error(res, "words (--words)", "['circle']", "['circle', 'square']")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", "circle", "--tau", "0.5", *FAST])
    _usage_error(res, "threshold (--tau)", "0.4", "0.5")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the folder is untouched
    monkeypatch.undo()
    # the same settings (words in another order and case count as the same) resume: nothing new to make
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", " Circle ", *FAST])
    assert res.exit_code == 0, res.output
    assert "0 new sample(s)" in res.output


@pytest.mark.parametrize(
    "option, needles",
    [
        (["--tau", "5"], ["--tau", "[0, 1)", "5"]),
        (["--guidance", "nan"], ["--guidance", "finite", "nan"]),
        (["--guidance", "-1"], ["--guidance", "-1"]),
        (["--scheme", "magic"], ["--scheme", "magic"]),
        (["--method", "median"], ["--method", "median"]),
        (["--segmentation", "mesh"], ["--segmentation", "mesh"]),
        (["--seed", "-3"], ["--seed", "-3"]),
        (["--words", ",,,"], ["--words", "names no words"]),
        (["--words", " , ,"], ["--words", "names no words"]),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, no_model, option, needles):
    out = tmp_path / "ds"
    prompts = _prompts(tmp_path, "a red circle")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), *FAST, *option])
    _usage_error(res, *needles)
    assert not out.exists()


def test_a_refused_option_does_not_poison_the_folder(tmp_path):
    out = tmp_path / "ds"
    prompts = _prompts(tmp_path, "a red circle")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--tau", "5", *FAST])
    assert res.exit_code == 2 and not out.exists()
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "content, needles",
    [
        ("a red circle\n".encode("utf-16"), ["UTF-16", "iconv"]),
        ("a red circle\na café square\n".encode("latin-1"), ["not UTF-8", "line 2", "iconv"]),
        (b"\x00\x01\x02binary", ["NUL bytes"]),
    ],
    ids=["utf-16", "latin-1", "binary"],
)
def test_prompt_files_that_are_not_utf8_get_one_clear_line(tmp_path, no_model, content, needles):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(tmp_path / "ds"), *FAST])
    _usage_error(res, str(prompts), *needles)
    assert not (tmp_path / "ds").exists()


def test_a_utf8_prompt_file_with_a_byte_order_mark_reads(tmp_path):
    from daami2i.datasets import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\r\na café square\n".encode("utf-8-sig"))
    assert read_prompts(path) == ["a red circle", "a café square"]


def test_a_folder_as_prompts_or_a_file_as_out_gets_one_clear_line(tmp_path, no_model):
    prompts = _prompts(tmp_path, "a red circle")
    res = runner.invoke(cli.app, ["dataset", str(tmp_path), "-o", str(tmp_path / "ds"), *FAST])
    _usage_error(res, "is a folder", "one prompt per line")
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(taken), *FAST])
    _usage_error(res, str(taken), "is a file")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(taken / "ds"), *FAST])
    _usage_error(res, "is a file")
    assert taken.read_text() == "mine"


def test_a_long_prompt_is_annotated_from_what_the_encoder_saw(tmp_path):
    """Words inside the first 77 CLIP tokens are annotated; a word only past them is skipped, with a
    warning, a line in the shard and a count in the summary (never 0 annotations without a word)."""
    out = tmp_path / "ds"
    prompt = "a red circle and a blue square " + " ".join(["very"] * 80) + " and a green triangle"
    prompts = _prompts(tmp_path, prompt)
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    annotated = {names[a["category_id"]] for a in data["annotations"]}
    assert annotated and annotated <= {"circle", "square"}, annotated
    record = json.loads((out / "shards" / "rank-0.jsonl").read_text().splitlines()[0])
    assert [s["word"] for s in record["skipped"]] == ["triangle"]
    assert "warning:" in res.output and "'triangle' not annotated" in res.output
    assert "1 word(s) skipped in 1 sample(s)" in res.output


def test_a_prompt_without_any_of_the_words_is_reported(tmp_path):
    out = tmp_path / "ds"
    prompts = _prompts(tmp_path, "a red circle", "a blue square")
    res = runner.invoke(cli.app, ["dataset", str(prompts), "-o", str(out), "--words", "circle", *FAST])
    assert res.exit_code == 0, res.output
    assert "prompt 2 ('a blue square') has none of the words circle" in res.output
    assert "1 sample(s) whose prompt has no word to annotate" in res.output

"""Corrupt or hostile experiment folders.

Every one is an :class:`daami2i.ExperimentError` (a ``Daami2iError``, exit code 3 on the command line)
whose one line names the file and what was wrong, raised before any tensor is read; loading never
leaves the folder, unpickles or runs code. Each case starts from a real saved experiment, copied
and then damaged.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import daami2i
from daami2i.cli import app
from daami2i.errors import Daami2iError, ExperimentError

runner = CliRunner()
TENSORS, MANIFEST = "attention.safetensors", "manifest.json"
Corrupt = Callable[[Path], None]


# -- saved experiments, traced once per session --------------------------------------------------------
@pytest.fixture(scope="session")
def saved(sd1: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet experiment: 2 images, 2 steps, per-step cross-attention, the standard CLIP tokenizer."""
    with daami2i.trace(sd1, cross_steps=True) as trc:
        sd1(["a red cat", "a blue dog"], num_inference_steps=2, height=64, width=64)
    return trc.to_experiment(tmp_path_factory.mktemp("saved") / "exp")


@pytest.fixture(scope="session")
def saved_joint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD3 experiment: two text streams, the T5 one's tokenizer saved under tokenizers/tokenizer_3."""
    from daami2i.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    with daami2i.trace(pipe) as trc:
        pipe("a red cat", num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0))
    folder = trc.to_experiment(tmp_path_factory.mktemp("joint") / "exp")
    assert (folder / "tokenizers" / "tokenizer_3" / "tokenizer.json").is_file()
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``folder`` at tmp_path/box/exp (tmp_path/box is "outside" the experiment)."""
    (tmp_path / "box").mkdir()
    return Path(shutil.copytree(folder, tmp_path / "box" / "exp", symlinks=True))


# -- ways to damage a folder ---------------------------------------------------------------------------
def manifest(edit: Callable[[dict[str, Any]], Any]) -> Corrupt:
    def corrupt(d: Path) -> None:
        m = json.loads((d / MANIFEST).read_text())
        edit(m)
        (d / MANIFEST).write_text(json.dumps(m))

    return corrupt


def generation(key: str, value: Any) -> Corrupt:
    return manifest(lambda m: m["generation"].__setitem__(key, value))


def without(key: str, where: str | None = None, index: int = 0) -> Corrupt:
    def edit(m: dict[str, Any]) -> None:
        obj = m if where is None else m[where]
        del (obj[index] if isinstance(obj, list) else obj)[key]

    return manifest(edit)


def entry(kind: str, key: str, value: Any, index: int = 0) -> Corrupt:
    return manifest(lambda m: m[kind][index].__setitem__(key, value))


def tensors(edit: Callable[[dict[str, torch.Tensor]], Any]) -> Corrupt:
    def corrupt(d: Path) -> None:
        t = load_file(str(d / TENSORS))
        edit(t)
        save_file(t, str(d / TENSORS), metadata={"format": "daami2i-experiment", "version": "1"})

    return corrupt


def first(t: dict[str, torch.Tensor], prefix: str) -> str:
    return sorted(k for k in t if k.startswith(prefix))[0]


def write(name: str, data: bytes | Callable[[bytes], bytes]) -> Corrupt:
    def corrupt(d: Path) -> None:
        file = d / name
        file.write_bytes(data(file.read_bytes()) if callable(data) else data)

    return corrupt


def replace_with_link(name: str) -> Corrupt:
    """``name`` becomes a link to an intact copy of itself outside the folder."""

    def corrupt(d: Path) -> None:
        outside = d.parent / ("outside-" + Path(name).name)
        shutil.move(str(d / name), outside)
        os.symlink(outside, d / name)

    return corrupt


def remove(name: str) -> Corrupt:
    def corrupt(d: Path) -> None:
        (shutil.rmtree if (d / name).is_dir() else os.unlink)(d / name)

    return corrupt


def make_folder(name: str) -> Corrupt:
    def corrupt(d: Path) -> None:
        os.unlink(d / name)
        (d / name).mkdir()

    return corrupt


def sparse(name: str, nbytes: int) -> Corrupt:
    def corrupt(d: Path) -> None:
        with open(d / name, "r+b") as f:
            f.truncate(nbytes)

    return corrupt


def secret_beside(edit: Corrupt) -> Corrupt:
    """Plant a valid PNG outside the folder (tmp/box/secret.png) before ``edit``."""

    def corrupt(d: Path) -> None:
        shutil.copy(d / "image_0.png", d.parent / "secret.png")
        edit(d)

    return corrupt


def image_in_subfolder_link(d: Path) -> None:
    """images[0] = "sub/image_0.png", where sub/ is a link to a folder outside."""
    outside = d.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(d / "image_0.png", outside / "image_0.png")
    os.symlink(outside, d / "sub")
    manifest(lambda m: m["images"].__setitem__(0, "sub/image_0.png"))(d)


def image_as_gif(d: Path) -> None:
    with Image.open(d / "image_0.png") as im:
        im.convert("P").save(d / "image_0.png", format="GIF")


def nan_in_self(t: dict[str, torch.Tensor]) -> None:
    t["self/1"][0, 0, 0] = float("nan")


def tokens_short(t: dict[str, torch.Tensor]) -> None:
    k = first(t, "cross/")
    t[k] = t[k][..., :70].contiguous()


GARBAGE = bytes(range(256)) * 64
HEADER_BOMB = (2**62).to_bytes(8, "little") + b'{"x": 1}'
GENERATION_KEYS = [
    "index",
    "grid_size",
    "prompts",
    "latent_size",
    "image_size",
    "n_images",
    "cfg",
    "halves",
    "steps_run",
    "steps_captured",
    "image_prompts",
    "image_tokens",
]

# name -> (damage, what the one-line error must say)
CASES: dict[str, tuple[Corrupt, str]] = {
    # the tensors file
    "tensors-truncated": (
        write(TENSORS, lambda b: b[: len(b) // 2]),
        r"attention\.safetensors is not a readable safetensors",
    ),
    "tensors-truncated-header": (
        write(TENSORS, lambda b: b[:100]),
        r"attention\.safetensors is not a readable safetensors",
    ),
    "tensors-garbage": (write(TENSORS, GARBAGE), r"attention\.safetensors is not a readable safetensors"),
    "tensors-empty": (write(TENSORS, b""), r"attention\.safetensors is not a readable safetensors"),
    "tensors-header-bomb": (write(TENSORS, HEADER_BOMB), r"attention\.safetensors is not a readable safetensors"),
    "tensors-missing": (remove(TENSORS), r"attention\.safetensors is missing"),
    "tensors-a-folder": (make_folder(TENSORS), r"attention\.safetensors is not a regular file"),
    "tensors-link-outside": (replace_with_link(TENSORS), r"attention\.safetensors.*outside the experiment folder"),
    "tensor-self-missing": (tensors(lambda t: t.pop("self/1")), r"attention\.safetensors lacks the tensor 'self/1'"),
    "tensor-cross-missing": (tensors(lambda t: t.pop(first(t, "cross/"))), r"lacks the tensor 'cross/"),
    "tensor-steps-missing": (tensors(lambda t: t.pop(first(t, "cross_steps/"))), r"lacks the tensor 'cross_steps/"),
    "tensor-self-shape": (
        tensors(lambda t: t.__setitem__("self/1", t["self/1"][:, :, :32].contiguous())),
        r"tensor 'self/1' must have shape \[2, 64, 64\] .*got \[2, 64, 32\]",
    ),
    "tensor-self-rank": (
        tensors(lambda t: t.__setitem__("self/1", t["self/1"].flatten())),
        r"tensor 'self/1' must have 3 dimensions, got shape \[8192\]",
    ),
    "tensor-self-f16": (
        tensors(lambda t: t.__setitem__("self/1", t["self/1"].half())),
        r"tensor 'self/1' must be float32 \(F32\), got F16",
    ),
    "tensor-cross-int": (
        tensors(lambda t: t.__setitem__(first(t, "cross/"), t[first(t, "cross/")].long())),
        r"tensor 'cross/.*' must be float32 \(F32\), got I64",
    ),
    "tensor-fewer-images": (
        tensors(lambda t: t.update({k: v[:1].contiguous() for k, v in t.items() if not k.startswith("cross_steps")})),
        r"must have shape \[2, .*n_images 2",
    ),
    "tensor-tokens-differ": (
        tensors(tokens_short),
        r"must have as many text tokens as 'cross/.*' \((77|70)\), got (70|77)",
    ),
    "tensor-steps-count": (
        tensors(lambda t: t.update({k: v[:1].contiguous() for k, v in t.items() if k.startswith("cross_steps")})),
        r"tensor 'cross_steps/.*' must have shape \[2, 2, .*2 captured steps.*got \[1, 2,",
    ),
    "tensor-steps-unlisted": (
        manifest(lambda m: [e.__setitem__("per_step", False) for e in m["cross_attention"]]),
        r"holds 'cross_steps/.*', but manifest\.json says per_step is false",
    ),
    "tensor-nan": (tensors(nan_in_self), r"tensor 'self/1' must hold finite numbers, got NaN or infinity"),
    # the manifest
    "manifest-binary": (write(MANIFEST, GARBAGE), r"manifest\.json: the manifest must be UTF-8 JSON text, got binary"),
    "manifest-png": (
        write(MANIFEST, b"\x89PNG\r\n\x1a\n\xff\xfe\x00"),
        r"manifest\.json: the manifest must be UTF-8 JSON text, got binary",
    ),
    "manifest-truncated": (
        write(MANIFEST, lambda b: b[: len(b) // 2]),
        r"manifest\.json: the manifest must be valid JSON",
    ),
    "manifest-empty": (write(MANIFEST, b""), r"manifest\.json: the manifest must be valid JSON"),
    "manifest-deep": (write(MANIFEST, b"[" * 200_000), r"manifest\.json: the manifest must be valid JSON"),
    "manifest-list": (
        write(MANIFEST, b'[{"format": "daami2i-experiment"}]'),
        r"manifest\.json is not a daami2i experiment manifest: expected a JSON object .*got a JSON list",
    ),
    "manifest-string": (write(MANIFEST, b'"daami2i-experiment"'), r"expected a JSON object .*got a JSON str"),
    "manifest-a-folder": (make_folder(MANIFEST), r"manifest\.json: the manifest must be a regular file"),
    "manifest-link-outside": (replace_with_link(MANIFEST), r"manifest\.json.*outside the experiment folder"),
    "manifest-huge": (sparse(MANIFEST, 65 * 2**20), r"manifest\.json: the manifest must be at most 64 MiB"),
    "format-wrong": (
        manifest(lambda m: m.__setitem__("format", "other")),
        r"expected format 'daami2i-experiment', got 'other'",
    ),
    "format-missing": (without("format"), r"expected format 'daami2i-experiment', got None"),
    "version-2": (
        manifest(lambda m: m.__setitem__("version", 2)),
        r"experiment format version 2, this daami2i reads version 1",
    ),
    "version-string": (
        manifest(lambda m: m.__setitem__("version", "1")),
        r"experiment format version '1', this daami2i reads",
    ),
    "version-float": (
        manifest(lambda m: m.__setitem__("version", 1.0)),
        r"experiment format version 1\.0, this daami2i reads",
    ),
    "version-missing": (without("version"), r"experiment format version None"),
    **{
        f"manifest-without-{key}": (without(key), rf"manifest\.json: the manifest lacks the required key '{key}'")
        for key in ("generation", "self_attention", "cross_attention")
    },
    **{
        f"generation-without-{key}": (
            without(key, "generation"),
            rf"manifest\.json: generation lacks the required key '{key}'",
        )
        for key in GENERATION_KEYS
    },
    **{
        f"self-entry-without-{key}": (
            without(key, "self_attention"),
            rf"self_attention\[0\] lacks the required key '{key}'",
        )
        for key in ("factor", "size", "layers")
    },
    **{
        f"cross-entry-without-{key}": (
            without(key, "cross_attention"),
            rf"cross_attention\[0\] lacks the required key '{key}'",
        )
        for key in ("layer", "factor", "size")
    },
    "generation-a-list": (
        manifest(lambda m: m.__setitem__("generation", [])),
        r"generation must be a JSON object, got \[\]",
    ),
    "self-attention-not-list": (
        manifest(lambda m: m.__setitem__("self_attention", {})),
        r"self_attention must be a JSON list",
    ),
    "self-entry-not-object": (
        manifest(lambda m: m["self_attention"].__setitem__(0, 1)),
        r"self_attention\[0\] must be a JSON object",
    ),
    "no-stores": (manifest(lambda m: m.update(self_attention=[], cross_attention=[])), r"at least one captured store"),
    "info-not-object": (manifest(lambda m: m.__setitem__("info", ["seed"])), r"info must be a JSON object"),
    "nbytes-negative": (
        manifest(lambda m: m["nbytes"].__setitem__("self", -(2**40))),
        r"nbytes\.self must be an integer >= 0",
    ),
    "nbytes-not-number": (
        manifest(lambda m: m["nbytes"].__setitem__("self", "lots")),
        r"nbytes\.self must be an integer",
    ),
    "halves-unknown": (
        generation("halves", "most"),
        r"generation\.halves must be one of 'cond', 'uncond', 'both', got 'most'",
    ),
    "cfg-not-bool": (generation("cfg", "yes"), r"generation\.cfg must be true or false"),
    "steps-not-list": (generation("steps_captured", 3), r"generation\.steps_captured must be a JSON list"),
    "steps-negative": (
        generation("steps_captured", [0, -1]),
        r"generation\.steps_captured\[1\] must be an integer >= 0",
    ),
    "steps-repeated": (generation("steps_captured", [1, 1]), r"generation\.steps_captured must be distinct"),
    "image-prompts-length": (
        generation("image_prompts", ["a red cat"]),
        r"generation\.image_prompts must be a JSON list of 2 entries",
    ),
    "image-prompts-numbers": (generation("image_prompts", [1, 2]), r"generation\.image_prompts\[0\] must be a string"),
    "image-tokens-numbers": (
        generation("image_tokens", [[1], [2]]),
        r"generation\.image_tokens\[0\] must be a list of token strings",
    ),
    "direction-unknown": (
        manifest(lambda m: m["generation"]["config"].__setitem__("direction", "up")),
        r"generation\.config\.direction must be one of",
    ),
    # sizes: validated against the tensors' shapes
    "grid-huge": (
        generation("grid_size", [100000, 100000]),
        r"generation\.grid_size and the store sizes must agree.*"
        r"got grid_size \[100000, 100000\] with self/1 8x8 at factor 1",
    ),
    "grid-too-small": (generation("grid_size", [4, 4]), r"generation\.grid_size and the store sizes must agree"),
    "grid-transposed": (generation("grid_size", [8, 16]), r"generation\.grid_size and the store sizes must agree"),
    "grid-negative": (
        generation("grid_size", [-8, 8]),
        r"generation\.grid_size must be \[height, width\], two positive integers, got \[-8, 8\]",
    ),
    "grid-zero": (
        generation("grid_size", [0, 0]),
        r"generation\.grid_size must be \[height, width\], two positive integers",
    ),
    "grid-fraction": (
        generation("grid_size", [8.5, 8]),
        r"generation\.grid_size must be \[height, width\], two positive integers, got \[8\.5, 8\]",
    ),
    "grid-float": (
        generation("grid_size", [8.0, 8.0]),
        r"generation\.grid_size must be \[height, width\], two positive integers",
    ),
    "grid-text": (generation("grid_size", "8x8"), r"generation\.grid_size must be \[height, width\]"),
    "grid-one-number": (generation("grid_size", [8]), r"generation\.grid_size must be \[height, width\]"),
    "grid-bools": (generation("grid_size", [True, True]), r"generation\.grid_size must be \[height, width\]"),
    "grid-nan": (generation("grid_size", [float("nan"), 8]), r"generation\.grid_size must be \[height, width\]"),
    "grid-null": (generation("grid_size", None), r"generation\.grid_size must be \[height, width\]"),
    "image-size-huge-float": (
        generation("image_size", [1e9, 1e9]),
        r"generation\.image_size must be \[height, width\], two positive integers",
    ),
    "image-size-huge": (
        generation("image_size", [10**9, 10**9]),
        r"generation\.image_size must be between the latent 8x8 and 32 times it",
    ),
    "image-size-negative": (
        generation("image_size", [-64, 64]),
        r"generation\.image_size must be \[height, width\], two positive integers",
    ),
    "image-size-below-latent": (
        generation("image_size", [4, 4]),
        r"generation\.image_size must be between the latent 8x8",
    ),
    "latent-size-huge": (
        generation("latent_size", [100000, 100000]),
        r"generation\.latent_size must be between the grid 8x8 and 8 times it",
    ),
    "latent-size-negative": (generation("latent_size", [-8, -8]), r"generation\.latent_size must be \[height, width\]"),
    "n-images-zero": (generation("n_images", 0), r"generation\.n_images must be an integer >= 1, got 0"),
    "n-images-negative": (generation("n_images", -3), r"generation\.n_images must be an integer >= 1, got -3"),
    "n-images-text": (generation("n_images", "2"), r"generation\.n_images must be an integer >= 1, got '2'"),
    "n-images-huge": (
        generation("n_images", 10**12),
        r"generation\.image_prompts must be a JSON list of 1000000000000 entries",
    ),
    "n-images-vs-tensors": (
        manifest(
            lambda m: (
                m["generation"].update(
                    n_images=1,
                    image_prompts=m["generation"]["image_prompts"][:1],
                    image_tokens=m["generation"]["image_tokens"][:1],
                ),
                m.__setitem__("images", m["images"][:1]),
            )
        ),
        r"tensor 'self/1' must have shape \[1, 64, 64\] \(n_images 1, size 8x8 in manifest\.json\), got \[2, 64, 64\]",
    ),
    "self-size-huge": (
        entry("self_attention", "size", [100000, 100000]),
        r"tensor 'self/1' must have shape \[2, 10000000000, 10000000000\]",
    ),
    "self-size-reshaped": (
        entry("self_attention", "size", [4, 16]),
        r"store sizes must agree.*got grid_size \[8, 8\] with self/1 4x16 at factor 1",
    ),
    "self-size-negative": (
        entry("self_attention", "size", [-8, -8]),
        r"self_attention\[0\]\.size must be \[height, width\], two positive integers",
    ),
    "self-factor-three": (
        entry("self_attention", "factor", 3),
        r"self_attention factor must be a power of two from 1 to 64, got 3",
    ),
    "self-factor-zero": (
        entry("self_attention", "factor", 0),
        r"self_attention\[0\]\.factor must be an integer in \[1, 64\], got 0",
    ),
    "self-factor-text": (
        entry("self_attention", "factor", "1"),
        r"self_attention\[0\]\.factor must be an integer in \[1, 64\], got '1'",
    ),
    "self-factor-huge": (
        entry("self_attention", "factor", 2**40),
        r"self_attention\[0\]\.factor must be an integer in \[1, 64\]",
    ),
    "cross-size-wrong": (
        entry("cross_attention", "size", [16, 16]),
        r"tensor 'cross/.*' must have shape \[2, \d+, 256, 77\]",
    ),
    "cross-factor-wrong": (
        entry("cross_attention", "factor", 4),
        r"generation\.grid_size and the store sizes must agree",
    ),
    "cross-step-tokens-huge": (
        entry("cross_attention", "step_tokens", 1000),
        r"step_tokens of '.*' must be in \[1, 77\], got 1000",
    ),
    "cross-layers-repeated": (
        manifest(lambda m: m["cross_attention"].append(dict(m["cross_attention"][0]))),
        r"the layers of cross_attention must be distinct",
    ),
    # paths named by the manifest
    "image-parent": (
        secret_beside(manifest(lambda m: m["images"].__setitem__(0, "../secret.png"))),
        r"images\[0\] must be a relative path inside the experiment folder \(not absolute, no '\.\.'\), "
        r"got '\.\./secret\.png'",
    ),
    "image-etc-passwd": (
        manifest(lambda m: m["images"].__setitem__(0, "/etc/passwd")),
        r"images\[0\] must be a relative path inside the experiment folder .*got '/etc/passwd'",
    ),
    "image-absolute-inside": (
        lambda d: manifest(lambda m: m["images"].__setitem__(0, str(d / "image_0.png")))(d),
        r"images\[0\] must be a relative path inside the experiment folder",
    ),
    "image-link-outside": (
        replace_with_link("image_0.png"),
        r"images\[0\] 'image_0\.png' resolves to .*outside the experiment folder",
    ),
    "image-folder-link-outside": (
        image_in_subfolder_link,
        r"images\[0\] 'sub/image_0\.png' resolves to .*elsewhere.*outside the experiment folder",
    ),
    "image-not-text": (
        manifest(lambda m: m["images"].__setitem__(0, 5)),
        r"images\[0\] must be a file name inside the experiment folder, got 5",
    ),
    "image-nul": (
        manifest(lambda m: m["images"].__setitem__(0, "image_0.png\x00.txt")),
        r"images\[0\] must be a file name inside the experiment folder",
    ),
    "images-count": (
        manifest(lambda m: m.__setitem__("images", m["images"][:1])),
        r"images must be a list of 2 file names \(one per image\) or empty",
    ),
    "images-not-list": (manifest(lambda m: m.__setitem__("images", "image_0.png")), r"images must be a JSON list"),
    "image-missing": (
        remove("image_1.png"),
        r"image_1\.png is missing or not a file \(images\[1\] of manifest\.json\)",
    ),
    "image-truncated": (write("image_0.png", lambda b: b[: len(b) // 2]), r"image_0\.png must be a complete PNG image"),
    "image-garbage": (write("image_0.png", GARBAGE), r"image_0\.png must be a complete PNG image"),
    "image-a-gif": (image_as_gif, r"image_0\.png must be a complete PNG image"),
    "image-a-folder": (make_folder("image_0.png"), r"image_0\.png is missing"),
    "tokenizer-kind-unknown": (
        manifest(lambda m: m.__setitem__("tokenizer", "pickle")),
        r"manifest\.json: tokenizer must be one of 'clip-bpe-49408', 'saved' or null, got 'pickle'",
    ),
    "tokenizer-saved-missing": (
        manifest(lambda m: m.__setitem__("tokenizer", "saved")),
        r"exp/tokenizer is missing: manifest\.json says the tokenizer was saved there",
    ),
    "stream-tokenizers-outside": (
        manifest(lambda m: m.__setitem__("stream_tokenizers", {"../../x": "saved"})),
        r"stream_tokenizers keys must be pipeline attribute names .*got '\.\./\.\./x'",
    ),
    "stream-tokenizers-absolute": (
        manifest(lambda m: m.__setitem__("stream_tokenizers", {"/etc": "saved"})),
        r"stream_tokenizers keys must be pipeline attribute names",
    ),
    "stream-tokenizers-not-object": (
        manifest(lambda m: m.__setitem__("stream_tokenizers", ["tokenizer"])),
        r"stream_tokenizers must be a JSON object",
    ),
}


def tokenizer_folder_link(d: Path) -> None:
    outside = d.parent / "tok"
    shutil.move(str(d / "tokenizers" / "tokenizer_3"), outside)
    os.symlink(outside, d / "tokenizers" / "tokenizer_3")


def tokenizer_config(edit: Callable[[dict[str, Any]], Any]) -> Corrupt:
    def corrupt(d: Path) -> None:
        file = d / "tokenizers" / "tokenizer_3" / "tokenizer_config.json"
        config = json.loads(file.read_text())
        edit(config)
        file.write_text(json.dumps(config))

    return corrupt


def tokenizer_outside(d: Path) -> None:
    """The issue's case: a saved tokenizer planted two levels up, named by a stream_tokenizers key."""
    shutil.copytree(d / "tokenizers" / "tokenizer_3", d.parent.parent / "x")
    manifest(lambda m: m["stream_tokenizers"].__setitem__("../../x", "saved"))(d)


def stream(key: str, value: Any, index: int = 1) -> Corrupt:
    return manifest(lambda m: m["generation"]["streams"][index].__setitem__(key, value))


TOK = "tokenizers/tokenizer_3"
JOINT_CASES: dict[str, tuple[Corrupt, str]] = {
    "tokenizer-garbage": (
        write(f"{TOK}/tokenizer.json", GARBAGE[:4000]),
        r"tokenizer_3: the saved tokenizer cannot be loaded",
    ),
    "tokenizer-truncated": (
        write(f"{TOK}/tokenizer.json", lambda b: b[: len(b) // 2]),
        r"tokenizer_3: the saved tokenizer cannot be loaded",
    ),
    "tokenizer-json-missing": (
        remove(f"{TOK}/tokenizer.json"),
        r"tokenizer_3: the saved tokenizer must split image 0's prompt 'a red cat' into the saved tokens",
    ),
    "tokenizer-config-binary": (
        write(f"{TOK}/tokenizer_config.json", GARBAGE),
        r"tokenizer_config\.json: the tokenizer config must be UTF-8 JSON text",
    ),
    "tokenizer-config-list": (
        write(f"{TOK}/tokenizer_config.json", b"[]"),
        r"tokenizer_config\.json must be a JSON object, got a JSON list",
    ),
    "tokenizer-config-remote-code": (
        tokenizer_config(lambda c: c.__setitem__("auto_map", {"AutoTokenizer": ["evil.Tok", None]})),
        r"asks for remote tokenizer code \(auto_map\)",
    ),
    "tokenizer-config-names-a-file": (
        tokenizer_config(lambda c: c.__setitem__("vocab_file", "/etc/passwd")),
        r"must not name its own files, got \['vocab_file'\]",
    ),
    "tokenizer-file-link-outside": (
        replace_with_link(f"{TOK}/tokenizer.json"),
        r"a tokenizer file 'tokenizers/tokenizer_3/tokenizer\.json' resolves to .*outside",
    ),
    "tokenizer-folder-link-outside": (
        tokenizer_folder_link,
        r"the tokenizer folder 'tokenizers/tokenizer_3' resolves to .*outside",
    ),
    "tokenizer-folder-missing": (
        remove(TOK),
        r"tokenizers/tokenizer_3 is missing: manifest\.json says the tokenizer was saved there",
    ),
    "tokenizer-outside-by-name": (
        tokenizer_outside,
        r"stream_tokenizers keys must be pipeline attribute names .*got '\.\./\.\./x'",
    ),
    "stream-rows-beyond": (
        stream("stop_row", 1000),
        r"generation\.streams\[1\]\.stop_row must be an integer in \[\d+, \d+\], got 1000",
    ),
    "stream-rows-reversed": (
        stream("first_row", 9, 0),
        r"generation\.streams\[0\]\.stop_row must be an integer in \[9,",
    ),
    "stream-tokenizer-path": (
        stream("tokenizer", "../x"),
        r"generation\.streams\[1\]\.tokenizer must be a pipeline attribute name",
    ),
    "stream-tokens-count": (stream("tokens", []), r"generation\.streams\[1\]\.tokens must be a JSON list of 1 entries"),
    "stream-not-object": (
        manifest(lambda m: m["generation"]["streams"].__setitem__(0, "clip")),
        r"generation\.streams\[0\] must be a JSON object",
    ),
}


# -- the checks ------------------------------------------------------------------------------------------
@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors loading reads (the header alone is free): none before the folder is checked."""
    reads: list[str] = []
    real = safetensors.safe_open

    class Watched:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._handle = real(*args, **kwargs)

        def get_tensor(self, key: str) -> torch.Tensor:
            reads.append(key)
            return self._handle.get_tensor(key)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

    monkeypatch.setattr(safetensors, "safe_open", Watched)
    return reads


def assert_refused(folder: Path, message: str, reads: list[str], may_read: bool = False) -> None:
    with pytest.raises(ExperimentError, match=message) as err:
        daami2i.load_experiment(folder)
    assert isinstance(err.value, Daami2iError) and isinstance(err.value, OSError)
    assert "\n" not in str(err.value) and str(folder.resolve()) in str(err.value)  # names the file
    if not may_read:
        assert reads == [], f"tensors {reads} were read before the damage was found"
    for args in (["info", str(folder)], ["show", str(folder), "--word", "cat"]):
        res = runner.invoke(app, args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 3, res.output
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
        assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_damaged_folder_is_an_experiment_error(name: str, saved: Path, tmp_path: Path, tensor_reads: list[str]) -> None:
    corrupt, message = CASES[name]
    folder = copy_of(saved, tmp_path)
    corrupt(folder)
    assert_refused(folder, message, tensor_reads, may_read=name == "tensor-nan")


@pytest.mark.parametrize("name", list(JOINT_CASES))
def test_damaged_joint_folder_is_an_experiment_error(
    name: str, saved_joint: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    corrupt, message = JOINT_CASES[name]
    folder = copy_of(saved_joint, tmp_path)
    corrupt(folder)
    assert_refused(folder, message, tensor_reads)


# -- what still loads --------------------------------------------------------------------------------------
def test_intact_copies_load(saved: Path, saved_joint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks refuse nothing sound, and loading never unpickles (pickle and torch.load are off)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loading an experiment unpickled something")

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, refuse)
    for source, word in ((saved, "cat"), (saved_joint, "red")):
        exp = daami2i.load_experiment(source)
        assert exp.compute_global_heat_map().compute_word_heat_map(word).value.shape == (8, 8)
        assert len(exp.images) == exp.generation.n_images
    # links that stay inside the folder, a folder reached through a link, the manifest's own path
    folder = copy_of(saved, tmp_path)
    os.rename(folder / "image_1.png", folder / "second.png")
    os.symlink("second.png", folder / "image_1.png")
    os.symlink(folder, tmp_path / "link")
    for path in (folder, tmp_path / "link", folder / MANIFEST):
        exp = daami2i.load_experiment(path)
        assert [im.size for im in exp.images] == [(64, 64), (64, 64)]


def test_store_sizes_come_from_the_tensors(saved: Path, tmp_path: Path) -> None:
    """The manifest's nbytes is a record, not a size to trust: info prints what the tensors hold."""
    folder = copy_of(saved, tmp_path)
    real = daami2i.load_experiment(folder).manifest["nbytes"]
    manifest(lambda m: m["nbytes"].update(self=10**15, cross=3))(folder)
    assert daami2i.load_experiment(folder).manifest["nbytes"] == real
    res = runner.invoke(app, ["info", str(folder)])
    assert res.exit_code == 0, res.output
    assert f"self {real['self'] / 2**20:.1f} MiB" in res.output


def test_the_folder_generate_printed(tmp_path: Path) -> None:
    """`daami2i generate -o OUT` puts the experiment in OUT/experiment; info, show and the API take OUT."""
    out = tmp_path / "run"
    args = ["generate", "a red cat", "-m", "tiny", "--steps", "1", "--height", "64", "--width", "64", "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert daami2i.load_experiment(out).path == out / "experiment"
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "grid 8x8" in res.output, res.output
    res = runner.invoke(app, ["show", str(out), "--word", "cat", "-o", str(tmp_path / "cat.png")])
    assert res.exit_code == 0 and (tmp_path / "cat.png").is_file(), res.output
    # without -o the picture lands beside the experiment it shows, not in OUT
    res = runner.invoke(app, ["show", str(out), "--word", "cat"])
    assert res.exit_code == 0 and (out / "experiment" / "show-word-cat.png").is_file(), res.output
    assert str(out / "experiment" / "show-word-cat.png") in res.output
    with pytest.raises(ExperimentError, match=r"manifest\.json is missing .*OUT/experiment"):
        daami2i.load_experiment(out / "words")


def test_images_damaged_after_loading(saved: Path, tmp_path: Path) -> None:
    """Images are read when asked for: a file that breaks later is still an ExperimentError."""
    folder = copy_of(saved, tmp_path)
    exp = daami2i.load_experiment(folder)
    (folder / "image_1.png").write_bytes(GARBAGE)
    with pytest.raises(ExperimentError, match=r"image_1\.png cannot be read as a PNG image"):
        _ = exp.images


def test_error_family() -> None:
    """ExperimentError lives in daami2i.errors and is still importable from where it was."""
    from daami2i.storage.experiment import ExperimentError as FromStorage

    assert FromStorage is ExperimentError is daami2i.ExperimentError
    assert issubclass(ExperimentError, Daami2iError) and issubclass(ExperimentError, OSError)


def test_saving_needs_one_image_per_generated_image(sd2: Any, tmp_path: Path) -> None:
    """Saving refuses what loading would refuse: a number of images other than the generation's."""
    with daami2i.trace(sd2) as trc:
        out = sd2(["a cat", "a dog"], num_inference_steps=1, height=64, width=64)
    with pytest.raises(ExperimentError, match=r"one image per generated image \(2\), got 1"):
        trc.to_experiment(tmp_path / "exp", images=out.images[:1])
    assert not (tmp_path / "exp").exists()
    assert daami2i.load_experiment(trc.to_experiment(tmp_path / "exp", images=[])).images == []

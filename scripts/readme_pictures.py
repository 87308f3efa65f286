"""Regenerate the README's pictures from the commands shown beside them, or check that they still match.

    python scripts/readme_pictures.py              # render and rewrite docs/images/*.png
    python scripts/readme_pictures.py --check      # render into a temporary folder, compare, exit 1 on drift
    make pictures / make pictures-check            # the same, in the project's environment

Each picture is listed below with the commands that make it, exactly as README.md shows them; the
check also fails when one of those commands is no longer in README.md, so the list and the README
cannot drift apart either. The commands run in a fresh folder, on the CPU (``CUDA_VISIBLE_DEVICES``
empty), offline, one thread, as separate processes: what a user who types them gets.

Rendered and committed pictures are compared by the mean absolute difference of their RGB values
(0-255) over all pixels. Floating-point results differ in their last bits between CPUs (SIMD
kernels, thread counts), which moves a few pixels by a level: measured at most 0.0005 between
torch's default, AVX2 and AVX-512 CPU kernels and 1 or 2 threads (2026-12-01, torch 2.13). The
word grid of the previous shapes model differs from today's by 10.7, and a black rim around the
box outline (a 2-pixel line) moved the box picture by 1.5. ``TOLERANCE`` = 0.5 leaves a
thousandfold margin for float noise and still catches a new model or a changed plot.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.5  # mean absolute RGB difference, in 0-255 levels, see the module docstring


@dataclass(frozen=True)
class Picture:
    """A README picture: the commands that make it (run in order in one folder) and the file they write."""

    image: str  # path of the committed picture, relative to the repository
    commands: tuple[str, ...]  # shell syntax; 'daami2i ...' or 'python <script in the repository> ...'
    output: str  # the file the commands write, relative to the folder they ran in
    shown: tuple[str, ...]  # text README.md must contain: the commands as the README shows them


GENERATE = 'daami2i generate "a red circle and a blue square" -o outputs/shapes'
SHOW_BOX = "daami2i show outputs/shapes/experiment --box 8,0,15,15 --guide-word circle"

PICTURES: tuple[Picture, ...] = (
    Picture(
        "docs/images/quickstart.png",
        ("python examples/quickstart.py",),  # what `make demo` runs
        "outputs/quickstart.png",
        ("make demo", "runs examples/quickstart.py", "outputs/quickstart.png", "docs/images/quickstart.png"),
    ),
    Picture(
        "docs/images/cli-words.png",
        (GENERATE,),
        "outputs/shapes/words.png",
        (f"$ {GENERATE}", "docs/images/cli-words.png"),
    ),
    Picture(
        "docs/images/cli-show-box.png",
        (GENERATE, SHOW_BOX),
        "outputs/shapes/experiment/show-box-8-0-15-15-guided-circle.png",
        (f"$ {SHOW_BOX}", "docs/images/cli-show-box.png"),
    ),
)


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "daami2i":
        return [sys.executable, "-m", "daami2i", *words[1:]]
    if words[0] == "python":
        return [sys.executable, str(ROOT / words[1]), *words[2:]]
    raise ValueError(f"a README picture command starts with 'daami2i' or 'python', got {command!r}")


def environment() -> dict[str, str]:
    """The environment the commands run in: offline, CPU only, one thread."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def _run(command: str, folder: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(_argv(command), cwd=folder, env=environment(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(
    folder: Path, pictures: tuple[Picture, ...] = PICTURES, stderr: dict[str, str] | None = None
) -> dict[str, Path]:
    """Run every picture's commands in ``folder``; the rendered file per picture.

    Pictures whose commands start alike share those runs (each command runs once); the independent
    chains (the quickstart, the CLI session) run side by side. ``stderr``, when given, receives what
    each command wrote on stderr.
    """
    chains: dict[str, list[str]] = {}
    for pic in pictures:
        chain = chains.setdefault(pic.commands[0], [])
        chain += [c for c in pic.commands if c not in chain]

    def run_chain(commands: list[str]) -> None:
        for command in commands:
            proc = _run(command, folder)
            if stderr is not None:
                stderr[command] = proc.stderr

    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        for future in [pool.submit(run_chain, chain) for chain in chains.values()]:
            future.result()
    rendered: dict[str, Path] = {}
    for pic in pictures:
        out = folder / pic.output
        if not out.is_file():
            raise RuntimeError(f"{pic.commands[-1]!r} did not write {pic.output}")
        rendered[pic.image] = out
    return rendered


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.float64)


def difference(a: Path, b: Path) -> float:
    """Mean absolute RGB difference (0-255) of two pictures; infinite when their sizes differ."""
    x, y = _rgb(a), _rgb(b)
    if x.shape != y.shape:
        return float("inf")
    return float(np.abs(x - y).mean())


def missing_from_readme(readme: str, pictures: tuple[Picture, ...] = PICTURES) -> list[str]:
    """The ``shown`` texts of ``pictures`` that README.md no longer contains."""
    return [text for pic in pictures for text in pic.shown if text not in readme]


def check(pictures: tuple[Picture, ...] = PICTURES, tolerance: float = TOLERANCE) -> list[str]:
    """Problems found (empty when the README's pictures match its commands)."""
    problems = [f"README.md no longer shows {t!r}" for t in missing_from_readme((ROOT / "README.md").read_text())]
    with tempfile.TemporaryDirectory() as tmp:
        for image, out in render(Path(tmp), pictures).items():
            d = difference(out, ROOT / image)
            if d > tolerance:
                problems.append(
                    f"{image} differs from what its README commands draw now (mean |RGB difference| {d:.2f} > "
                    f"{tolerance}): run `make pictures` and look at the result"
                )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed pictures, write nothing")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(f"{len(PICTURES)} README pictures match their commands (tolerance {TOLERANCE})")
        return
    missing = missing_from_readme((ROOT / "README.md").read_text())
    if missing:
        raise SystemExit(f"README.md no longer shows {missing}: update PICTURES in {Path(__file__).name}")
    with tempfile.TemporaryDirectory() as tmp:
        for image, out in render(Path(tmp)).items():
            before = ROOT / image
            d = difference(out, before) if before.is_file() else float("inf")
            shutil.copyfile(out, before)
            print(f"wrote {image} (mean |RGB difference| to the previous picture {d:.2f})")


if __name__ == "__main__":
    main()

"""The README's pictures are what the commands shown beside them draw now (``scripts/readme_pictures.py``,
``make pictures`` to redraw them), and those commands print no noise the user cannot act on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_pictures", ROOT / "scripts" / "readme_pictures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pictures = _load_script()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, str]]:
    """Every README picture drawn by its commands in a fresh folder, and what each command wrote on stderr."""
    stderr: dict[str, str] = {}
    return pictures.render(tmp_path_factory.mktemp("pictures"), stderr=stderr), stderr


def test_readme_still_shows_the_commands() -> None:
    assert pictures.missing_from_readme((ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize("pic", pictures.PICTURES, ids=lambda p: Path(p.image).name)
def test_picture_matches_its_commands(rendered: tuple[dict[str, Path], dict[str, str]], pic: object) -> None:
    files, _ = rendered
    image = pic.image  # type: ignore[attr-defined]
    d = pictures.difference(files[image], ROOT / image)
    assert d <= pictures.TOLERANCE, (
        f"{image} no longer matches what {pic.commands[-1]!r} draws (mean |RGB difference| {d:.3f} > "  # type: ignore[attr-defined]
        f"{pictures.TOLERANCE}): run `make pictures`, look at the new picture and commit it"
    )


def test_difference_sees_a_changed_picture(rendered: tuple[dict[str, Path], dict[str, str]], tmp_path: Path) -> None:
    """The measure is not blind: the quickstart picture mirrored is far beyond the tolerance."""
    from PIL import Image, ImageOps

    files, _ = rendered
    original = files["docs/images/quickstart.png"]
    ImageOps.mirror(Image.open(original).convert("RGB")).save(tmp_path / "mirrored.png")
    assert pictures.difference(original, original) == 0
    assert pictures.difference(original, tmp_path / "mirrored.png") > 10 * pictures.TOLERANCE


def test_quickstart_prints_no_noise(rendered: tuple[dict[str, Path], dict[str, str]]) -> None:
    """transformers said "`CLIPImageProcessor` requires torchvision" on every run, and diffusers drew
    per-component loading bars; the quickstart's stderr is now empty."""
    _, stderr = rendered
    assert stderr["python examples/quickstart.py"].strip() == ""

"""Procedural scenes: a light background with one to three coloured shapes, a caption, exact masks.

Every scene is a pure function of its seed. Objects in a scene have distinct colours and distinct
shapes (so each word names one object) and never overlap (a margin of ``gap`` pixels apart).
Drawing is aliasing-free (PIL without antialiasing), so a mask is exactly the object's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 195, 25),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object: its shape word, colour word, and box (x0, y0, x1, y1) in pixels (x1, y1 exclusive)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """An image (PIL, RGB, 64x64), its caption, its objects and one exact mask per object."""

    image: Image.Image
    caption: str
    objects: list[ShapeObject]
    masks: list[np.ndarray] = field(default_factory=list)  # each (64, 64) bool

    def mask_of(self, word: str) -> np.ndarray:
        """The mask of the object a colour or shape word names."""
        for obj, mask in zip(self.objects, self.masks, strict=True):
            if word in (obj.shape, obj.color):
                return mask
        raise KeyError(f"{word!r} names no object of {self.caption!r}")


def caption_of(objects: list[ShapeObject]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a red circle, a blue square and a green triangle'."""
    phrases = [f"a {o.phrase}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: int | tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # upright triangle
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def make_scene(seed: int, n_objects: int | None = None, gap: int = 3) -> Scene:
    """The scene of ``seed`` (1-3 objects unless ``n_objects`` is given)."""
    rng = np.random.default_rng(seed)
    n = int(n_objects) if n_objects is not None else int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    shapes = list(rng.permutation(SHAPES))[:n]
    colors = list(rng.permutation(list(COLORS)))[:n]
    objects: list[ShapeObject] = []
    for shape, color in zip(shapes, colors, strict=True):
        for _ in range(200):
            side = int(rng.integers(14, 27))
            x0 = int(rng.integers(1, SIZE - side))
            y0 = int(rng.integers(1, SIZE - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] >= o.box[2] + gap
                or o.box[0] >= box[2] + gap
                or box[1] >= o.box[3] + gap
                or o.box[1] >= box[3] + gap
                for o in objects
            ):
                objects.append(ShapeObject(str(shape), str(color), box))
                break
    grey = int(rng.integers(228, 251))
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    masks = []
    for obj in objects:
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter, strict=True))
        _draw(draw, obj, rgb)  # type: ignore[arg-type]
        m = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(m), obj, 255)
        masks.append(np.asarray(m) > 0)
    return Scene(image, caption_of(objects), objects, masks)

"""Shapes world: procedural scenes with exact masks, the embedded model trained on them, and a checker.

>>> from daami2i.shapes import make_scene
>>> scene = make_scene(3)
>>> scene.image.size, len(scene.objects) == len(scene.masks)
((64, 64), True)
"""

from .scenes import COLORS, SHAPES, Scene, ShapeObject, caption_of, make_scene

__all__ = ["COLORS", "SHAPES", "Scene", "ShapeObject", "caption_of", "make_scene"]

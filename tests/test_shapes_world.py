"""The procedural shapes world and its checker."""

from __future__ import annotations

import numpy as np
from PIL import Image

from daami2i.shapes import COLORS, SHAPES, make_scene
from daami2i.shapes.checker import check, find_objects, mask_of_color
from daami2i.shapes.train import HELD_OUT


def test_scenes_are_deterministic_and_captioned():
    a, b = make_scene(42), make_scene(42)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(make_scene(43).image), np.asarray(a.image))
    for seed in range(200):
        sc = make_scene(seed)
        assert 1 <= len(sc.objects) <= 3 and len(sc.masks) == len(sc.objects)
        assert len({o.shape for o in sc.objects}) == len(sc.objects) == len({o.color for o in sc.objects})
        assert all(o.shape in SHAPES and o.color in COLORS for o in sc.objects)
        words = sc.caption.replace(",", "").split()
        assert [w for w in words if w in COLORS or w in SHAPES] == [x for o in sc.objects for x in (o.color, o.shape)]
    assert make_scene(7, n_objects=3).caption.count(" and ") == 1


def test_masks_are_exactly_the_object_pixels():
    for seed in range(50):
        sc = make_scene(seed)
        rgb = np.asarray(sc.image).astype(int)
        background = rgb[0, 0]
        covered = np.zeros(rgb.shape[:2], dtype=bool)
        for m in sc.masks:
            assert m.sum() > 50
            assert not (covered & m).any()  # objects never overlap
            covered |= m
            assert (np.abs(rgb[m] - background).sum(-1) > 60).all()
        assert (rgb[~covered] == background).all()


def test_checker_on_ground_truth():
    objects = hits = 0
    for i in range(300):
        sc = make_scene(HELD_OUT + i)
        res = check(sc.image, [(o.color, o.shape) for o in sc.objects])
        objects += len(res)
        hits += sum(res)
        for o, m in zip(sc.objects, sc.masks, strict=True):
            assert np.array_equal(mask_of_color(sc.image, o.color), m)
    assert hits == objects


def test_checker_rejects_what_is_not_there():
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert find_objects(blank) == []
    assert check(blank, [("red", "circle")]) == [False]
    sc = make_scene(HELD_OUT)
    o = sc.objects[0]
    other_shape = next(s for s in SHAPES if s != o.shape)
    other_color = next(c for c in COLORS if c not in {x.color for x in sc.objects})
    assert check(sc.image, [(o.color, other_shape), (other_color, o.shape)]) == [False, False]

"""The explorer's mask view reads on any colour, the red object of the default prompt included."""

from __future__ import annotations

import numpy as np
from PIL import Image

from daami2i.explore import mask_image, scale_of


def test_a_mask_on_a_red_object_is_visible():
    red = Image.new("RGB", (16, 16), (230, 30, 30))  # the mask's old colour, everywhere
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    out = np.asarray(mask_image(red, mask, []))
    k = scale_of(red)
    at = lambda y, x: tuple(out[y * k + k // 2, x * k + k // 2])  # noqa: E731 - a pixel of the enlarged view
    assert at(7, 7) == (230, 30, 30)  # inside: the image as it is
    assert at(0, 0) == (69, 9, 9)  # outside: dimmed to 30 %
    assert at(4, 7) == (0, 255, 255) and at(11, 11) == (0, 255, 255)  # the edge, in a colour unlike the image
    assert at(5, 7) == (230, 30, 30)  # one pixel in: not the edge


def test_boxes_are_outlined():
    img = Image.new("RGB", (16, 16), (255, 255, 255))
    out = np.asarray(mask_image(img, np.zeros((16, 16), bool), [[2, 2, 4, 4]]))
    k = scale_of(img)
    assert tuple(out[2 * k, 3 * k]) == (255, 255, 0)

"""The explorer, driven in a real headless Chromium (Debian's package) by Playwright, as a person would:
generate, click a pixel, pick a word, move the threshold, download the mask. Screenshots of each
state go to the test's temp folder."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daami2i import trace
from daami2i.explore import build_app, expanded, launch, overlay, pixel_of, scale_of, show
from daami2i.heatmaps import masks as M
from daami2i.shapes import make_scene
from daami2i.shapes.train import HELD_OUT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "a red circle and a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(shapes_pipe):
    return shapes_pipe


@pytest.fixture(scope="module")
def reference(pipe):
    """The same generation through the public API, to compare the app's pictures with."""
    with trace(pipe, self_factors="all") as trc:
        image = pipe(PROMPT, num_inference_steps=25, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    return image.images[0], trc.compute_global_heat_map(), trc.compute_global_heat_map(factors=[1])


@pytest.fixture(scope="module")
def app_url(pipe):
    app = build_app(pipe, defaults={"steps": 25, "guidance": 4.0, "prompt": PROMPT})
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def fetch(page, locator) -> Image.Image:
    """The picture an <img> shows, fetched as the browser would (from its src URL)."""
    src = page.locator(locator).get_attribute("src")
    with urllib.request.urlopen(src if src.startswith("http") else page.url + src.lstrip("/")) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_explorer_in_a_real_browser(app_url, reference, tmp_path):
    assert CHROMIUM, "Debian's chromium package is needed (.ci/run installs it)"
    from playwright.sync_api import sync_playwright

    image, ghm, high = reference
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(app_url)
            page.click("#generate")
            page.wait_for_selector("#image img", timeout=120_000)
            page.wait_for_function("document.querySelector('#info').innerText.includes('generated')")
            page.screenshot(path=str(tmp_path / "1-generated.png"), full_page=True)
            # the experiment downloads as one zip that loads back with the same maps
            with page.expect_download() as dl:
                page.locator('#downloads a[download="experiment.zip"]').click()
            import zipfile

            import daami2i

            zipfile.ZipFile(dl.value.path()).extractall(tmp_path / "exp")
            loaded = daami2i.load_experiment(tmp_path / "exp").compute_global_heat_map()
            assert torch.equal(loaded.compute_word_heat_map("circle").value, ghm.compute_word_heat_map("circle").value)
            shown = fetch(page, "#image img")
            k = scale_of(image)
            assert shown.size == (image.width * k, image.height * k)
            assert same(shown.resize(image.size, Image.Resampling.NEAREST), image.convert("RGB"))

            # click a pixel: the map shown is the API's map of the latent pixel under the click
            img = page.locator("#image img")
            box = img.bounding_box()
            cx, cy = box["width"] * 0.31, box["height"] * 0.62
            img.click(position={"x": cx, "y": cy})
            page.wait_for_selector("#heat img", timeout=30_000)
            page.wait_for_function("document.querySelector('#info').innerText.includes('pixel')")
            page.screenshot(path=str(tmp_path / "2-pixel.png"), full_page=True)
            scale = shown.width / box["width"]  # displayed size vs the picture's size
            pid = pixel_of(high, image, cx * scale / k, cy * scale / k)
            assert f"pixel {pid} " in page.locator("#info").inner_text()
            first = fetch(page, "#heat img")
            assert same(first, overlay(image, expanded(high.compute_pixel_heat_map([pid]), image)))

            # another pixel: the map changes
            img.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.2})
            page.wait_for_function(f"!document.querySelector('#info').innerText.includes('pixel {pid} ')")
            page.wait_for_timeout(500)
            assert not same(fetch(page, "#heat img"), first)

            # drag a box: the box map, from the coordinates the page reports
            page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.7, steps=8)
            page.mouse.up()
            page.wait_for_function("document.querySelector('#info').innerText.includes('box (')")
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "2b-box.png"), full_page=True)
            text = page.locator("#info").inner_text()
            latent_box = tuple(int(v) for v in text.split("box (")[1].split(")")[0].split(","))
            gw = high.grid_size[1]
            assert latent_box[0] == int(0.15 * gw) and latent_box[2] == int(0.55 * gw), latent_box
            assert same(
                fetch(page, "#heat img"), overlay(image, expanded(high.compute_bbox_heat_map(*latent_box), image))
            )

            # a polygon of three clicks, closed: the contour map
            page.locator("#mode label", has_text="polygon").click()
            before = fetch(page, "#heat img")
            for n, (fx, fy) in enumerate(((0.1, 0.1), (0.6, 0.1), (0.3, 0.6)), start=1):
                img.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
                page.wait_for_function(f"document.querySelector('#info').innerText.includes('{n} click(s) pending')")
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "3a-polygon-points.png"), full_page=True)
            marked = fetch(page, "#image img")  # the pending vertices are drawn on the image
            assert not same(marked.resize(image.size, Image.Resampling.NEAREST), image.convert("RGB"))
            page.click("#close-polygon")
            page.wait_for_function("document.querySelector('#info').innerText.includes('1 polygon(s)')")
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "3-polygon.png"), full_page=True)
            assert not same(fetch(page, "#heat img"), before)
            page.wait_for_timeout(300)  # closing the polygon shows the plain image again
            assert same(fetch(page, "#image img").resize(image.size, Image.Resampling.NEAREST), image.convert("RGB"))

            # a word chip: raw and refined maps side by side, and the mask with its boxes
            page.locator("#words label", has_text="circle").click()
            page.wait_for_function("document.querySelector('#info').innerText.includes('circle')")
            page.wait_for_selector("#mask img", timeout=30_000)
            page.screenshot(path=str(tmp_path / "4-word.png"), full_page=True)
            raw = ghm.compute_word_heat_map("circle")
            refined = high.compute_guided_heat_map(raw)
            assert same(fetch(page, "#raw img"), overlay(image, expanded(raw, image)))
            assert same(fetch(page, "#refined img"), overlay(image, expanded(refined, image)))
            text_04 = page.locator("#info").inner_text()

            # move the threshold: the mask follows; download it and compare with the API's
            number = page.locator("#threshold input[type=number]")
            number.fill("0.7")
            number.press("Enter")
            page.wait_for_function(f"document.querySelector('#info').innerText !== {text_04!r}")
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "5-threshold.png"), full_page=True)
            expected = np.zeros((image.height, image.width), bool)
            for inst in M.instances(M.binarize(expanded(refined, image), "tau", 0.7)):
                expected |= inst.mask
            link = page.locator('#downloads a[download="mask.png"]')
            with page.expect_download() as dl:
                link.click()
            got = np.asarray(Image.open(dl.value.path())) > 0
            assert np.array_equal(got, expected)
            assert expected.sum() > 0

            # refine with every captured resolution instead of the highest
            page.click("#all-res input")
            page.wait_for_function("document.querySelector('#info').innerText.includes('all resolutions')")
            page.wait_for_timeout(500)
            assert same(fetch(page, "#refined img"), overlay(image, expanded(ghm.compute_guided_heat_map(raw), image)))

            # a real image with its caption: real-image attribution, then a word map
            scene = make_scene(HELD_OUT + 3)
            scene.image.save(tmp_path / "scene.png")
            page.get_by_text("or attribute your own image").click()
            page.set_input_files("#upload input[type=file]", str(tmp_path / "scene.png"))
            page.fill("#caption textarea", scene.caption)
            page.click("#attribute")
            page.wait_for_function("document.querySelector('#info').innerText.includes('attributed')", timeout=60_000)
            page.wait_for_timeout(500)
            assert same(fetch(page, "#image img").resize(scene.image.size, Image.Resampling.NEAREST), scene.image)
            shape = scene.objects[0].shape
            page.locator("#words label", has_text=shape).click()
            page.wait_for_function(f"document.querySelector('#info').innerText.includes({shape!r})")
            page.screenshot(path=str(tmp_path / "6-real-image.png"), full_page=True)
            # a second user, at the same time, gets their own session; both requests are served
            other = browser.new_context().new_page()
            other.goto(app_url)
            other.fill("#prompt textarea", "a yellow triangle")
            other.click("#generate")
            page.click("#generate")  # queued behind the other user's generation, not lost
            other.wait_for_function("document.querySelector('#info').innerText.includes('generated')")
            page.wait_for_function("document.querySelector('#info').innerText.includes('generated')")
            page.wait_for_timeout(500)
            mine, theirs = fetch(page, "#image img"), fetch(other, "#image img")
            assert same(mine.resize(image.size, Image.Resampling.NEAREST), image.convert("RGB"))
            assert not same(mine, theirs)
            other.screenshot(path=str(tmp_path / "7-second-user.png"), full_page=True)
        finally:
            browser.close()


def test_explore_command_checks_its_experiment_folder(tmp_path):
    from typer.testing import CliRunner

    from daami2i.cli import app

    res = CliRunner().invoke(app, ["explore", str(tmp_path)])
    assert res.exit_code == 3 and "manifest.json is missing" in res.output


# -- issue 14: no dead ends. Each test drives a fresh page (1400x1000) on the shared app. -----------
@contextlib.contextmanager
def _page(app_url: str, viewport: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A page of a headless Chromium on the app, with the default prompt generated; closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.goto(app_url)
            page.click("#generate")
            page.wait_for_function("document.querySelector('#info').innerText.includes('generated')", timeout=120_000)
            page.wait_for_selector("#image img")
            yield page
        finally:
            browser.close()


def _info(page) -> str:
    return page.locator("#info").inner_text()


def _wait_info(page, text: str, timeout: float = 15_000) -> None:
    """Wait until the info line contains ``text`` (then let the other outputs settle)."""
    page.wait_for_function(f"document.querySelector('#info').innerText.includes({text!r})", timeout=timeout)
    page.wait_for_timeout(400)


def _at(page, fx: float, fy: float) -> tuple[float, float]:
    """Page coordinates of the point at fractions (fx, fy) of the displayed image."""
    b = page.locator("#image img").bounding_box()
    return b["x"] + b["width"] * fx, b["y"] + b["height"] * fy


def _click(page, fx: float, fy: float) -> None:
    b = page.locator("#image img").bounding_box()
    page.locator("#image img").click(position={"x": b["width"] * fx, "y": b["height"] * fy}, timeout=5_000)


def _drag(page, a: tuple[float, float], b: tuple[float, float]) -> None:
    page.mouse.move(*_at(page, *a))
    page.mouse.down()
    page.mouse.move(*_at(page, *b), steps=8)
    page.mouse.up()


def _on_top(page, selector: str, fx: float = 0.5, fy: float = 0.5) -> bool:
    """Whether the element a user would hit at (fx, fy) of ``selector``'s box is ``selector`` itself
    (no "Error" badge, overlay or corner button over it)."""
    return page.evaluate(
        """([sel, fx, fy]) => {
          const el = document.querySelector(sel), r = el.getBoundingClientRect();
          const hit = document.elementFromPoint(r.left + r.width * fx, r.top + r.height * fy);
          return hit === el;
        }""",
        [selector, fx, fy],
    )


def _src(page, selector: str) -> str | None:
    loc = page.locator(selector)
    return loc.get_attribute("src") if loc.count() else None


def _downloads(page) -> list[str]:
    return sorted(a.get_attribute("download") for a in page.locator("#downloads a[download]").all())


def _plain(page, image: Image.Image) -> bool:
    """Whether the image panel shows the generated picture with nothing drawn on it."""
    return same(fetch(page, "#image img"), show(image))


def test_explorer_errors_leave_the_panels_and_say_what_to_do(app_url, reference, tmp_path):
    image = reference[0]
    with _page(app_url) as page:
        _click(page, 0.3, 0.6)
        _wait_info(page, "pixel")
        shown, heat = _src(page, "#image img"), _src(page, "#heat img")
        assert heat is not None
        # polygon mode, two clicks, "close polygon": too few vertices
        page.locator("#mode label", has_text="polygon").click()
        _click(page, 0.1, 0.1)
        _wait_info(page, "1 click(s) pending")
        _click(page, 0.6, 0.1)
        _wait_info(page, "2 click(s) pending")
        page.click("#close-polygon")
        _wait_info(page, "at least 3")
        page.screenshot(path=str(tmp_path / "polygon-error.png"), full_page=True)
        assert "click 1 more" in _info(page)
        assert page.locator(".toast-body", has_text="at least 3").count() >= 1
        assert _src(page, "#heat img") == heat and _on_top(page, "#heat img") and _on_top(page, "#image img")
        assert not _plain(page, image)  # the two vertices are still drawn, and still pending
        _click(page, 0.3, 0.6)
        _wait_info(page, "3 click(s) pending")
        page.click("#close-polygon")
        _wait_info(page, "1 polygon(s)")
        heat = _src(page, "#heat img")
        shown = _src(page, "#image img")
        # an empty prompt, then steps = 0: the picture and the map stay, the info line says why
        page.fill("#prompt textarea", "")
        page.click("#generate")
        _wait_info(page, "type a prompt")
        assert _src(page, "#image img") == shown and _src(page, "#heat img") == heat
        assert _on_top(page, "#image img") and _on_top(page, "#heat img")
        page.fill("#prompt textarea", PROMPT)
        steps = page.get_by_label("steps")
        steps.fill("0")
        page.click("#generate")
        _wait_info(page, "steps must be a whole number from 1 to 999")
        page.screenshot(path=str(tmp_path / "steps-error.png"), full_page=True)
        assert _src(page, "#image img") == shown and _src(page, "#heat img") == heat
        assert _on_top(page, "#image img") and _on_top(page, "#heat img")
        # and the image still answers clicks
        page.locator("#mode label", has_text="point").click()
        _click(page, 0.8, 0.2)
        _wait_info(page, "pixel")
        assert _src(page, "#heat img") != heat


def test_explorer_mode_change_clears_pending_clicks(app_url, reference):
    image, _, high = reference
    gw = high.grid_size[1]
    with _page(app_url) as page:
        page.locator("#mode label", has_text="polygon").click()
        _click(page, 0.1, 0.1)
        _wait_info(page, "1 click(s) pending")
        _click(page, 0.6, 0.1)
        _wait_info(page, "2 click(s) pending")
        assert not _plain(page, image)
        page.locator("#mode label", has_text="box").click()
        _wait_info(page, "box mode")
        assert "pending" not in _info(page) and _plain(page, image)  # the magenta line is gone
        _click(page, 0.1, 0.1)
        _wait_info(page, "1 click(s) pending")
        assert not _plain(page, image)  # the pending corner is marked
        _click(page, 0.45, 0.7)
        _wait_info(page, "box (")
        gh = high.grid_size[0]
        assert _info(page).startswith(f"box ({int(0.1 * gw)}, {int(0.1 * gh)}, {int(0.45 * gw)}, {int(0.7 * gh)})")
        assert _plain(page, image)
        # one box corner, point mode, back to box: the next click is a first corner again
        _click(page, 0.7, 0.7)
        _wait_info(page, "1 click(s) pending")
        page.locator("#mode label", has_text="point").click()
        _wait_info(page, "point mode")
        assert _plain(page, image)
        page.locator("#mode label", has_text="box").click()
        _wait_info(page, "box mode")
        _click(page, 0.2, 0.2)
        _wait_info(page, "1 click(s) pending")


def test_explorer_drag_in_polygon_mode_keeps_the_vertices(app_url, reference):
    image = reference[0]
    with _page(app_url) as page:
        page.locator("#mode label", has_text="polygon").click()
        _wait_info(page, "drags are ignored")  # the mode says so up front
        _click(page, 0.1, 0.1)
        _wait_info(page, "1 click(s) pending")
        _click(page, 0.6, 0.1)
        _wait_info(page, "2 click(s) pending")
        heat = _src(page, "#heat img")
        _drag(page, (0.2, 0.3), (0.6, 0.7))
        _wait_info(page, "ignored")
        assert "2 click(s) pending" in _info(page) and "box (" not in _info(page)
        assert _src(page, "#heat img") == heat and not _plain(page, image)
        _click(page, 0.3, 0.6)
        _wait_info(page, "3 click(s) pending")
        page.click("#close-polygon")
        _wait_info(page, "1 polygon(s)")
        assert _plain(page, image)


def test_explorer_sliders_without_a_word_keep_the_map(app_url):
    with _page(app_url) as page:
        _click(page, 0.3, 0.6)
        _wait_info(page, "pixel")
        before = (_src(page, "#heat img"), _info(page), _downloads(page))
        assert before[0] is not None and "overlay.png" in before[2]
        number = page.locator("#threshold input[type=number]")
        number.fill("0.7")
        number.press("Enter")
        page.click("#all-res input")
        page.wait_for_timeout(2_000)
        assert (_src(page, "#heat img"), _info(page), _downloads(page)) == before


@pytest.mark.parametrize("viewport", [(1400, 1000), (800, 900), (400, 800)])
def test_explorer_corner_pixels_are_clickable(app_url, reference, viewport):
    """No full-screen or download button (nor their empty bar, nor a rounded corner) lies over the
    image at any page width: its corner pixels are queried."""
    _, _, high = reference
    gw = high.grid_size[1]
    with _page(app_url, viewport) as page:
        page.locator("#image img").scroll_into_view_if_needed()
        b = page.locator("#image img").bounding_box()
        # the centres of the displayed corner pixels, and of the top edge
        lo, hx, hy = 0.5 / b["width"], 1 - 0.5 / b["width"], 1 - 0.5 / b["height"]
        for fx, fy in ((lo, lo), (hx, lo), (lo, hy), (hx, hy), (0.5, lo)):
            assert _on_top(page, "#image img", fx, fy), (fx, fy)
        page.locator("#image img").click(position={"x": b["width"] - 1, "y": 1}, timeout=5_000)
        _wait_info(page, "pixel")
        assert _info(page).startswith(f"pixel {gw - 1} (row 0, column {gw - 1})")
        assert page.evaluate("document.fullscreenElement") is None
        gh = high.grid_size[0]
        page.locator("#image img").click(position={"x": 1, "y": b["height"] - 1}, timeout=5_000)
        _wait_info(page, f"pixel {(gh - 1) * gw} ")
        assert _info(page).startswith(f"pixel {(gh - 1) * gw} (row {gh - 1}, column 0)")


def test_explorer_keeps_the_experiment_download(app_url):
    with _page(app_url) as page:
        assert _downloads(page) == ["experiment.zip"]
        _click(page, 0.3, 0.6)
        _wait_info(page, "pixel")
        assert _downloads(page) == ["experiment.zip", "overlay.png"]
        _drag(page, (0.2, 0.3), (0.6, 0.7))
        _wait_info(page, "box (")
        assert _downloads(page) == ["experiment.zip", "overlay.png"]
        page.locator("#words label", has_text="circle").click()
        _wait_info(page, "instance(s)")
        assert _downloads(page) == ["coco.json", "experiment.zip", "mask.png", "overlay.png"]
        with page.expect_download() as dl:
            page.locator('#downloads a[download="experiment.zip"]').click()
        import zipfile

        assert "manifest.json" in zipfile.ZipFile(dl.value.path()).namelist()


def test_explorer_number_checks_show_on_the_page(app_url):
    """Steps 2.5 / -3 / 99999999999 and seed -1 never reach the pipeline: the info line says what is
    allowed, and the picture stays."""
    with _page(app_url) as page:
        shown = _src(page, "#image img")
        for field, value, expected in (
            ("steps", "2.5", "steps must be a whole number from 1 to 999, got 2.5"),
            ("steps", "-3", "steps must be a whole number from 1 to 999, got -3"),
            ("steps", "99999999999", "steps must be a whole number from 1 to 999, got 99999999999"),
            ("steps", "25", None),
            ("seed", "-1", "seed must be a whole number from 0 to"),
        ):
            page.get_by_label(field, exact=True).fill(value)
            if expected is None:
                continue
            page.click("#generate")
            _wait_info(page, expected)
            assert _src(page, "#image img") == shown and _on_top(page, "#image img")

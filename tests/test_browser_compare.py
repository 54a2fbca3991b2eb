"""The Compare page in a real browser: two runs of one 2,000-image dataset (B is A's embeddings
moved by noise; A has a stored map, B shows its PCA preview), both maps drawn with every point in
view, though each map is narrower than tall; a small lasso in map A (closed on a point, as a hand
closes one) selects the points inside it, not that point, and exactly the same images in map B,
both drawn in their own colours, and the page counts them; picking the lasso leaves the map where
it is; hovering a point of A shows that image's point in B. Screenshot in /tmp/compare-page.png."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.helpers import assert_fits_every_point, canvas_top, point_on_page, share_in_own_colours
from tests.test_browser import need_chromium, running_app, wait_idle
from tests.test_browser_map import CHROMIUM_ARGS

N = 2000


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    need_chromium()
    home = tmp_path_factory.mktemp("compare") / "lab"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(home))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        from core.runs.worker import compute_statistics
        from storage.db import make_engine
        from tests.helpers import clustered_run, stored_run

        engine = make_engine()
        made = clustered_run(engine, N)
        assert compute_statistics(engine, made["run_id"]).status == "done"
        moved = made["embeddings"] + np.random.default_rng(1).normal(size=made["embeddings"].shape)
        b = stored_run(engine, made["dataset_id"], moved)
        engine.dispose()
    yield {"home": home, "a": made["run_id"], "b": b, **made}


@pytest.fixture(scope="module")
def server(two_runs, tmp_path_factory):
    with running_app(two_runs["home"], tmp_path_factory.mktemp("compare-log") / "streamlit.log") as url:
        yield url


def both_maps(page) -> tuple:
    """Map A's and map B's frames (left, right) once both have drawn their points."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        frames = [f for f in page.frames if "embedding_map" in f.url]
        try:
            if len(frames) == 2 and all(f.evaluate("() => window.__map && window.__map.ready") for f in frames):
                return tuple(sorted(frames, key=lambda f: f.frame_element().bounding_box()["x"]))
        except Exception:  # a frame was replaced by a rerun
            pass
        page.wait_for_timeout(250)
    raise AssertionError("the two maps never finished drawing")


def selected(frame) -> set[int]:
    return set(frame.evaluate("() => Array.from(window.__map.selected())"))


def test_a_lasso_in_map_a_selects_the_same_images_in_map_b(server, two_runs):
    labels = two_runs["labels"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        # narrow enough for each map to be narrower than tall (480 px): its view must fit the width
        page = browser.new_page(viewport={"width": 1200, "height": 1200}, color_scheme="light")
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{server}/compare?a={two_runs['a']}&b={two_runs['b']}")
            expect(page.get_by_role("heading", name=f"A: run #{two_runs['a']} (UMAP)")).to_be_visible(timeout=120_000)
            wait_idle(page, 60_000)
            map_a, map_b = both_maps(page)
            assert map_a.evaluate("() => window.__map.points") == map_b.evaluate("() => window.__map.points") == N
            assert not selected(map_a) and not selected(map_b)
            for frame in (map_a, map_b):
                assert frame.locator("#canvas").bounding_box()["width"] < 480  # (what this view tests)
                assert_fits_every_point(frame)

            # hover a point of A: B shows that image's point as hovered
            target = int(np.flatnonzero(labels == 3)[0])
            x, y = point_on_page(page, map_a, target)
            page.mouse.move(x - 20, y - 20)
            page.mouse.move(x, y, steps=5)
            expect(map_a.locator("#tip")).to_be_visible(timeout=20_000)
            map_b.wait_for_function("() => window.__map.linkedHover !== null", timeout=20_000)
            shown_a = int(re.search(r"#(\d+)", map_a.locator("#tip").inner_text()).group(1))
            assert map_b.evaluate("() => window.__map.linkedHover") == shown_a
            expect(map_b.locator("#tip")).to_contain_text(f"#{shown_a} ·")

            # a small lasso in map A, begun and ended on a point of class 0 (the map once took its
            # release there for a click on that point), around several points
            top = canvas_top(map_a)
            map_a.locator("button[data-mode=lasso]").click()
            assert canvas_top(map_a) == top  # (the lasso's shorter hint once moved the map)
            canvas = map_a.locator("#canvas").bounding_box()
            on_page = np.array(map_a.evaluate(
                f"() => Array.from({{length: {N}}}, (_, i) => window.__map.getScreenPosition(i))"))
            on_page += [canvas["x"], canvas["y"]]
            radius = 12

            def inside(start: int, by: float) -> np.ndarray:
                centre = on_page[start] - [radius, 0]
                return np.flatnonzero(np.hypot(*(on_page - centre).T) < radius + by)

            start = int(max(np.flatnonzero(labels == 0), key=lambda i: len(inside(i, -4))))
            cx, cy = on_page[start] - [radius, 0]
            assert len(inside(start, -4)) >= 3
            page.mouse.move(cx + radius, cy)
            page.mouse.down()
            for step in range(1, 25):
                angle = 2 * math.pi * step / 24
                page.mouse.move(cx + radius * math.cos(angle), cy + radius * math.sin(angle))
                time.sleep(0.02)
            page.mouse.up()
            heading = page.get_by_role("heading", name=re.compile(r"^Selected: [\d,]+ shared images$"))
            expect(heading).to_be_visible(timeout=60_000)
            wait_idle(page, 60_000)
            count = int(heading.inner_text().split(": ")[1].split()[0].replace(",", ""))
            map_a, map_b = both_maps(page)
            map_b.wait_for_function(f"() => window.__map.selected().length === {count}", timeout=30_000)
            in_a, in_b = selected(map_a), selected(map_b)
            # the points inside the lasso (4 px either side of its line left to the drawing)
            assert set(inside(start, -4)) <= in_a <= set(inside(start, 4)), (count, start)
            # one dataset: point i of either map is dataset image i
            assert in_a == in_b and len(in_a) == count
            for frame, points in ((map_a, in_a), (map_b, in_b)):  # lassoed, and drawn from the page's selection
                assert share_in_own_colours(frame, sorted(points), labels) >= 0.5
            heading.scroll_into_view_if_needed()
            page.screenshot(path="/tmp/compare-page.png")
            for name, at in (("figures", "What changed"), ("tables", "Images that moved most"), ("end", "Settings")):
                page.get_by_role("heading", name=at).scroll_into_view_if_needed()
                page.wait_for_timeout(500)
                page.screenshot(path=f"/tmp/compare-page-{name}.png")
        finally:
            browser.close()
